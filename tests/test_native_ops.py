"""The native ops (csrc/, `make ext`) against the torch reference, and the torch fallback without the library.

The sampler with the fused CFG-DDIM step is checked in tests/test_sampler_proofs.py (fused=True), the cpp
backend's swaps in tests/test_ops.py. Op tests skip with a reason when the library is not built (`make test` builds it when a C++ compiler and CMake
exist); the fallback tests always run: they hide the library's file from the loader.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.tolerance import assert_close_to_ref
from tests.test_sampler_proofs import SD15_SCHEDULER
from textcraftor_fast.ops import native
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes
from textcraftor_fast.ops.backend import apply_ops, resolve_backend
from textcraftor_fast.sampler import ddim_update, make_schedule

needs_native = pytest.mark.skipif(not native.available(),
                                  reason="native library not built: run `make ext` (make test does when it can)")

# Groups of 3 channels and 35 positions (vector tails), and a long row (5184 > the 4096-element flush block).
SHAPES = [((2, 12, 5, 7), 4), ((1, 8, 72, 72), 2)]


def _inputs(shape, dtype, channels_last, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)  # nonzero mean: shift test
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy):
    """fn's output and every gradient (x, weight, bias) for grad_output dy."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(dy)
    return {"out": out.detach(), "dx": leaves[0].grad,
            **({"dweight": leaves[1].grad, "dbias": leaves[2].grad} if w is not None else {})}


# ---------------------------------------------------------------------------------------------- GroupNorm+SiLU
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu,affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=["small", "long_rows"])
def test_group_norm_silu_matches_torch(shape, groups, silu, affine, channels_last, dtype):
    x, w, b, dy = _inputs(shape, dtype, channels_last, affine)
    ours_fn = lambda x_, w_, b_: native.group_norm_silu(x_, groups, w_, b_, 1e-5, silu)  # noqa: E731
    ref_fn = lambda x_, w_, b_: native.group_norm_silu_ref(x_, groups, w_, b_, 1e-5, silu)  # noqa: E731
    ours = _run(ours_fn, x, w, b, dy)
    ref64 = _run(ref_fn, *(t.double() if t is not None else None for t in (x, w, b, dy)))
    same = _run(ref_fn, x, w, b, dy)  # eager torch in the same dtype (the bar for bf16)
    assert ours["out"].dtype == dtype
    assert ours["out"].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert ours.keys() == ref64.keys()
    # Weight/bias gradients sum over N x H x W: their fp32 rounding grows with that count.
    scale = {"dweight": shape[0] * shape[2] * shape[3] ** 0.5, "dbias": shape[0] * shape[2] * shape[3] ** 0.5}
    for name in ours:
        assert_close_to_ref(name, ours[name], ref64[name], same[name], atol=1e-5 * scale.get(name, 10))


@needs_native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu_gradcheck_float64(channels_last):
    x, w, b, _ = _inputs((2, 6, 3, 4), torch.float64, channels_last, affine=True)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    for silu in (True, False):
        assert torch.autograd.gradcheck(lambda x_, w_, b_: native.group_norm_silu(x_, 3, w_, b_, 1e-5, silu), leaves)


def test_group_norm_silu_saves_only_input_affine_and_stats():
    """Exact bytes autograd keeps: eager torch also keeps the normalised activation for SiLU's backward."""
    if not native.available():
        pytest.skip("native library not built: run `make ext`")
    x, w, b, _ = _inputs((2, 32, 16, 16), torch.float32, False, affine=True)
    x, w, b = x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    ours, _ = saved_tensor_bytes(lambda: native.group_norm_silu(x, 8, w, b, 1e-5, True))
    eager, _ = saved_tensor_bytes(lambda: native.group_norm_silu_ref(x, 8, w, b, 1e-5, True))
    stats = 2 * 2 * 8 * 4  # (N, G) fp32 mean and rstd
    assert ours == x.nbytes + w.nbytes + b.nbytes + stats
    assert eager - ours == x.nbytes - b.nbytes  # eager: + the GroupNorm output (silu's input), - the bias


# ---------------------------------------------------------------------------------------------- CFG + DDIM step
STEP = make_schedule(SD15_SCHEDULER, 10).steps[3]


