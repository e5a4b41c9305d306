"""The native op library (``csrc/``, built by ``make ext``): loading, autograd and fake kernels, functionals.

``csrc/registration.cpp`` defines the ``torch.ops.textcraftor`` operators; the CPU (and, when built for it,
CUDA) kernels and the autograd formulas (``csrc/autograd.cpp``: each backward is the fused native backward op)
register in C++. This module adds what torch.compile and opcheck need, once per process when the library is
first loaded: a fake (meta) kernel per op (``torch.library.register_fake``).

  group_norm_silu   GroupNorm with an optional fused SiLU; autograd saves only x, weight, bias and the (N, G)
                    fp32 mean/rstd (eager torch also saves the normalised activation for SiLU's backward).
  cfg_ddim_step     classifier-free guidance + one DDIM step (epsilon / v-prediction), x_prev and x0 in one
                    pass; affine, so its backward saves nothing.

Nothing happens at import: ``available()`` loads the library on first use and returns False when it is not
built (the package then runs the torch ops; ``ops.apply_ops`` logs which backend runs).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.norm_module import FusedGroupNorm

logger = logging.getLogger(__name__)

LIBRARY_NAME = "libtextcraftor_ops.so"
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------- loading
def library_path() -> Path:
    """Where ``make ext`` puts the library (CMakeLists.txt: LIBRARY_OUTPUT_DIRECTORY)."""
    return Path(__file__).resolve().parents[1] / "_native" / LIBRARY_NAME


def available() -> bool:
    """True when the native library is built and loaded (loads and registers it on first call)."""
    path = library_path()
    if not path.is_file():
        return False
    try:
        _load(str(path))
    except OSError as e:  # built against another torch, or a partial build: run the torch ops instead
        logger.warning("native ops library %s does not load (%s); rebuild it with `make ext`", path, e)
        return False
    return True


def has_device_kernels(device: torch.device | str) -> bool:
    """Whether the loaded library has kernels for ``device``'s type (CUDA kernels exist only in CUDA builds)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "textcraftor::group_norm_silu", key)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> None:
    torch.ops.load_library(path)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("textcraftor::group_norm_silu", "Meta"):
        _register_python_kernels()  # the C++ registrations can outlive a cache_clear (tests hide the library)


def _register_python_kernels() -> None:
    lib = "textcraftor::"
    torch.library.register_fake(lib + "group_norm_silu")(_group_norm_silu_fake)
    torch.library.register_fake(lib + "group_norm_silu_backward")(_group_norm_silu_backward_fake)
    torch.library.register_fake(lib + "cfg_ddim_step")(_cfg_ddim_step_fake)
    torch.library.register_fake(lib + "cfg_ddim_step_backward")(_cfg_ddim_step_backward_fake)


# ---------------------------------------------------------------------------------------------- fake kernels
# Each mirrors its C++ kernel's output shapes, dtypes and memory formats exactly (opcheck compares them).
def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _like_input(x: Tensor) -> Tensor:
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _group_norm_silu_fake(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x))
    return _like_input(x), stats, torch.empty_like(stats)


def _group_norm_silu_backward_fake(grad_out, x, weight, bias, mean, rstd, num_groups, silu):
    affine_dtype = weight.dtype if weight is not None else x.dtype
    dw = x.new_empty((x.shape[1],), dtype=affine_dtype)
    return _like_input(x), dw, torch.empty_like(dw)


def _like_first_if_shared(*ts: Tensor) -> Tensor:
    first = ts[0]
    dense = first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last))
    shared = dense and all(t.stride() == first.stride() for t in ts)
    return torch.empty_like(first) if shared else torch.empty(first.shape, dtype=first.dtype, device=first.device)


def _cfg_ddim_step_fake(x, uncond, cond, *coefs):
    return _like_first_if_shared(x, uncond, cond), _like_first_if_shared(x, uncond, cond)


def _cfg_ddim_step_backward_fake(grad_x_prev, grad_x0, *coefs):
    return tuple(_like_first_if_shared(grad_x_prev, grad_x0) for _ in range(3))


# ---------------------------------------------------------------------------------------------- functional
def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, silu: bool = True) -> Tensor:
    """``F.silu(F.group_norm(...))`` (``silu=False``: the plain GroupNorm) as one native op. x: (N, C, *)."""
    return torch.ops.textcraftor.group_norm_silu(x, weight, bias, int(num_groups), float(eps), bool(silu))[0]


def group_norm_silu_ref(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                        silu: bool) -> Tensor:
    """The eager torch ops the native one replaces."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def cfg_ddim_step(x: Tensor, uncond: Tensor, cond: Tensor, guidance_scale: float, sqrt_alpha: float,
                  sqrt_one_minus_alpha: float, sqrt_alpha_prev: float, direction: float,
                  prediction_type: str) -> tuple[Tensor, Tensor]:
    """Guided model output ``uncond + s (cond - uncond)``, then ``sampler.ddim_update``'s step (no noise) with a
    ``sampler.DDIMStep``'s coefficients: returns (x_prev, x0). Mixed dtypes (fp32 latents, a bf16 UNet's
    outputs) compute in the promoted dtype, as the torch path does."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the fused CFG-DDIM step supports prediction_type {' or '.join(PREDICTION_TYPES)}, "
                         f"got {prediction_type!r}; use ops.backend=torch for it")
    dtype = torch.promote_types(x.dtype, torch.promote_types(uncond.dtype, cond.dtype))
    return torch.ops.textcraftor.cfg_ddim_step(
        x.to(dtype), uncond.to(dtype), cond.to(dtype), float(guidance_scale), float(sqrt_alpha),
        float(sqrt_one_minus_alpha), float(sqrt_alpha_prev), float(direction), prediction_type == "v_prediction")


# ---------------------------------------------------------------------------------------------- module
class NativeGroupNorm(FusedGroupNorm):
    """Drop-in ``nn.GroupNorm`` (same ``weight`` / ``bias`` state_dict keys) on the native op, optional SiLU."""

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
