"""GroupNorm with an optional fused SiLU, forward and backward, split over the spatial axis.

Every SD1.5 UNet/VAE ``GroupNorm`` but the last is followed by ``SiLU``. Eager torch runs two kernels and saves
both the input and the normalised (pre-SiLU) tensor: two activation-sized buffers per norm. Here the SiLU is a
``tl.constexpr`` epilogue of the normalisation, and the ``autograd.Function`` saves only the input, the affine
parameters and the per-(n, group) fp32 ``mean``/``rstd``; backward recomputes ``y = xhat * w + b`` and the SiLU
derivative from ``y`` (``s + y s (1 - s)``, ``s = sigmoid(y)``).

Trade-off: one program per (batch, group) is the textbook layout (Liger-Kernel) but launches only 32 programs
at batch 1 on a 132-SM H100. So each (n, g) group's spatial extent is split into ``num_chunks`` chunks and the
grid is ``(N * G, num_chunks)``; the price is a second launch and a second read of ``x``:
    forward : stats kernel -> per-chunk (count, mean, M2) in fp32; apply kernel combines its group's partials
              (Chan et al. 1979, the n-way parallel variance formula), normalises its chunk, applies the affine
              and SiLU, and chunk 0 writes mean/rstd.                               2 launches, reads x twice.
    backward: partials kernel -> per-chunk sum(dxhat), sum(dxhat * xhat) per (n, g) and per-channel dweight /
              dbias partials (no atomics: deterministic; one torch ``.sum`` reduces them); dx kernel combines
              the group's partials and writes dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
                                                                                     2 launches, reads x, dy twice.
When a group fits in one chunk (small feature maps) each direction is a single launch that reads the chunk twice.
Chunk heuristic (``_plan``): chunks of 2k-16k elements, as many as give ~4 programs per SM; register tiles of
(next_pow2(C / G), ~2048 / that) elements at 8 warps. Statistics and all reductions are fp32 for fp32/bf16/fp16.

Layout: x is viewed as (N, C, S) through its strides, never copied, when its spatial dims collapse to one stride:
contiguous (N, C, H, W), channels_last, and (N, C, L). The output takes x's memory format. Anything else is
copied to contiguous once. Limits: C % num_groups == 0; C / num_groups <= 4096; one sample's element offsets
must fit in int32 (C * H * W < 2**31; the batch offset is int64, so any N).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._host import cdiv, next_pow2
from .norm_module import FusedGroupNorm

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 2048  # elements per register tile (BLOCK_C * BLOCK_S): 8 per thread at 8 warps
_MIN_CHUNK, _MAX_CHUNK = 2048, 16384  # elements per program: enough work per program, enough programs per SM
_MAX_CHUNKS = 1024  # per group: the apply / dx kernels load all partials of a group as one vector
_MAX_GROUP_CHANNELS = 4096  # BLOCK_C: past this one tile column would not fit in registers


# -------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _group_channels(g, CG: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel indices of group g and their mask. CG is a constexpr so the alignment analysis sees g * CG's
    power-of-two factor (vector loads along channels in channels_last) and a full group gets a constant mask."""
    cl = tl.arange(0, BLOCK_C)
    if CG == BLOCK_C:
        c_mask = tl.full([BLOCK_C], 1, tl.int1)
    else:
        c_mask = cl < CG
    return g * CG + cl, c_mask


@triton.jit
def _tile_offsets(c, c_mask, s, s_end, sc, ss):
    """(BLOCK_C, BLOCK_S) element offsets within one sample and the in-bounds mask."""
    mask = c_mask[:, None] & (s < s_end)[None, :]
    return c[:, None] * sc + s[None, :] * ss, mask


