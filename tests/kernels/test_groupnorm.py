"""GroupNorm(+SiLU) kernel vs torch: forward and every gradient, with a random grad_output.

CPU runs go through Triton's interpreter (~ms per program instance), so shapes are tiny and ``_chunk_s`` /
``_block_s`` force several chunks per group and several tiles per chunk, with a ragged last chunk: the
spatial split, the partials combination and the masked lanes (3 channels per group) are all exercised.
GPU tests (``-m gpu``) run the SD1.5 UNet / VAE shapes in bf16.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.tolerance import assert_close_to_ref
from textcraftor_fast.kernels.groupnorm import TritonGroupNorm, _plan, group_norm, group_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU, the compiled kernels on GPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last
# (2, 6, 5, 6): 2 groups of 3 channels, S = 30; chunk 12 / tile 4 -> 3 chunks per group (the last one ragged:
# positions 24..29 then an empty tile), 3 tiles per chunk.
SHAPE, GROUPS, CHUNK, BLOCK = (2, 6, 5, 6), 2, 12, 4


def _torch_gn(c: int, groups: int, affine: bool) -> torch.nn.GroupNorm:
    gn = torch.nn.GroupNorm(groups, c, eps=1e-5, affine=affine)
    if affine:  # away from the (1, 0) init so a dropped weight or bias term shows
        with torch.no_grad():
            gn.weight.normal_(1.0, 0.5)
            gn.bias.normal_(0.0, 0.5)
    return gn


def _fwd_bwd(fn, x, w, b, dy, need=(True, True, True)):
    """fn's output and the grads of (x, w, b) for grad_output dy; None for inputs that need no grad."""
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None for t, r in zip((x, w, b), need)]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad if t is not None and r else None for t, r in zip(leaves, need)]