def _cfg_ddim_ref(x, u, c, scale, prediction_type):
    return ddim_update(STEP, x, u + scale * (c - u), prediction_type)  # the sampler's torch path


def _native_step(x, u, c, scale, prediction_type):
    return native.cfg_ddim_step(x, u, c, scale, STEP.sqrt_alpha, STEP.sqrt_one_minus_alpha, STEP.sqrt_alpha_prev,
                                STEP.direction, prediction_type)


def _run_step(fn, x, u, c, g_prev, g_x0, prediction_type):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, u, c)]
    x_prev, x0 = fn(*leaves, 7.5, prediction_type)
    torch.autograd.backward([x_prev, x0], [g_prev, g_x0])
    return {"x_prev": x_prev.detach(), "x0": x0.detach(), "dx": leaves[0].grad, "duncond": leaves[1].grad,
            "dcond": leaves[2].grad}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cfg_ddim_step_matches_the_sampler_torch_path(prediction_type, dtype):
    g = torch.Generator().manual_seed(0)
    x, u, c, g_prev, g_x0 = (torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64) for _ in range(5))
    ours = _run_step(_native_step, *(t.to(dtype) for t in (x, u, c, g_prev, g_x0)), prediction_type)
    ref64 = _run_step(_cfg_ddim_ref, x, u, c, g_prev, g_x0, prediction_type)
    same = _run_step(_cfg_ddim_ref, *(t.to(dtype) for t in (x, u, c, g_prev, g_x0)), prediction_type)
    for name in ref64:
        assert ours[name].dtype == dtype
        assert_close_to_ref(name, ours[name], ref64[name], same[name], atol=2e-5)


@needs_native
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cfg_ddim_step_gradcheck_float64(prediction_type):
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *t: _native_step(*t, 7.5, prediction_type), leaves)


