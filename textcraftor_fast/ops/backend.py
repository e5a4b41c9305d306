"""Pick the op implementations (``ops.backend``) and swap them into already-loaded diffusers models.

Each swap is an explicit function that changes one kind of op in a model and returns how many it changed;
``apply_ops`` runs them in a fixed order and logs one line ("ops: triton GroupNorm+SiLU x45, ..."). Swapped
modules keep their state_dict keys and SHARE the original parameters, so checkpoints, export and freezing
are untouched; only forward (and its backward) changes.

Backends (``ops.backend``):
  torch   stock PyTorch (diffusers' SDPA attention processor, nn.GroupNorm, eager GEGLU);
  triton  the kernels in ``textcraftor_fast.kernels`` (CUDA; on CPU only under TRITON_INTERPRET=1, for tests);
  cpp     the native library (``csrc/``, ``make ext``; ``textcraftor_fast.ops.native``): fused GroupNorm+SiLU in the
          UNet and VAE, and the sampler's fused CFG-DDIM step (the engine asks ``resolve_backend`` for it);
  auto    on an Ampere+ GPU with Triton: Triton GroupNorm(+SiLU) and GEGLU, attention left to SDPA (its cuDNN
          and flash backends beat our attention kernel on H100); on CPU: cpp when the library is built;
          elsewhere torch.
``ops.attention`` = sdpa | triton overrides the attention choice either way. On the CPU every backend but an
explicit 'torch' also runs large convolutions on small maps as one GEMM (``ops.gemm_conv_max_pixels``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .gemm_conv import swap_small_map_convs

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cpp")
ATTENTION = ("auto", "sdpa", "triton")


# ---------------------------------------------------------------------------------------------- backend
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The backend that will run: ``requested`` unless 'auto'. An unusable explicit choice is a clear error."""
    device = torch.device(device)
    if requested not in BACKENDS:
        raise ValueError(f"ops.backend={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        # Ampere or newer: the kernels are bf16 throughout and were measured on Hopper (docs/kernels.md).
        if device.type == "cuda" and _triton_installed() and _cuda_capability(device) >= (8, 0):
            return "triton"
        if device.type == "cpu" and native.has_device_kernels(device):
            return "cpp"
        return "torch"
    if requested == "cpp" and not native.has_device_kernels(device):
        built = native.available()
        raise RuntimeError(f"ops.backend='cpp' but the native library "
                           + (f"has no {device.type} kernels (build it on a machine with a CUDA torch and nvcc)"
                              if built else f"is not built ({native.library_path()}): run `make ext` (needs a "
                              "C++ compiler and CMake)") + ", or set ops.backend=auto/torch")
    if requested == "triton":
        if not _triton_installed():
            raise RuntimeError("ops.backend='triton' but Triton is not installed: pip install "
                               "'textcraftor-fast[triton]', or set ops.backend=auto")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"ops.backend='triton' needs a CUDA device (this run is on {device.type}). "
                               "Use ops.backend=auto/torch here; for testing on CPU, set TRITON_INTERPRET=1 "
                               "in the environment before starting Python (slow: Triton's interpreter)")
    return requested


# ---------------------------------------------------------------------------------------------- helpers
def _replace_children(model: nn.Module, match: Callable[[nn.Module], bool],
                      build: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule for which ``match`` holds by ``build(old)``; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, build(child))
                count += 1
    return count