def _compare(shape, dtype, groups, *, silu=True, affine=True, fmt=torch.contiguous_format, dy_fmt=None,
             chunk_s=CHUNK, block_s=BLOCK, need=(True, True, True), atol=1e-4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gn = _torch_gn(shape[1], groups, affine)
    x32 = (torch.randn(shape, generator=gen) * 2.0 + 0.5).to(memory_format=fmt) if len(shape) == 4 else \
        torch.randn(shape, generator=gen) * 2.0 + 0.5
    dy32 = torch.randn(shape, generator=gen)
    if len(shape) == 4:
        dy32 = dy32.contiguous(memory_format=dy_fmt or fmt)
    w32 = gn.weight.detach() if affine else None
    b32 = gn.bias.detach() if affine else None
    cast = (lambda t: t.to(DEVICE, dtype) if t is not None else None)
    x, w, b, dy = cast(x32), cast(w32), cast(b32), cast(dy32)

    def ours(x_, w_, b_):
        return group_norm(x_, groups, w_, b_, gn.eps, silu, _chunk_s=chunk_s, _block_s=block_s)

    def ref(x_, w_, b_):
        return group_norm_ref(x_, groups, w_, b_, gn.eps, silu)

    y, grads = _fwd_bwd(ours, x, w, b, dy, need)
    y32, grads32 = _fwd_bwd(ref, *[t.float() if t is not None else None for t in (x, w, b, dy)], need)
    y_same, grads_same = _fwd_bwd(ref, x, w, b, dy, need) if dtype != torch.float32 else (None, [None] * 3)
    assert y.dtype == dtype and y.shape == x.shape
    if len(shape) == 4:
        assert y.is_contiguous(memory_format=fmt), "output must keep the input's memory format"
    assert_close_to_ref("y", y, y32, y_same, atol)
    checked = 0
    for name, g, g32, g_same in zip(("dx", "dweight", "dbias"), grads, grads32, grads_same):
        if g32 is None:
            assert g is None, f"{name}: gradient computed though not required"
            continue
        assert g.dtype == dtype
        assert_close_to_ref(name, g, g32, g_same, atol)
        checked += 1
    assert checked == sum(need[i] and (i == 0 or affine) for i in range(3))


def test_plans():
    """The CPU shapes really split each group; SD shapes fill an H100 (132 SMs) with 2k-16k-element programs."""
    cpu = torch.device("cpu")
    p = _plan(SHAPE[0], GROUPS, SHAPE[1] // GROUPS, SHAPE[2] * SHAPE[3], cpu, CHUNK, BLOCK)
    assert (p.num_chunks, p.tiles, p.block_c, p.block_s) == (3, 3, 4, 4)
    assert _plan(2, 4, 4, 36, cpu).num_chunks == 1  # test_single_chunk_path: the fused single-launch kernels
    for n, c, h, w in [(2, 320, 64, 64), (2, 640, 32, 32), (1, 128, 512, 512), (1, 256, 256, 256), (1, 512, 64, 64)]:
        p = _plan(n, 32, c // 32, h * w, cpu)
        assert n * 32 * p.num_chunks >= 3 * 132, (n, c, h, w, p)
        assert 2048 <= p.chunk_s * c // 32 <= 16384 and p.chunk_s % p.block_s == 0 and p.block_c * p.block_s <= 2048


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "plain"])
def test_chunked_matches_torch(dtype, fmt, silu):
    _compare(SHAPE, dtype, GROUPS, silu=silu, fmt=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_no_affine(fmt):
    _compare(SHAPE, torch.float32, GROUPS, affine=False, fmt=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_single_chunk_path(dtype, fmt):
    """Default plan on a tiny map: one chunk per group, so forward and backward are one fused launch each;
    4 channels per group = BLOCK_C, the unmasked-channel path."""
    _compare((2, 16, 6, 6), dtype, 4, fmt=fmt, chunk_s=None, block_s=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_3d_input(dtype):
    _compare((2, 8, 20), dtype, 4, chunk_s=8, block_s=4)  # 2 channels per group, 3 chunks of 2 tiles


def test_grad_output_in_other_memory_format():
    _compare(SHAPE, torch.float32, GROUPS, fmt=CL, dy_fmt=torch.contiguous_format)


@pytest.mark.parametrize("chunk_s", [CHUNK, None], ids=["chunked", "fused"])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (True, True, False)],
                         ids=["frozen-params", "frozen-input", "no-dbias"])
def test_partial_requires_grad(chunk_s, need):
    """A frozen UNet (only dx) skips the dweight partials; a frozen input skips the dx kernel."""
    _compare(SHAPE, torch.float32, GROUPS, need=need, chunk_s=chunk_s, block_s=BLOCK if chunk_s else None)


def _saved(fn):
    """(total bytes of the distinct storages autograd saved, list of saved tensors) while running fn()."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values()), saved, out


@pytest.mark.parametrize("affine", [True, False])
def test_saves_only_input_params_and_stats(affine):
    n, c, g = 2, 12, 4
    x = torch.randn(n, c, 5, 6, dtype=torch.bfloat16, device=DEVICE).contiguous(memory_format=CL).requires_grad_()
    x.retain_grad()
    m = TritonGroupNorm(g, c, affine=affine, silu=True, dtype=torch.bfloat16, device=DEVICE)
    nbytes, saved, out = _saved(lambda: m(x))
    expected = x.numel() * 2 + (2 * c * 2 if affine else 0) + 2 * n * g * 4  # x, w, b (bf16), mean, rstd (fp32)
    assert nbytes == expected, f"saved {nbytes} bytes, expected x + params + stats = {expected}"
    assert any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in saved), "x itself is saved, no copy"
    assert not any(t.shape == x.shape and t.data_ptr() != x.data_ptr() for t in saved), "no activation-sized save"
    eager_bytes, _, _ = _saved(lambda: F.silu(F.group_norm(x, g, m.weight, m.bias, m.eps)))
    assert nbytes < eager_bytes  # eager keeps the pre-SiLU tensor too
    out.backward(torch.randn_like(out))
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_module_from_torch_shares_parameters():
    gn = _torch_gn(12, 4, True).requires_grad_(False).to(DEVICE)
    m = TritonGroupNorm.from_torch(gn, silu=True)
    assert m.weight is gn.weight and m.bias is gn.bias and not m.weight.requires_grad
    assert list(m.state_dict()) == list(gn.state_dict()) == ["weight", "bias"]
    assert (m.num_groups, m.num_channels, m.eps, m.affine, m.silu) == (4, 12, gn.eps, True, True)
    assert "silu=True" in repr(m)
    x = torch.randn(2, 12, 4, 4, device=DEVICE)
    assert_close_to_ref("module y", m(x), F.silu(gn(x)))
    fresh = TritonGroupNorm(4, 12, device=DEVICE)
    fresh.load_state_dict(gn.state_dict())
    assert torch.equal(fresh.weight, gn.weight)
    plain = TritonGroupNorm.from_torch(torch.nn.GroupNorm(4, 12, affine=False), silu=False)
    assert plain.weight is None and list(plain.state_dict()) == []


def test_errors_name_the_values():
    x = torch.randn(2, 10, 4, 4)
    with pytest.raises(ValueError, match="num_channels 10 is not divisible by num_groups 4"):
        group_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight shape \(12,\) must be \(num_channels,\) = \(10,\)"):
        group_norm(x, 5, torch.ones(12), torch.zeros(10))
    with pytest.raises(ValueError, match=r"bias shape \(10, 1\)"):
        group_norm(x, 5, torch.ones(10), torch.zeros(10, 1))
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        group_norm(torch.randn(2, 10, 2, 2, 2), 5)
    with pytest.raises(ValueError, match="float64 is not supported"):
        group_norm(x.double(), 5)
    with pytest.raises(ValueError, match="not divisible"):
        TritonGroupNorm(3, 10)


# ------------------------------------------------------------------------------------------ GPU, SD shapes
SD_SHAPES = [  # (shape, groups): UNet at batch 2, VAE decoder at batch 1
    ((2, 320, 64, 64), 32), ((2, 640, 32, 32), 32), ((2, 1280, 8, 8), 32),
    ((1, 128, 512, 512), 32), ((1, 512, 64, 64), 32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", SD_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_sd_shapes_bf16_gpu(shape, groups, fmt):
    gen = torch.Generator(device="cuda").manual_seed(0)
    gn = _torch_gn(shape[1], groups, True).cuda()
    x = (torch.randn(shape, device="cuda", generator=gen) * 2 + 0.5).to(torch.bfloat16).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=fmt)
    w, b = gn.weight.detach().to(torch.bfloat16), gn.bias.detach().to(torch.bfloat16)

    def ours(x_, w_, b_):
        return group_norm(x_, groups, w_, b_, gn.eps, True)

    def ref(x_, w_, b_):
        return group_norm_ref(x_, groups, w_, b_, gn.eps, True)

    y, grads = _fwd_bwd(ours, x, w, b, dy)
    y32, grads32 = _fwd_bwd(ref, x.float(), w.float(), b.float(), dy.float())
    y16, grads16 = _fwd_bwd(ref, x, w, b, dy)
    assert y.is_contiguous(memory_format=fmt)
    assert_close_to_ref("y", y, y32, y16, 1e-3)
    for name, g, g32, g16 in zip(("dx", "dweight", "dbias"), grads, grads32, grads16):
        assert_close_to_ref(name, g, g32, g16, 1e-3)
