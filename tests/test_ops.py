"""ops/backend.py: backend choice and the Triton swaps into real diffusers modules, checked against stock diffusers.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
"""
import copy

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D

from tests.kernels.tolerance import assert_close_to_ref
from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import Trainer
from textcraftor_fast.models.tiny_random import TINY_UNET, TINY_VAE
from textcraftor_fast.ops import backend as ops, native
from textcraftor_fast.ops.backend import apply_ops, resolve_backend, swap_groupnorm_silu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_auto_backend_is_torch_without_cuda_and_explicit_triton_needs_a_gpu(monkeypatch, hide_native_library):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="ops.backend='triton' needs a CUDA device"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="auto, torch, triton, cpp"):
        resolve_backend("cuda", "cpu")


def test_bad_backend_in_config_names_the_choices():
    with pytest.raises(ValueError, match="ops.backend"):
        load_config("configs/tiny_random.toml", ["ops.backend=tritonn"])


def _run_block(block, x, temb, dout):
    x = x.clone().requires_grad_(True)
    temb = None if temb is None else temb.clone().requires_grad_(True)
    out = block(x, temb)
    out.backward(dout)
    grads = {f"d{n}": p.grad for n, p in block.named_parameters()}
    return {"out": out.detach(), "dx": x.grad, **({} if temb is None else {"dtemb": temb.grad}), **grads}


needs_native = pytest.mark.skipif(not native.has_device_kernels(DEVICE),
                                  reason=f"native library not built (`make ext`) or without {DEVICE} kernels")
# Triton on CPU is its interpreter: the sampler test below takes about 1.5 minutes there (one grad step).
BACKENDS = [pytest.param("triton", marks=[] if torch.cuda.is_available() else pytest.mark.slow(minutes=2)),
            pytest.param("cpp", marks=needs_native)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["default", "scale_shift", "group", "up", "down"])
def test_fused_resnet_block_matches_diffusers(kind, backend):
    # 12 -> 18 channels in 6 groups: 2 and 3 channels per group (not powers of two: masked lanes).
    # "group" is the VAE's setting: no time embedding at all.
    kw = dict(in_channels=12, out_channels=18, temb_channels=None if kind == "group" else 16, groups=6, eps=1e-5,
              time_embedding_norm=kind if kind in ("scale_shift", "group") else "default",
              up=kind == "up", down=kind == "down")
    torch.manual_seed(0)
    ref = ResnetBlock2D(**kw).double()
    stock, fused = copy.deepcopy(ref).to(DEVICE), copy.deepcopy(ref).to(DEVICE)
    fused_norms, plain = swap_groupnorm_silu(fused, backend)
    assert (fused_norms, plain) == ((1, 1) if kind == "scale_shift" else (2, 0))
    assert type(fused).__name__ == "FusedResnetBlock2D" and fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    temb = None if kind == "group" else torch.randn(2, 16, dtype=torch.float64)
    to = lambda t: None if t is None else t.float().to(DEVICE)  # noqa: E731
    hw = {"up": 12, "down": 3}.get(kind, 6)
    dout = torch.randn(2, 18, hw, hw, dtype=torch.float64)
    expected = _run_block(ref, x, temb, dout)
    got = _run_block(fused.float(), to(x), to(temb), to(dout))
    same = _run_block(stock.float(), to(x), to(temb), to(dout))
    assert expected.keys() == got.keys()
    for name in expected:
        assert_close_to_ref(name, got[name].cpu(), expected[name], same[name].cpu(), atol=1e-4)