@triton.jit
def _chunk_moments(X, sc, ss, c, c_mask, s0, s_end, tiles, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of x over the chunk, fp32, merged tile by tile with Chan's pairwise update."""
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(0, tiles):
        s = s0 + t * BLOCK_S + tl.arange(0, BLOCK_S)
        offs, mask = _tile_offsets(c, c_mask, s, s_end, sc, ss)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        n_t = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        n_new = cnt + n_t
        delta = mean_t - mean
        frac = n_t / tl.maximum(n_new, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_t + delta * delta * cnt * frac
        cnt = n_new
    return cnt, mean, m2


@triton.jit
def _rne_bf16(y, RNE_BF16: tl.constexpr):
    """fp32 y rounded to the nearest bf16 (ties to even) when RNE_BF16: only under the interpreter, whose
    fp32->bf16 cast truncates (the GPU's rounds to nearest even), so CPU tests see the GPU's rounding."""
    if RNE_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y


@triton.jit
def _load_affine(W, B, c, c_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The group's weight and bias as fp32 vectors (1 and 0 when absent, so helpers never see None)."""
    if HAS_W:
        w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    return w, b


@triton.jit
def _bwd_tile(X, DY, x_offs, dy_offs, mask, mean, rstd, w, b,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    """xhat, grad w.r.t. the pre-SiLU output (dyp) and grad w.r.t. xhat (dxhat); zero on masked lanes."""
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    dyp = tl.load(DY + dy_offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if SILU:
        y = xhat
        if HAS_W:
            y = y * w[:, None]
        if HAS_B:
            y = y + b[:, None]
        sig = tl.sigmoid(y)
        dyp = dyp * (sig * (1.0 + y * (1.0 - sig)))
    dxhat = dyp
    if HAS_W:
        dxhat = dyp * w[:, None]
    return xhat, dyp, dxhat


@triton.jit
def _bwd_chunk_sums(X, DY, x_sc, x_ss, dy_sc, dy_ss, c, c_mask, s0, s_end, tiles, mean, rstd, w, b,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Over the chunk: sum(dxhat), sum(dxhat * xhat) and per-channel sum(dyp * xhat), sum(dyp)."""
    sum1 = 0.0
    sum2 = 0.0
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles):
        s = s0 + t * BLOCK_S + tl.arange(0, BLOCK_S)
        x_offs, mask = _tile_offsets(c, c_mask, s, s_end, x_sc, x_ss)
        dy_offs, _ = _tile_offsets(c, c_mask, s, s_end, dy_sc, dy_ss)
        xhat, dyp, dxhat = _bwd_tile(X, DY, x_offs, dy_offs, mask, mean, rstd, w, b, HAS_W, HAS_B, SILU)
        sum1 += tl.sum(tl.sum(dxhat, axis=1), axis=0)
        sum2 += tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
        dw += tl.sum(dyp * xhat, axis=1)
        db += tl.sum(dyp, axis=1)
    return sum1, sum2, dw, db


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _gn_fwd_stats_kernel(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    PART,  # (N * G, 3, NC) fp32 out: per-chunk count, mean, M2
    x_sn, x_sc, x_ss, S, G, NC, chunk_s, tiles,
    CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    j = tl.program_id(1)
    n, g = pid_ng // G, pid_ng % G
    X += n.to(tl.int64) * x_sn
    c, c_mask = _group_channels(g, CG, BLOCK_C)
    s0 = j * chunk_s
    cnt, mean, m2 = _chunk_moments(X, x_sc, x_ss, c, c_mask, s0, tl.minimum(s0 + chunk_s, S), tiles, BLOCK_S)
    base = PART + pid_ng * 3 * NC + j
    tl.store(base, cnt)
    tl.store(base + NC, mean)
    tl.store(base + 2 * NC, m2)


@triton.jit
def _gn_fwd_apply_kernel(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    Y,  # (N, C, S) output, strides (y_sn, y_sc, y_ss)
    W,  # (C,) weight or None
    B,  # (C,) bias or None
    PART,  # (N * G, 3, NC) fp32 partials from the stats kernel (unused when FUSED_STATS)
    MEAN,  # (N * G,) fp32 out
    RSTD,  # (N * G,) fp32 out
    x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, S, G, NC, chunk_s, tiles, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, FUSED_STATS: tl.constexpr,
    RNE_BF16: tl.constexpr, CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    j = tl.program_id(1)
    n, g = pid_ng // G, pid_ng % G
    X += n.to(tl.int64) * x_sn
    Y += n.to(tl.int64) * y_sn
    c, c_mask = _group_channels(g, CG, BLOCK_C)
    s0 = j * chunk_s
    s_end = tl.minimum(s0 + chunk_s, S)
    if FUSED_STATS:  # the chunk is the whole group
        cnt, mean, m2 = _chunk_moments(X, x_sc, x_ss, c, c_mask, s0, s_end, tiles, BLOCK_S)
    else:  # combine the group's chunk partials: mean = sum(n_k m_k) / n, M2 = sum(M2_k + n_k (m_k - mean)^2)
        k = tl.arange(0, BLOCK_K)
        km = k < NC
        base = PART + pid_ng * 3 * NC
        cnt_k = tl.load(base + k, mask=km, other=0.0)
        mean_k = tl.load(base + NC + k, mask=km, other=0.0)
        m2_k = tl.load(base + 2 * NC + k, mask=km, other=0.0)
        cnt = tl.sum(cnt_k, axis=0)
        mean = tl.sum(cnt_k * mean_k, axis=0) / cnt
        d = mean_k - mean
        m2 = tl.sum(m2_k + cnt_k * d * d, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / cnt + eps)
    if j == 0:
        tl.store(MEAN + pid_ng, mean)
        tl.store(RSTD + pid_ng, rstd)
    w, b = _load_affine(W, B, c, c_mask, HAS_W, HAS_B, BLOCK_C)
    for t in range(0, tiles):
        s = s0 + t * BLOCK_S + tl.arange(0, BLOCK_S)
        x_offs, mask = _tile_offsets(c, c_mask, s, s_end, x_sc, x_ss)
        y_offs, _ = _tile_offsets(c, c_mask, s, s_end, y_sc, y_ss)
        y = (tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_W:
            y = y * w[:, None]
        if HAS_B:
            y = y + b[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + y_offs, _rne_bf16(y, RNE_BF16).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_partials_kernel(
    X,  # (N, C, S) saved input, strides (x_sn, x_sc, x_ss)
    DY,  # (N, C, S) grad of the output, strides (dy_sn, dy_sc, dy_ss)
    W,  # (C,) weight or None
    B,  # (C,) bias or None
    MEAN,  # (N * G,) fp32
    RSTD,  # (N * G,) fp32
    PART,  # (N * G, 2, NC) fp32 out: per-chunk sum(dxhat), sum(dxhat * xhat)
    CPART,  # (2, N, NC, C) fp32 out: per-chunk per-channel dweight, dbias partials (unused unless HAS_DW)
    x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, N, C, S, G, NC, chunk_s, tiles,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, HAS_DW: tl.constexpr,
    CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    j = tl.program_id(1)
    n, g = pid_ng // G, pid_ng % G
    X += n.to(tl.int64) * x_sn
    DY += n.to(tl.int64) * dy_sn
    c, c_mask = _group_channels(g, CG, BLOCK_C)
    w, b = _load_affine(W, B, c, c_mask, HAS_W, HAS_B, BLOCK_C)
    s0 = j * chunk_s
    sum1, sum2, dw, db = _bwd_chunk_sums(X, DY, x_sc, x_ss, dy_sc, dy_ss, c, c_mask, s0,
                                         tl.minimum(s0 + chunk_s, S), tiles, tl.load(MEAN + pid_ng),
                                         tl.load(RSTD + pid_ng), w, b, HAS_W, HAS_B, SILU, BLOCK_C, BLOCK_S)
    tl.store(PART + pid_ng * 2 * NC + j, sum1)
    tl.store(PART + pid_ng * 2 * NC + NC + j, sum2)
    if HAS_DW:
        row = (n * NC + j) * C
        tl.store(CPART + row + c, dw, mask=c_mask)
        tl.store(CPART + N * NC * C + row + c, db, mask=c_mask)


@triton.jit
def _gn_bwd_dx_kernel(
    X,  # (N, C, S) saved input, strides (x_sn, x_sc, x_ss)
    DY,  # (N, C, S) grad of the output, strides (dy_sn, dy_sc, dy_ss)
    DX,  # (N, C, S) out, strides (dx_sn, dx_sc, dx_ss)
    W,  # (C,) weight or None
    B,  # (C,) bias or None
    MEAN,  # (N * G,) fp32
    RSTD,  # (N * G,) fp32
    PART,  # (N * G, 2, NC) fp32 partials from the partials kernel (unused when FUSED)
    CPART,  # (2, N, 1, C) fp32 out when FUSED and HAS_DW: per-channel dweight, dbias partials
    x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss, N, C, S, G, NC, chunk_s, tiles,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, HAS_DW: tl.constexpr, FUSED: tl.constexpr,
    RNE_BF16: tl.constexpr, CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    j = tl.program_id(1)
    n, g = pid_ng // G, pid_ng % G
    X += n.to(tl.int64) * x_sn
    DY += n.to(tl.int64) * dy_sn
    DX += n.to(tl.int64) * dx_sn
    c, c_mask = _group_channels(g, CG, BLOCK_C)
    w, b = _load_affine(W, B, c, c_mask, HAS_W, HAS_B, BLOCK_C)
    mean = tl.load(MEAN + pid_ng)
    rstd = tl.load(RSTD + pid_ng)
    s0 = j * chunk_s
    s_end = tl.minimum(s0 + chunk_s, S)
    if FUSED:  # one chunk per group: reduce here (first read), then write dx (second read)
        sum1, sum2, dw, db = _bwd_chunk_sums(X, DY, x_sc, x_ss, dy_sc, dy_ss, c, c_mask, s0, s_end, tiles,
                                             mean, rstd, w, b, HAS_W, HAS_B, SILU, BLOCK_C, BLOCK_S)
        if HAS_DW:
            tl.store(CPART + n * C + c, dw, mask=c_mask)
            tl.store(CPART + N * C + n * C + c, db, mask=c_mask)
    else:
        k = tl.arange(0, BLOCK_K)
        km = k < NC
        sum1 = tl.sum(tl.load(PART + pid_ng * 2 * NC + k, mask=km, other=0.0), axis=0)
        sum2 = tl.sum(tl.load(PART + pid_ng * 2 * NC + NC + k, mask=km, other=0.0), axis=0)
    inv_cnt = 1.0 / (CG * S)  # true division: fp32 (CG * S < 2**31, checked by the launcher)
    c1 = sum1 * inv_cnt  # mean(dxhat)
    c2 = sum2 * inv_cnt  # mean(dxhat * xhat)
    for t in range(0, tiles):
        s = s0 + t * BLOCK_S + tl.arange(0, BLOCK_S)
        x_offs, mask = _tile_offsets(c, c_mask, s, s_end, x_sc, x_ss)
        dy_offs, _ = _tile_offsets(c, c_mask, s, s_end, dy_sc, dy_ss)
        dx_offs, _ = _tile_offsets(c, c_mask, s, s_end, dx_sc, dx_ss)
        xhat, dyp, dxhat = _bwd_tile(X, DY, x_offs, dy_offs, mask, mean, rstd, w, b, HAS_W, HAS_B, SILU)
        dx = (dxhat - c1 - xhat * c2) * rstd
        tl.store(DX + dx_offs, _rne_bf16(dx, RNE_BF16).to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class _Plan:
    """Launch geometry for one (N, C, S) shape: grid (N * G, num_chunks), each program `tiles` register tiles."""
    block_c: int  # next power of two >= channels per group (masked lanes beyond)
    block_s: int  # spatial positions per tile
    chunk_s: int  # spatial positions per program, a multiple of block_s
    num_chunks: int
    block_k: int  # next power of two >= num_chunks (the apply / dx kernels load all partials at once)
    num_warps: int

    @property
    def tiles(self) -> int:
        return self.chunk_s // self.block_s


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any fixed number, so CPU tests see the H100's plan
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)  # launchers call it on every op: cache the arithmetic per shape
def _plan(n: int, g: int, cg: int, s: int, device: torch.device, chunk_s: int | None = None,
          block_s: int | None = None) -> _Plan:
    """Chunks of ~2k-16k elements, as many as give ~4 programs per SM (fewer when the tensor is small)."""
    block_c = next_pow2(cg)
    if block_s is None:
        block_s = max(1, min(next_pow2(s), _TILE // block_c))
    if chunk_s is None:
        wanted = cdiv(4 * _sm_count(device), n * g)  # chunks per group
        elems = min(max(cdiv(cg * s, wanted), _MIN_CHUNK), _MAX_CHUNK)
        chunk_s = cdiv(elems, cg)
    chunk_s = max(chunk_s, cdiv(s, _MAX_CHUNKS))
    chunk_s = min(cdiv(chunk_s, block_s), cdiv(s, block_s)) * block_s
    num_chunks = cdiv(s, chunk_s)
    # flash-attention's rule: ~8 elements per thread (one 16-byte bf16 vector); the backward kernels then need
    # ~80-130 registers (measured with ptxas for sm_90 at BLOCK_C x BLOCK_S = 4x512, 16x128, 64x32).
    num_warps = min(max(block_c * block_s // 256, 1), 8)
    return _Plan(block_c, block_s, chunk_s, num_chunks, next_pow2(num_chunks), num_warps)


def _interpreted() -> bool:
    return type(_gn_fwd_apply_kernel).__name__ == "InterpretedFunction"


def _check_inputs(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() not in (3, 4):
        raise ValueError(f"group_norm: x must be 3-D (N, C, L) or 4-D (N, C, H, W), got shape {tuple(x.shape)}; "
                         "reshape other ranks to (N, C, -1) first")
    if x.dtype not in _DTYPES:
        raise ValueError(f"group_norm: x dtype {x.dtype} is not supported; use one of {_DTYPES}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: num_channels {c} is not divisible by num_groups {num_groups}; "
                         f"use a num_groups that divides {c}")
    if next_pow2(c // num_groups) > _MAX_GROUP_CHANNELS:
        raise ValueError(f"group_norm: {c // num_groups} channels per group exceeds the kernel's limit "
                         f"{_MAX_GROUP_CHANNELS}; use more groups or ops.backend=torch")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != (c,):
            raise ValueError(f"group_norm: {name} shape {tuple(p.shape)} must be (num_channels,) = ({c},)")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device} but x is on {x.device}; move both to one device")
        if p.dtype not in _DTYPES:
            raise ValueError(f"group_norm: {name} dtype {p.dtype} is not supported; use one of {_DTYPES}")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(f"group_norm: x is on {x.device.type}; the Triton kernel needs a CUDA tensor, or "
                         "TRITON_INTERPRET=1 set before importing textcraftor_fast.kernels for CPU testing. "
                         "Use ops.backend=torch on this device.")


def _ncs(t: Tensor) -> Tensor:
    """``t`` unchanged if its spatial dims collapse to one stride (contiguous, channels_last, 3-D), else a copy."""
    try:
        t.view(t.shape[0], t.shape[1], -1)
        return t
    except RuntimeError:  # e.g. H and W transposed: one copy
        return t.contiguous()


def _strides(t: Tensor, name: str) -> tuple[int, int, int]:
    """(sn, sc, ss) of the (N, C, S) view; one sample's offsets must fit the kernels' int32 arithmetic."""
    t3 = t.view(t.shape[0], t.shape[1], -1)
    sn, sc, ss = t3.stride()
    if (t3.shape[1] - 1) * abs(sc) + (t3.shape[2] - 1) * abs(ss) >= 2**31 or t3.shape[1] * t3.shape[2] >= 2**31:
        raise ValueError(f"group_norm: {name} has {t3.shape[1]} x {t3.shape[2]} elements per sample; the limit is "
                         "2**31 (int32 offsets within a sample); split the sample or use ops.backend=torch")
    return sn, sc, ss


def _gn_forward(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, silu: bool,
                chunk_s: int | None = None, block_s: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd, x as the kernel read it: the tensor to save for backward)."""
    x = _ncs(x)
    n, c = x.shape[0], x.shape[1]
    y = torch.empty_like(x)  # keeps x's memory format (and strides: x is dense after _ncs)
    stats = torch.empty((2, n, num_groups), device=x.device, dtype=torch.float32)
    mean, rstd = stats[0], stats[1]  # one allocation: each torch call costs microseconds per op
    if x.numel() == 0:
        return y, mean, rstd, x
    s = x.numel() // (n * c)
    p = _plan(n, num_groups, c // num_groups, s, x.device, chunk_s, block_s)
    xs = _strides(x, "x")
    ys = xs if y.stride() == x.stride() else _strides(y, "output")
    part = (torch.empty((n * num_groups, 3, p.num_chunks), device=x.device, dtype=torch.float32)
            if p.num_chunks > 1 else stats)  # the single-chunk kernel never reads partials
    grid = (n * num_groups, p.num_chunks)
    common = (s, num_groups, p.num_chunks, p.chunk_s, p.tiles)
    if p.num_chunks > 1:
        _gn_fwd_stats_kernel[grid](x, part, *xs, *common, CG=c // num_groups, BLOCK_C=p.block_c,
                                   BLOCK_S=p.block_s, num_warps=p.num_warps)
    _gn_fwd_apply_kernel[grid](
        x, y, mean if weight is None else weight, mean if bias is None else bias, part, mean, rstd,
        *xs, *ys, *common, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, FUSED_STATS=p.num_chunks == 1,
        RNE_BF16=_interpreted() and y.dtype == torch.bfloat16, CG=c // num_groups,
        BLOCK_C=p.block_c, BLOCK_S=p.block_s, BLOCK_K=p.block_k, num_warps=p.num_warps)
    return y, mean, rstd, x


def _gn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
                 silu: bool, need_dx: bool, need_dw: bool, need_db: bool, chunk_s: int | None = None,
                 block_s: int | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) from the saved x, mean, rstd; None where not needed."""
    if dy.shape != x.shape:
        raise ValueError(f"group_norm: grad_output shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    dy = _ncs(dy)
    n, c = x.shape[0], x.shape[1]
    g = mean.shape[1]
    has_dw = (need_dw and weight is not None) or (need_db and bias is not None)
    dx = torch.empty_like(x) if need_dx else None
    cpart = None
    if x.numel() and (need_dx or has_dw):
        s = x.numel() // (n * c)
        p = _plan(n, g, c // g, s, x.device, chunk_s, block_s)
        xs, dys = _strides(x, "x"), _strides(dy, "grad_output")
        grid = (n * g, p.num_chunks)
        if has_dw:
            cpart = torch.empty((2, n, p.num_chunks, c), device=x.device, dtype=torch.float32)
        common = (weight if weight is not None else mean, bias if bias is not None else mean, mean, rstd)
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, HAS_DW=has_dw, CG=c // g,
                     BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
        fused = p.num_chunks == 1 and need_dx
        part = mean  # unused by the fused dx kernel
        if not fused:
            part = torch.empty((n * g, 2, p.num_chunks), device=x.device, dtype=torch.float32)
            _gn_bwd_partials_kernel[grid](x, dy, *common, part, cpart if has_dw else mean, *xs, *dys, n, c, s, g,
                                          p.num_chunks, p.chunk_s, p.tiles, **flags)
        if need_dx:
            _gn_bwd_dx_kernel[grid](x, dy, dx, *common, part, cpart if has_dw else mean, *xs, *dys,
                                    *_strides(dx, "dx"), n, c, s, g, p.num_chunks, p.chunk_s, p.tiles,
                                    FUSED=fused, RNE_BF16=_interpreted() and dx.dtype == torch.bfloat16,
                                    BLOCK_K=p.block_k, **flags)
    dw = db = None
    if has_dw or need_dw or need_db:
        sums = cpart.sum(dim=(1, 2)) if cpart is not None else torch.zeros((2, c), device=x.device)  # (2, C)
        dw = sums[0].to(weight.dtype) if need_dw and weight is not None else None
        db = sums[1].to(bias.dtype) if need_db and bias is not None else None
    return dx, dw, db


# ------------------------------------------------------------------------------------------------ autograd
class _GroupNormFunction(torch.autograd.Function):
    """Saves only x, weight, bias and the fp32 (N, G) mean / rstd; y and the SiLU input are recomputed."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, chunk_s, block_s):
        y, mean, rstd, x_read = _gn_forward(x, num_groups, weight, bias, eps, silu, chunk_s, block_s)
        ctx.save_for_backward(x_read, weight, bias, mean, rstd)
        ctx.silu, ctx.chunk_s, ctx.block_s = silu, chunk_s, block_s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = _gn_backward(dy, x, weight, bias, mean, rstd, ctx.silu, need_dx, need_dw, need_db,
                                  ctx.chunk_s, ctx.block_s)
        return dx, dw, db, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- functional
def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, silu: bool = False, *, _chunk_s: int | None = None,
               _block_s: int | None = None) -> Tensor:
    """``F.group_norm`` (then ``F.silu`` when ``silu``) in Triton. x: (N, C, H, W) or (N, C, L).

    ``_chunk_s`` / ``_block_s`` (spatial positions per program / per tile) override the heuristic: tests use
    them to force several chunks per group on tiny shapes.
    """
    _check_inputs(x, num_groups, weight, bias)
    if not torch.is_grad_enabled() or not (x.requires_grad or (weight is not None and weight.requires_grad)
                                           or (bias is not None and bias.requires_grad)):
        # No graph to build (the sampler's early steps, inference): skip autograd.Function's overhead.
        return _gn_forward(x, int(num_groups), weight, bias, float(eps), bool(silu), _chunk_s, _block_s)[0]
    return _GroupNormFunction.apply(x, weight, bias, int(num_groups), float(eps), bool(silu), _chunk_s, _block_s)


def group_norm_ref(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                   silu: bool, upcast: bool = False) -> Tensor:
    """Pure-torch reference: ``F.group_norm`` then ``F.silu``; ``upcast`` computes in fp32 and casts back."""
    dtype = x.dtype
    if upcast:
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if silu:
        y = F.silu(y)
    return y.to(dtype)


# -------------------------------------------------------------------------------------------------- module
class TritonGroupNorm(FusedGroupNorm):
    """Drop-in ``nn.GroupNorm`` (same ``weight`` / ``bias`` state_dict keys) with an optional fused SiLU."""

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
