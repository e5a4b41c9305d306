"""Flash attention vs the eager softmax(q k^T * scale) v: output and dq, dk, dv with a random grad_output.

On CPU the kernels run in Triton's interpreter, so shapes are tiny and blocks are forced to 16 x 16: every
case has several query and key blocks with ragged last blocks, a masked head dim (40 -> 64, 8 -> 16) and
the transposed (B, N, H, D) -> (B, H, N, D) views diffusers' AttnProcessor2_0 passes. On CUDA the same
checks run at the SD1.5 UNet shapes in bf16 with the real tiles.
"""
import math

import pytest
import torch

from tests.kernels.tolerance import assert_close_to_ref
from textcraftor_fast.kernels.attention import (FlashAttention, _attn_forward, _Tile, _Tiles, attention_ref,
                                                flash_attention, supports)
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SMALL = _Tiles(fwd=_Tile(16, 16), dkdv=_Tile(16, 16), dq=_Tile(16, 16))
SMALL_SPLIT = SMALL._replace(kv_splits=2)  # dK/dV over two query splits: the fp32 partial-sum path


def _inputs(b: int, h: int, nq: int, nk: int, d: int, seed: int = 0):
    """float64 q, k, v as (B, H, N, D) transposed views of (B, N, H, D) projections, and a grad_output."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64).transpose(1, 2) for n in (nq, nk, nk))
    dout = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _fwd_bwd(fn, q, k, v, dout, dtype, device=DEVICE) -> dict[str, torch.Tensor]:
    # .to() of a transposed view keeps its strides: the kernel sees the same layout diffusers gives it.
    ins = [t.to(device, dtype).detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*ins)
    out.backward(dout.to(device, dtype))
    return {"out": out.detach(), "dq": ins[0].grad, "dk": ins[1].grad, "dv": ins[2].grad}


def _check(dtype, b, h, nq, nk, d, tiles=None, scale=None, device=DEVICE) -> None:
    q, k, v, dout = _inputs(b, h, nq, nk, d)
    assert q.stride()[2:] == (h * d, 1)  # rows h*d apart: the (B, N, H, D) layout
    ref = _fwd_bwd(lambda *t: attention_ref(*t, scale=scale), q, k, v, dout, torch.float64, device)
    same = _fwd_bwd(lambda *t: attention_ref(*t, scale=scale), q, k, v, dout, dtype, device)
    got = _fwd_bwd(lambda *t: flash_attention(*t, scale=scale, _tiles=tiles), q, k, v, dout, dtype, device)
    for name in ref:
        assert_close_to_ref(f"{dtype} {name}", got[name].cpu(), ref[name].cpu(), same[name].cpu(), ATOL[dtype])


# (B, H, Nq, Nk, D, tiles): cross-attention to 77 text tokens at D = 40 (BLOCK_D 64 masked, 5 key blocks, the
# last one 13 wide); ragged self-attention at D = 8 and 16; the default (GPU) tiles once.
CASES = {
    "cross_d40": (1, 2, 20, 77, 40, SMALL_SPLIT),
    "self_d8": (1, 2, 37, 37, 8, SMALL),
    "self_d16_b2": (2, 2, 37, 37, 16, SMALL),
    "cross_d40_default_tiles": (1, 2, 20, 77, 40, None),
    "self_d64": (1, 2, 40, 40, 64, SMALL_SPLIT),
    "self_d80": (1, 2, 33, 33, 80, SMALL),  # BLOCK_D 128
    "cross_d160_default_tiles": (1, 2, 20, 77, 160, None),  # BLOCK_D 256
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    _check(dtype, *CASES[case])


def test_custom_scale_and_head_dim_4():
    _check(torch.float32, 1, 2, 19, 33, 4, SMALL, scale=0.3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: inf/NaN in rows of padded keys, never stored
def test_very_negative_scores_stay_finite():
    # Every score near -100: exp(-lse) overflows fp32, so the padded keys of the last block (k = 0) must be
    # masked out of dq's probabilities, not merely multiplied by k = 0 (inf * 0 = NaN).
    q, k, v, dout = _inputs(1, 2, 20, 77, 16)
    q, k = q * 0.1 + 5.0, k * 0.1 - 5.0
    ref = _fwd_bwd(attention_ref, q, k, v, dout, torch.float64)
    got = _fwd_bwd(lambda *t: flash_attention(*t, _tiles=SMALL), q, k, v, dout, torch.float32)
    for name in ref:
        assert_close_to_ref(name, got[name].cpu(), ref[name].cpu())


def test_only_kv_need_grad():
    # TextCraftor's cross-attention: gradients flow to the text tokens (k, v); here q is a constant.
    q, k, v, dout = _inputs(1, 2, 20, 77, 40)
    q = q.float().to(DEVICE)
    k32, v32 = (t.float().to(DEVICE).requires_grad_(True) for t in (k, v))
    flash_attention(q, k32, v32, _tiles=SMALL).backward(dout.float().to(DEVICE))
    k64, v64 = (t.clone().requires_grad_(True) for t in (k, v))
    attention_ref(q.cpu().double(), k64, v64).backward(dout)
    assert_close_to_ref("dk", k32.grad.cpu(), k64.grad)
    assert_close_to_ref("dv", v32.grad.cpu(), v64.grad)


def test_forward_saves_logsumexp_not_scores():
    b, h, nq, nk, d = 1, 2, 20, 77, 40
    q, k, v, _ = _inputs(b, h, nq, nk, d)
    q, k, v = (t.float().to(DEVICE) for t in (q, k, v))
    out, lse = _attn_forward(q, k, v, 0.25, SMALL)
    assert lse.shape == (b, h, nq) and lse.dtype == torch.float32
    expected = torch.logsumexp(0.25 * q.double() @ k.double().transpose(-1, -2), dim=-1)
    assert (lse.double() - expected).abs().max().item() < 1e-5
    assert out.transpose(1, 2).is_contiguous()  # a (B, Nq, H, D) buffer: the caller's reshape is free

    ins = [t.detach().requires_grad_(True) for t in (q, k, v)]
    nbytes, out = saved_tensor_bytes(lambda: flash_attention(*ins, _tiles=SMALL))
    inputs = sum(t.untyped_storage().nbytes() for t in ins)
    assert nbytes == inputs + out.numel() * 4 + b * h * nq * 4  # q, k, v, out, fp32 lse: nothing Nq x Nk


def test_module_and_supports():
    q, k, v, _ = _inputs(1, 2, 20, 77, 40)
    q, k, v = (t.float().to(DEVICE) for t in (q, k, v))
    module = FlashAttention()
    assert module.state_dict() == {} and not list(module.parameters())
    expected = flash_attention(q, k, v)
    assert torch.equal(module(q, k, v), expected)
    assert (expected.cpu().double() - attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double())
            ).abs().max() < 1e-5
    assert supports(40, torch.bfloat16) and supports(160, torch.float16) and supports(256, torch.float32)
    assert not supports(512, torch.bfloat16) and not supports(64, torch.float64)


def _qkv(nq=8, nk=8, d=16, dtype=torch.float32):
    return tuple(torch.randn(1, 2, n, d, device=DEVICE, dtype=dtype) for n in (nq, nk, nk))


@pytest.mark.parametrize("make,match", [
    (lambda: _qkv(d=257), "head dim 257 is over the limit of 256"),
    (lambda: (torch.randn(1, 2, 8, 16, device=DEVICE),) * 2 + (torch.randn(1, 2, 9, 16, device=DEVICE),),
     "must have the same shape"),
    (lambda: (torch.randn(1, 2, 8, 16, device=DEVICE),) + (torch.randn(1, 3, 8, 16, device=DEVICE),) * 2,
     "must share B, H and D"),
    (lambda: (torch.randn(2, 8, 16, device=DEVICE),) * 3, "must be a 4-D"),
    (lambda: _qkv()[:2] + (_qkv()[2].half(),), "dtypes .* must be one and the same"),
    (lambda: _qkv(dtype=torch.float64), "must be one and the same of"),
    (lambda: (torch.randn(1, 2, 16, 8, device=DEVICE).transpose(-1, -2),) + _qkv()[1:], "contiguous last dim"),
    (lambda: _qkv(nk=0), "0 keys"),
])
def test_rejects_bad_inputs(make, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*make())


@pytest.mark.parametrize("kwargs,match", [
    ({"attn_mask": torch.zeros(8, 8)}, "attn_mask is not supported"),
    ({"dropout_p": 0.1}, "dropout_p=0.1 is not supported"),
    ({"is_causal": True}, "is_causal=True is not supported"),
    ({"scale": math.inf}, "scale inf must be finite"),
])
def test_rejects_unsupported_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*_qkv(), **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from textcraftor_fast.kernels import attention

    monkeypatch.setattr(attention, "_interpreting", lambda: False)  # as if TRITON_INTERPRET were unset
    with pytest.raises(ValueError, match="need CUDA .* torch backend .* TRITON_INTERPRET=1"):
        flash_attention(*(t.cpu() for t in _qkv()))


# ---------------------------------------------------------------------------------------------- GPU, SD1.5
# (Nq, Nk, D): UNet self-attention at 64^2/32^2/16^2/8^2 latents (8 heads), cross-attention to 77 tokens.
SD15 = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160), (1024, 1024, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nq,nk,d", SD15)
def test_sd15_shapes_bf16(nq, nk, d):
    q, k, v, dout = (t.cuda() for t in _inputs(2, 8, nq, nk, d))
    ref = _fwd_bwd(lambda *t: attention_ref(*t, upcast=True), q, k, v, dout, torch.float32, "cuda")
    same = _fwd_bwd(attention_ref, q, k, v, dout, torch.bfloat16, "cuda")
    got = _fwd_bwd(flash_attention, q, k, v, dout, torch.bfloat16, "cuda")
    for name in ref:
        assert_close_to_ref(f"bf16 {name} {nq}x{nk} d{d}", got[name], ref[name], same[name], ATOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_on_gpu_is_ieee_accurate():
    _check(torch.float32, 2, 8, 1024, 77, 40, None, device="cuda")
