"""Flash attention (non-causal, no mask, no dropout) for Stable Diffusion 1.5, forward and backward.

``softmax(q k^T * scale) v`` without ever materialising the (Nq, Nk) score matrix: the forward streams key
blocks through an online softmax (Dao et al. 2022, FlashAttention; structure from Triton's tutorial
06-fused-attention) and saves only the per-row logsumexp (fp32, Nq floats per head). Backward recomputes
each probability block from q, k and that logsumexp: ``delta = rowsum(o * do)`` first, then one kernel per
key block for dK/dV (looping over query blocks) and one per query block for dQ (looping over key blocks),
so no atomics and a deterministic result. The trade-off: backward does the q k^T product twice (once per
kernel) to buy O(N) memory and no atomics.

Layout: q, k, v are (B, H, N, D) tensors of any strides with the last dim contiguous -- usually the
transposed views of (B, N, H, D) projections that diffusers' AttnProcessor2_0 passes to SDPA. They are read
in place (never ``.contiguous()``), and the output and gradients are (B, N, H, D) buffers returned as their
``.transpose(1, 2)`` views, so the caller's transpose + reshape back to (B, N, H*D) is free.

Head dims that are not powers of two (SD1.5: 40, 80, 160) run in a BLOCK_D = next_power_of_2(D) tile with
masked loads (``offs_d < D``, other=0): zero columns add nothing to a dot product. When Nk is not a
multiple of the key block (77 text tokens), the last key block masks its scores to -inf.

Limits: head dim <= 256 (one tile holds a whole head; the VAE's single 512-dim head is rejected, see
``supports``); q, k, v share dtype (fp32, fp16, bf16) and device; k and v have the same shape; no
attention mask, dropout or causal masking (SD does not use them). fp32 dots run in IEEE precision (no
TF32), so fp32 matches a float64 reference to ~1e-6. Each (B, H) slice must be addressable with int32
offsets (N * row stride < 2^31); batch/head offsets are int64.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ._host import cdiv, next_pow2

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) so the softmax uses exp2
_LN2 = 0.6931471805599453
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------- jit kernels
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: the interpreter's bf16 dot is wrong, so dot fp32 copies there (the
    operands were already rounded to the input dtype, so the result still matches the GPU's)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_kv(k_base, v_base, stride_kn, stride_vn, start_n, Nk, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) key and value block at start_n; rows past Nk and columns past HEAD_DIM read 0."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=mask, other=0.0)
    return offs_n, k, v


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, Nk, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              MASK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax; MASK_N only for the ragged last block."""
    offs_n, k, v = _load_kv(k_base, v_base, stride_kn, stride_vn, start_n, Nk, HEAD_DIM, BLOCK_N, BLOCK_D)
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST, PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one real key
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["H", "Nq", "Nk"])
def _attn_fwd_kernel(
    Q,  # (B, H, Nq, D) any strides, last dim contiguous
    K,  # (B, H, Nk, D) same
    V,  # (B, H, Nk, D) same
    O,  # (B, H, Nq, D) out: transposed view of a contiguous (B, Nq, H, D) buffer
    LSE,  # (B, H, Nq) fp32 contiguous out: natural-log logsumexp of each scaled score row
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, Nq, Nk, qk_scale,  # qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m  # query blocks of one head are neighbours: they share K/V in L2
    start_m = (pid % num_m) * BLOCK_M
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=q_mask, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, Nk,
                                  qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, False, UPCAST, PRECISION)
    if n_full < Nk:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, n_full, Nk,
                                  qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, True, UPCAST, PRECISION)

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back from log2 to natural units
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit(do_not_specialize=["H", "Nq"])
def _attn_bwd_preprocess_kernel(
    O,  # (B, H, Nq, D) forward output, any strides, last dim contiguous
    DO,  # (B, H, Nq, D) grad of the output, same
    DELTA,  # (B, H, Nq) fp32 contiguous out: rowsum(o * do)
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    H, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "m_per_split"])
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D) any strides, last dim contiguous
    DO,  # (B, H, Nq, D) grad of the output, same
    LSE, DELTA,  # (B, H, Nq) fp32 contiguous: forward logsumexp, rowsum(o * do)
    DK, DV,  # (S, B, H, Nk, D) out: S query splits (fp32 partials summed by the launcher when S > 1)
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,  # DK and DV share strides
    H, Nq, Nk, qk_scale, scale, m_per_split,  # m_per_split: query rows per split, a multiple of BLOCK_M
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_n = tl.cdiv(Nk, BLOCK_N)
    num_s = tl.cdiv(Nq, m_per_split)
    pid = tl.program_id(0)
    split = pid % num_s
    bh = pid // (num_s * num_n)
    start_n = ((pid // num_s) % num_n) * BLOCK_N
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * Nq

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, Nq)
    # Query rows past Nq load q = do = 0 and lse = delta = 0, so their pT is 1 but dpT and every term
    # they feed are exactly 0: no score mask is needed here. Key rows past Nk are never stored.
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Nq
        mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
        s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M) probabilities, transposed
        dv = _dot(p_t.to(do.dtype), do, dv, UPCAST, PRECISION)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST, PRECISION)

    out_off = (split.to(tl.int64) * stride_dks + b * stride_dkb + h * stride_dkh
               + offs_n[:, None] * stride_dkn + offs_d[None, :])
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, start_n, Nk, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             MASK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n, k, v = _load_kv(k_base, v_base, stride_kn, stride_vn, start_n, Nk, HEAD_DIM, BLOCK_N, BLOCK_D)
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST, PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK_N:  # padded keys have k = 0, so p = exp(-lse): finite only by luck, zero it
        p = tl.where(offs_n[None, :] < Nk, p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST, PRECISION)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)