@needs_native
def test_cfg_ddim_step_promotes_mixed_dtypes_like_the_torch_path():
    """fp32 latents with a bf16 UNet's outputs (mixed precision): the result is fp32 as in the torch path, and
    closer to the fp64 truth (the torch path rounds the guided output to bf16 before promoting; we do not)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 5, 5, generator=g, requires_grad=True)
    u, c = (torch.randn(1, 4, 5, 5, generator=g).bfloat16().requires_grad_(True) for _ in range(2))
    x_prev, _ = _native_step(x, u, c, 7.5, "epsilon")
    torch_mixed, _ = _cfg_ddim_ref(x, u, c, 7.5, "epsilon")
    ref64, _ = _cfg_ddim_ref(x.double(), u.double(), c.double(), 7.5, "epsilon")
    assert x_prev.dtype == torch_mixed.dtype == torch.float32
    assert_close_to_ref("x_prev", x_prev, ref64, atol=1e-5)
    assert (torch_mixed - ref64).abs().max() > 100 * (x_prev - ref64).abs().max()
    x_prev.sum().backward()
    assert (x.grad.dtype, u.grad.dtype, c.grad.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- the torch.library contract
def _opcheck_samples():
    x, w, b, dy = _inputs((2, 6, 3, 4), torch.float32, False, affine=True)
    xcl = x.contiguous(memory_format=torch.channels_last)
    stats = torch.ops.textcraftor.group_norm_silu(x, w, b, 3, 1e-5, True)
    coefs = (7.5, STEP.sqrt_alpha, STEP.sqrt_one_minus_alpha, STEP.sqrt_alpha_prev, STEP.direction)
    u, c = torch.randn_like(x), torch.randn_like(x)
    rg = lambda *ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    return [
        (torch.ops.textcraftor.group_norm_silu.default, (*rg(x, w, b), 3, 1e-5, True)),
        (torch.ops.textcraftor.group_norm_silu.default, (*rg(xcl), None, None, 3, 1e-5, False)),
        (torch.ops.textcraftor.group_norm_silu.default, (*rg(x.bfloat16(), w.bfloat16(), b.bfloat16()), 2, 1e-5, True)),
        (torch.ops.textcraftor.group_norm_silu_backward.default, (dy, x, w, b, stats[1], stats[2], 3, True)),
        (torch.ops.textcraftor.cfg_ddim_step.default, (*rg(x, u, c), *coefs, False)),
        (torch.ops.textcraftor.cfg_ddim_step.default, (*rg(xcl, u, c), *coefs, True)),  # mixed layouts
        (torch.ops.textcraftor.cfg_ddim_step_backward.default, (dy, u, *coefs, True)),
    ]


@needs_native
def test_opcheck():
    for op, args in _opcheck_samples():
        torch.library.opcheck(op, args)


@needs_native
def test_torch_compile_fullgraph_traces_the_ops():
    torch._dynamo.reset()

    def fn(x, w, b, u, c):
        h = native.group_norm_silu(x, 3, w, b, 1e-5, True)
        x_prev, x0 = _native_step(h, u, c, 7.5, "v_prediction")
        return x_prev * 2 + x0

    x, w, b, _ = _inputs((2, 6, 3, 4), torch.float32, False, affine=True)
    u, c = torch.randn_like(x), torch.randn_like(x)
    args = [t.requires_grad_(True) for t in (x, w, b, u, c)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # graph capture + AOT autograd, no codegen
    got, want = compiled(*args), fn(*args)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), args)
    g_want = torch.autograd.grad(want.sum(), args)
    for a, b_ in zip(g_got, g_want):
        torch.testing.assert_close(a, b_)


# ---------------------------------------------------------------------------------------------- backend choice
def _tiny_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from textcraftor_fast.models.tiny_random import TINY_UNET, TINY_VAE

    torch.manual_seed(0)
    return {"unet": UNet2DConditionModel(**TINY_UNET), "vae": AutoencoderKL(**TINY_VAE)}


@needs_native
def test_cpp_backend_swaps_every_groupnorm_and_shares_parameters(caplog):
    models = _tiny_models()
    keys = {name: set(m.state_dict()) for name, m in models.items()}
    ptrs = {p.data_ptr() for m in models.values() for p in m.parameters()}
    assert resolve_backend("auto", "cpu") == "cpp"
    with caplog.at_level(logging.INFO, logger="textcraftor_fast.ops.backend"):
        counts = apply_ops(models, "cpp", "cpu")
    # As tests/test_ops.py counts them for triton: 17 + 22 fused, 4 + 2 plain; cpp swaps no attention or GEGLU.
    assert counts == {"GroupNorm+SiLU": 17 + 22, "GroupNorm": 4 + 2, "attention": 0, "GEGLU": 0,
        "small-map GEMM conv": 0}
    assert {name: set(m.state_dict()) for name, m in models.items()} == keys
    assert {p.data_ptr() for m in models.values() for p in m.parameters()} == ptrs
    assert [r.getMessage() for r in caplog.records] == [
        "ops: cpp GroupNorm+SiLU x39, GroupNorm x6 (in unet, vae); attention: SDPA; sampler: native CFG-DDIM step"]


def test_without_the_library_auto_runs_torch_and_says_so(hide_native_library, caplog):
    """The fallback: no library file -> torch ops, one info line; asking for cpp by name is a clear error."""
    assert not native.available()
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match=r"ops.backend='cpp' but the native library is not built .*make ext"):
        resolve_backend("cpp", "cpu")
    models = _tiny_models()
    with caplog.at_level(logging.INFO, logger="textcraftor_fast.ops.backend"):
        counts = apply_ops(models, "auto", "cpu")
    assert set(counts.values()) == {0}
    assert not any(isinstance(m, native.NativeGroupNorm) for model in models.values() for m in model.modules())
    assert [r.getMessage() for r in caplog.records] == [
        "ops: torch (auto: cpu device; native library not built: `make ext` builds it)"]


def test_without_the_library_the_trainer_runs_the_torch_sampler(hide_native_library, tmp_path):
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import Trainer

    cfg = load_config("configs/tiny_random.toml", [
        "sampler.num_steps=2", "sampler.grad_steps=1", "model.resolution=16", "train.batch_size=1",
        "train.progress_bar=false", "data.max_prompts=2", "train.device=cpu", f'output.dir="{tmp_path}"'])
    trainer = Trainer(cfg)
    assert not trainer.fused_step
    loss, _ = trainer.forward(["a red circle"], 1)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trainer.params if p.grad is not None)


def test_group_norm_silu_ref_is_eager_torch():
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(native.group_norm_silu_ref(x, 2, None, None, 1e-5, True), F.silu(F.group_norm(x, 2)))