# ---------------------------------------------------------------------------------------------- GroupNorm
def _fused_resnet_block_class() -> type:
    from diffusers.models.resnet import ResnetBlock2D

    class FusedResnetBlock2D(ResnetBlock2D):
        """diffusers' ResnetBlock2D whose norm1/norm2 already apply SiLU (fused GroupNorm+SiLU kernels).

        Same submodules and state_dict keys; ``nonlinearity`` still acts on the time embedding. The forward
        mirrors diffusers' (``tests/test_ops.py`` compares the two blocks output for output).
        """

        def forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
            hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU
            if self.upsample is not None:
                if hidden_states.shape[0] >= 64:
                    input_tensor, hidden_states = input_tensor.contiguous(), hidden_states.contiguous()
                input_tensor, hidden_states = self.upsample(input_tensor), self.upsample(hidden_states)
            elif self.downsample is not None:
                input_tensor, hidden_states = self.downsample(input_tensor), self.downsample(hidden_states)
            hidden_states = self.conv1(hidden_states)
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)[:, :, None, None]
            if self.time_embedding_norm == "scale_shift":  # the SiLU follows the modulation: norm2 not fused
                if temb is None:
                    raise ValueError(f"`temb` should not be None when `time_embedding_norm` is "
                                     f"{self.time_embedding_norm}")
                time_scale, time_shift = torch.chunk(temb, 2, dim=1)
                hidden_states = self.norm2(hidden_states)
                hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)
            else:  # "default" (UNet) adds temb first; any other value (the VAE's "group") has no temb
                if self.time_embedding_norm == "default" and temb is not None:
                    hidden_states = hidden_states + temb
                hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU
            hidden_states = self.conv2(self.dropout(hidden_states))
            if self.conv_shortcut is not None:
                if self.training:
                    input_tensor = input_tensor.contiguous()
                input_tensor = self.conv_shortcut(input_tensor)
            return (input_tensor + hidden_states) / self.output_scale_factor

    return FusedResnetBlock2D


def _groupnorm_factory(backend: str) -> Callable[[nn.GroupNorm, bool], nn.Module]:
    """``build(gn, silu)`` for the backend's GroupNorm module (both share gn's parameters)."""
    if backend == "cpp":
        return native.NativeGroupNorm.from_torch
    if backend == "triton":
        from ..kernels.groupnorm import TritonGroupNorm
        return TritonGroupNorm.from_torch
    raise ValueError(f"swap_groupnorm_silu: backend={backend!r} is not one of triton, cpp")


def swap_groupnorm_silu(model: nn.Module, backend: str = "triton") -> tuple[int, int]:
    """The backend's (triton | cpp) GroupNorm in ``model``: fused with the SiLU that follows it where one does.

    Fused: ResnetBlock2D's norm1 and norm2 (norm2 stays unfused under scale_shift), and every
    ``conv_norm_out`` + ``conv_act`` pair (UNet output, VAE decoder/encoder). Every other nn.GroupNorm
    (transformer input norms, VAE attention group_norm) gets the backend's plain GroupNorm.
    Returns (fused GroupNorm+SiLU count, plain GroupNorm count).
    """
    from diffusers.models.resnet import ResnetBlock2D

    make = _groupnorm_factory(backend)
    fused_cls = _fused_resnet_block_class()
    fused = plain = 0
    for module in list(model.modules()):
        if (type(module) is ResnetBlock2D and isinstance(module.nonlinearity, nn.SiLU)
                and isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm)):
            fuse2 = module.time_embedding_norm != "scale_shift"
            module.norm1 = make(module.norm1, True)
            module.norm2 = make(module.norm2, fuse2)
            module.__class__ = fused_cls
            fused += 1 + fuse2
            plain += 1 - fuse2
        norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU):
            module.conv_norm_out = make(norm, True)
            module.conv_act = nn.Identity()
            fused += 1
    plain += _replace_children(model, lambda m: type(m) is nn.GroupNorm, lambda m: make(m, False))
    return fused, plain