def test_swaps_in_tiny_unet_and_vae_count_what_the_architecture_holds():
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
    keys = {"unet": set(unet.state_dict()), "vae": set(vae.state_dict())}
    ptrs = {p.data_ptr() for p in list(unet.parameters()) + list(vae.parameters())}
    counts = apply_ops({"unet": unet, "vae": vae}, "triton", DEVICE)
    # By hand, from TINY_UNET/TINY_VAE (layers_per_block=1, two levels):
    #  UNet: resnets 2 down + 2 mid + 2x2 up = 8 -> 16 norms fused, + conv_norm_out = 17;
    #        transformers: 1 down + 1 mid + 2 up = 4 -> 4 plain GroupNorms, 8 attentions, 4 GEGLUs.
    #  VAE:  resnets encoder 2 + 2 mid, decoder 2 mid + 2x2 up = 10 -> 20 fused, + 2 conv_norm_out = 22;
    #        2 mid-block attentions (one 32-dim head each), each with a plain group_norm.
    assert counts == {"GroupNorm+SiLU": 17 + 22, "GroupNorm": 4 + 2, "attention": 8 + 2, "GEGLU": 4,
        "small-map GEMM conv": 0}
    assert set(unet.state_dict()) == keys["unet"] and set(vae.state_dict()) == keys["vae"]
    assert {p.data_ptr() for p in list(unet.parameters()) + list(vae.parameters())} == ptrs  # shared, not copied
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in list(unet.modules()) + list(vae.modules()))


def test_auto_keeps_sdpa_attention_and_explicit_choices_win(monkeypatch, hide_native_library):
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (9, 0))  # a Hopper card, as measured

    def counts(backend, device, attention="auto"):
        torch.manual_seed(0)
        return apply_ops({"unet": UNet2DConditionModel(**TINY_UNET)}, backend, device, attention)

    # 'auto' on a CUDA device: Triton norms and GEGLU, attention left to SDPA (faster on H100).
    # (Only module swaps happen here, no forward: the "cuda" device need not exist.)
    assert counts("auto", "cuda") == {"GroupNorm+SiLU": 17, "GroupNorm": 4, "attention": 0, "GEGLU": 4,
        "small-map GEMM conv": 0}
    assert counts("auto", "cuda", "triton")["attention"] == 8
    assert counts("triton", DEVICE, "sdpa")["attention"] == 0
    assert counts("torch", DEVICE, "triton") == {"GroupNorm+SiLU": 0, "GroupNorm": 0, "attention": 8, "GEGLU": 0,
        "small-map GEMM conv": 0}
    assert counts("auto", "cpu") == {"GroupNorm+SiLU": 0, "GroupNorm": 0, "attention": 0, "GEGLU": 0,
        "small-map GEMM conv": 0}
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (7, 5))  # pre-Ampere: no bf16 kernels
    assert counts("auto", "cuda") == {"GroupNorm+SiLU": 0, "GroupNorm": 0, "attention": 0, "GEGLU": 0,
        "small-map GEMM conv": 0}
    with pytest.raises(ValueError, match="ops.attention='flash' is not one of auto, sdpa, triton"):
        counts("auto", "cpu", "flash")


def _encoder_grads(backend: str, tmp_path, grad_steps: int) -> dict[str, torch.Tensor]:
    cfg = load_config("configs/tiny_random.toml", [
        f"sampler.num_steps={grad_steps + 1}", f"sampler.grad_steps={grad_steps}", "sampler.checkpoint=step", "sampler.checkpoint_vae=true",
        "model.resolution=16", "train.batch_size=1", "train.progress_bar=false", "data.max_prompts=2",
        f"ops.backend={backend}", "ops.tf32=false",  # the Trainer sets the TF32 flags from ops.tf32 (default on)
        f"train.device={DEVICE}",
        f'output.dir="{tmp_path / backend}"'])
    trainer = Trainer(cfg)
    loss, _ = trainer.forward(["a red circle above a blue square"], grad_steps)
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.text_encoder.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gives_the_text_encoder_gradient_of_the_torch_backend(tmp_path, backend):
    """The real sampler (2 checkpointed grad steps, checkpointed VAE decode) on tiny UNet + VAE; cpp also runs
    the sampler's fused CFG-DDIM step. Triton's CPU interpreter gets one grad step: the kernels are the same in
    every call, and two cost 3.5 of make test's minutes."""
    grad_steps = 1 if backend == "triton" and DEVICE == "cpu" else 2
    # On a GPU both runs must be true fp32: TF32 convs/matmuls alone move this gradient by ~1e-3 relative.
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ref, ours = _encoder_grads("torch", tmp_path, grad_steps), _encoder_grads(backend, tmp_path, grad_steps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert ref.keys() == ours.keys() and len(ref) > 0
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 0
    for name in ref:
        err = (ours[name] - ref[name]).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: max |{backend} - torch| = {err:.3e} (grad scale {scale:.3e})"