@triton.jit(do_not_specialize=["H", "Nq", "Nk"])
def _attn_bwd_dq_kernel(
    Q, K, V,  # (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D) any strides, last dim contiguous
    DO,  # (B, H, Nq, D) grad of the output, same
    LSE, DELTA,  # (B, H, Nq) fp32 contiguous: forward logsumexp, rowsum(o * do)
    DQ,  # (B, H, Nq, D) out: transposed view of a contiguous (B, Nq, H, D) buffer
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, Nq, Nk, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Nq
    mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0)
    row_base = bh.to(tl.int64) * Nq
    lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, start_n, Nk, qk_scale,
                      HEAD_DIM, BLOCK_N, BLOCK_D, False, UPCAST, PRECISION)
    if n_full < Nk:
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, n_full, Nk, qk_scale,
                      HEAD_DIM, BLOCK_N, BLOCK_D, True, UPCAST, PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
class _Tile(NamedTuple):
    block_m: int  # query rows per block
    block_n: int  # key rows per block
    num_warps: int = 4
    num_stages: int = 2


class _Tiles(NamedTuple):
    fwd: _Tile  # program = one query block, loops over key blocks
    dkdv: _Tile  # program = one key block (x query split), loops over query blocks
    dq: _Tile  # program = one query block, loops over key blocks
    kv_splits: int | None = None  # query splits of the dK/dV grid; None = enough programs to fill the GPU


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))  # tl.dot needs K >= 16 for 16-bit operands


@functools.lru_cache(maxsize=64)
def _default_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> _Tiles:
    """Fixed per-head-dim tiles (no autotune: compile time matters more than the last few percent).

    The fp32 accumulators (acc; dk + dv; dq) are BLOCK x BLOCK_D, so wider heads take smaller row blocks and
    more warps. First picked from an offline sm_90 compile (registers, spills), then set from the timing
    sweep on an H100 (benchmarks/gpu_attention_sweep.py, results in benchmarks/results/): backward at D=40
    1.46 -> 1.00 ms with 4-warp tiles, D=160 forward 0.043 -> 0.019 ms and backward 0.34 -> 0.27 ms.
    """
    block_d = _block_d(head_dim)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units and spill at any tile: keep them small
        t = _Tile(32, 32, 8, 2) if block_d <= 64 else _Tile(16, 16, 4, 2)
        return _Tiles(fwd=t, dkdv=t, dq=t)
    if block_d <= 64:  # D = 40, 64 and the small test dims
        return _Tiles(fwd=_Tile(128, 64, 4, 3), dkdv=_Tile(32, 128, 4, 3), dq=_Tile(128, 32, 4, 3))
    if block_d <= 128:  # D = 80
        return _Tiles(fwd=_Tile(128, 64, 8, 3), dkdv=_Tile(32, 64, 8, 2), dq=_Tile(64, 32, 4, 2))
    return _Tiles(fwd=_Tile(64, 64, 8, 2), dkdv=_Tile(32, 64, 8, 2), dq=_Tile(32, 32, 8, 2))  # D = 160