# ---------------------------------------------------------------------------------------------- attention
class TritonAttnProcessor:
    """diffusers' AttnProcessor2_0 with the Triton flash-attention kernel in place of SDPA.

    Falls back to SDPA per call where the kernel does not apply (an attention mask, an unsupported head
    dim or dtype), so a swapped model never fails where the stock one runs.
    """

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        from ..kernels.attention import flash_attention, supports

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, N, H*D) -> (B, H, N, D) strided views; the kernel reads them in place.
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is None and supports(head_dim, query.dtype) and query.dtype == key.dtype:
            hidden_states = flash_attention(query, key, value)  # scale 1/sqrt(D), as AttnProcessor2_0
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def swap_attention(model: nn.Module) -> int:
    """The Triton attention processor on every diffusers ``Attention`` whose head dim the kernel supports."""
    from diffusers.models.attention_processor import Attention

    from ..kernels.attention import supports

    count = 0
    for module in model.modules():
        dtype = next(module.parameters()).dtype if isinstance(module, Attention) else None
        if dtype is not None and supports(module.inner_dim // module.heads, dtype):
            module.set_processor(TritonAttnProcessor())
            count += 1
    return count


# ---------------------------------------------------------------------------------------------- GEGLU
def swap_geglu(model: nn.Module) -> int:
    """The fused Triton GEGLU in place of every diffusers ``GEGLU`` (same ``proj``, shared weights)."""
    from diffusers.models.activations import GEGLU

    from ..kernels.geglu import TritonGEGLU

    return _replace_children(model, lambda m: type(m) is GEGLU, TritonGEGLU.from_diffusers)


# ---------------------------------------------------------------------------------------------- apply
def _triton_attention(backend: str, chosen: str, attention: str, device: torch.device | str) -> bool:
    if attention not in ATTENTION:
        raise ValueError(f"ops.attention={attention!r} is not one of {', '.join(ATTENTION)}")
    if attention == "triton":
        resolve_backend("triton", device)  # same availability checks and errors as the backend
        return True
    # 'auto': our attention only when Triton was asked for by name. Under backend='auto' SDPA keeps it:
    # cuDNN / flash attention beat our kernel on H100 (benchmarks/results, docs/kernels.md).
    return attention == "auto" and backend == "triton" and chosen == "triton"


def apply_ops(models: Mapping[str, nn.Module], backend: str, device: torch.device | str,
              attention: str = "auto", gemm_conv_max_pixels: int = 0) -> dict[str, int]:
    """Swap the chosen ops into ``models`` (name -> module); returns the counts, logged in one line.

    ``gemm_conv_max_pixels`` > 0: on the CPU, unless ``backend`` is 'torch', large convolutions run as one GEMM on
    output maps of at most that many pixels (``ops/gemm_conv.py``)."""
    chosen = resolve_backend(backend, device)
    use_attention = _triton_attention(backend, chosen, attention, device)
    counts = {"GroupNorm+SiLU": 0, "GroupNorm": 0, "attention": 0, "GEGLU": 0, "small-map GEMM conv": 0}
    gemm_convs = backend != "torch" and torch.device(device).type == "cpu" and gemm_conv_max_pixels > 0
    for model in models.values():
        if gemm_convs:
            counts["small-map GEMM conv"] += swap_small_map_convs(model, gemm_conv_max_pixels)
        if chosen in ("triton", "cpp"):
            fused, plain = swap_groupnorm_silu(model, chosen)
            counts["GroupNorm+SiLU"] += fused
            counts["GroupNorm"] += plain
        if chosen == "triton":
            counts["GEGLU"] += swap_geglu(model)
        if use_attention:
            counts["attention"] += swap_attention(model)
    if chosen != "torch" or use_attention:
        summary = ", ".join(f"{name} x{n}" for name, n in counts.items() if n)
        extra = "" if use_attention else "; attention: SDPA"
        if chosen == "cpp":
            extra += "; sampler: native CFG-DDIM step"
        logger.info("ops: %s %s (in %s)%s", "triton" if chosen == "torch" else chosen, summary or "nothing to swap",
                    ", ".join(models), extra)
    else:
        gemm = counts["small-map GEMM conv"]
        logger.info("ops: torch%s%s", _torch_reason(backend, device),
                    f"; small-map GEMM conv x{gemm} (in {', '.join(models)})" if gemm else "")
    return counts


def _torch_reason(backend: str, device: torch.device | str) -> str:
    if backend == "torch":
        return " (requested)"
    device = torch.device(device)
    if device.type == "cpu" and not native.available():
        return " (auto: cpu device; native library not built: `make ext` builds it)"
    return f" (auto: {device.type} device)"