def _interpreting() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel runs this head dim and dtype (callers fall back to SDPA otherwise)."""
    return 1 <= head_dim <= MAX_HEAD_DIM and dtype in _DTYPES


def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: {name} must be a 4-D (B, H, N, D) tensor, got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, H and D "
                         "(shapes are (B, H, N, D))")
    head_dim = q.shape[3]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {head_dim} is over the limit of {MAX_HEAD_DIM} (one tile "
                         "holds a whole head); use F.scaled_dot_product_attention for it (see supports())")
    if k.shape[2] == 0 or head_dim == 0:
        raise ValueError(f"flash_attention: k has shape {tuple(k.shape)}: 0 keys or a 0-dim head; softmax over "
                         "no keys is undefined")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"flash_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one and the "
                         f"same of {_DTYPES}; cast them first")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attention: q, k, v are on {q.device}, {k.device}, {v.device}; move them to one")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"flash_attention: tensors on {q.device.type} need CUDA for the Triton kernel; use the "
                         "torch backend (F.scaled_dot_product_attention) here, or set TRITON_INTERPRET=1 before "
                         "importing textcraftor_fast.kernels to test on CPU")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_strides(name, t)


def _check_strides(name: str, t: Tensor) -> None:
    if t.stride(3) != 1 and t.shape[3] > 1:
        raise ValueError(f"flash_attention: {name} must have a contiguous last dim (stride 1), got strides "
                         f"{t.stride()}; pass the (B, N, H, D) projection's .transpose(1, 2) view")
    span = (t.shape[2] - 1) * abs(t.stride(2)) + t.shape[3]
    if span > _INT32_MAX:
        raise ValueError(f"flash_attention: one (B, H) slice of {name} spans {span} elements, over the int32 "
                         f"limit {_INT32_MAX}; split the sequence")


def _bnhd(b: int, n: int, h: int, d: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous (B, N, H, D) buffer seen as (B, H, N, D)."""
    return torch.empty((b, n, h, d), device=like.device, dtype=dtype or like.dtype).transpose(1, 2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _attn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, tiles: _Tiles) -> tuple[Tensor, Tensor]:
    """(out (B, H, Nq, D) over a (B, Nq, H, D) buffer, lse (B, H, Nq) fp32)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = _bnhd(B, Nq, H, D, q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    t = tiles.fwd
    grid = (cdiv(Nq, t.block_m) * B * H,)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, Nq, Nk, scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=_block_d(D),
        UPCAST=_interpreting(), PRECISION=_precision(q.dtype), num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def _kv_splits(tiles: _Tiles, B: int, H: int, Nq: int, Nk: int, device: torch.device) -> int:
    """Query splits for dK/dV: cross-attention (Nk = 77) has one key block per head, so B*H programs would
    each loop over all 4096 queries on a few SMs; split the queries until ~2 waves fill the GPU."""
    m_blocks = cdiv(Nq, tiles.dkdv.block_m)
    if tiles.kv_splits is not None:
        return max(1, min(tiles.kv_splits, m_blocks))
    if device.type != "cuda":
        return 1
    programs = cdiv(Nk, tiles.dkdv.block_n) * B * H
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(m_blocks, 16, target // programs))


def _attn_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   tiles: _Tiles, need_dq: bool = True, need_dkdv: bool = True) -> tuple[Tensor, ...]:
    """(dq, dk, dv) as (B, H, N, D) views of (B, N, H, D) buffers; None for what is not needed."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if do.shape != q.shape:
        raise ValueError(f"flash_attention: grad_output {tuple(do.shape)} does not match the output {tuple(q.shape)}")
    if do.stride(3) != 1 or do.dtype != q.dtype:  # autograd's choice, not the user's: one copy is fine
        do = do.to(q.dtype).contiguous()
    _check_strides("grad_output", do)
    block_d = _block_d(D)
    upcast, precision = _interpreting(), _precision(q.dtype)
    dq = _bnhd(B, Nq, H, D, q) if need_dq else None
    dk = _bnhd(B, Nk, H, D, k) if need_dkdv else None
    dv = _bnhd(B, Nk, H, D, v) if need_dkdv else None
    if q.numel() == 0:
        return dq, (dk.zero_() if need_dkdv else None), (dv.zero_() if need_dkdv else None)

    delta = torch.empty_like(lse)
    pre_m = 64
    _attn_bwd_preprocess_kernel[(cdiv(Nq, pre_m) * B * H,)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], H, Nq,
        HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    if need_dkdv:
        t = tiles.dkdv
        splits = _kv_splits(tiles, B, H, Nq, Nk, q.device)
        m_per_split = cdiv(cdiv(Nq, t.block_m), splits) * t.block_m
        splits = cdiv(Nq, m_per_split)  # no empty split
        if splits == 1:  # write the gradients directly: (1, B, H, Nk, D) views of the (B, Nk, H, D) buffers
            dk_out, dv_out = dk.unsqueeze(0), dv.unsqueeze(0)
        else:  # fp32 partials, summed below (small: only taken when Nk is short)
            dk_out = torch.empty((splits, B, Nk, H, D), device=q.device, dtype=torch.float32).transpose(2, 3)
            dv_out = torch.empty_like(dk_out)
        assert dk_out.stride() == dv_out.stride(), "the dK/dV kernel takes one set of strides for both"
        _attn_bwd_dkdv_kernel[(splits * cdiv(Nk, t.block_n) * B * H,)](
            q, k, v, do, lse, delta, dk_out, dv_out, *common, *dk_out.stride()[:4],
            H, Nq, Nk, scale * _LOG2E, scale, m_per_split,
            HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d,
            UPCAST=upcast, PRECISION=precision, num_warps=t.num_warps, num_stages=t.num_stages)
        if splits > 1:
            dk.copy_(dk_out.sum(0))
            dv.copy_(dv_out.sum(0))

    if need_dq:
        t = tiles.dq
        _attn_bwd_dq_kernel[(cdiv(Nq, t.block_m) * B * H,)](
            q, k, v, do, lse, delta, dq, *common, *dq.stride()[:3],
            H, Nq, Nk, scale * _LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d,
            UPCAST=upcast, PRECISION=precision, num_warps=t.num_warps, num_stages=t.num_stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------- autograd
class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, out and the (B, H, Nq) fp32 logsumexp: nothing of size Nq x Nk."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, tiles: _Tiles) -> Tensor:
        out, lse = _attn_forward(q, k, v, scale, tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.tiles = scale, tiles
        return out

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _attn_backward(do, q, k, v, out, lse, ctx.scale, ctx.tiles, need_dq=need_q,
                                    need_dkdv=need_k or need_v)
        return dq, (dk if need_k else None), (dv if need_v else None), None, None


# ---------------------------------------------------------------------------------------------- functional
def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, attn_mask: Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, _tiles: _Tiles | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` for q (B, H, Nq, D), k and v (B, H, Nk, D); returns (B, H, Nq, D).

    Same call as ``F.scaled_dot_product_attention`` for what SD uses; ``attn_mask``, ``dropout_p`` and
    ``is_causal`` exist only to reject non-default values loudly. scale defaults to 1/sqrt(D).
    ``_tiles`` (private) forces block sizes, e.g. tiny ones so tests cover several ragged blocks.
    """
    if attn_mask is not None:
        raise ValueError("flash_attention: attn_mask is not supported (SD1.5 attention is unmasked); use "
                         "F.scaled_dot_product_attention for masked attention")
    if dropout_p != 0.0:
        raise ValueError(f"flash_attention: dropout_p={dropout_p} is not supported (must be 0.0)")
    if is_causal:
        raise ValueError("flash_attention: is_causal=True is not supported (SD1.5 attention is not causal)")
    _validate(q, k, v)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale {scale} must be finite")
    tiles = _tiles or _default_tiles(head_dim, q.dtype)
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
        return _attn_forward(q, k, v, scale, tiles)[0]  # no graph to build: skip autograd.Function's overhead
    return FlashAttentionFunction.apply(q, k, v, scale, tiles)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, upcast: bool = False) -> Tensor:
    """The pure-torch reference ``softmax(q k^T * scale) v`` (eager: materialises the Nq x Nk scores).

    upcast=False computes in the input dtype (torch's own same-dtype error, for the 2x tolerance rule);
    upcast=True computes in fp32 (float64 stays float64) and casts back.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.float() if t.dtype != torch.float64 else t for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Nq, Nk)
    attn = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(attn, v).to(dtype)


class FlashAttention(nn.Module):
    """Parameter-free module form: ``FlashAttention()(q, k, v)`` == ``flash_attention(q, k, v, scale)``."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flash_attention(q, k, v, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
