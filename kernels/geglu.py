"""Fused GEGLU: the SD1.5 UNet feed-forward's ``a * gelu(g)`` over one projection, forward and backward.

diffusers' ``GEGLU`` does ``a, g = proj(x).chunk(2, -1); out = a * F.gelu(g)`` (exact, erf GELU). Eager torch
runs three kernels (chunk views, gelu, mul) and saves ``a``, ``g`` and ``gelu(g)`` for backward: 1.5x the
projection's bytes. Here one kernel reads the projection once and writes the output; backward reads the
projection and grad_output once and writes the gradient of the whole projection (``[da, dg]``) in one
buffer, so no ``cat``. Only the projection output ``h`` is saved; ``gelu(g)`` is recomputed (cheap: one erf).

Math (the source is the definition of GELU, Hendrycks & Gimpel 2016):
    gelu(g)  = 0.5 g (1 + erf(g / sqrt 2))
    gelu'(g) = 0.5 (1 + erf(g / sqrt 2)) + g exp(-g^2 / 2) / sqrt(2 pi)
    da = dout * gelu(g);  dg = dout * a * gelu'(g)
Statistics and the erf run in fp32 whatever the input dtype.

Limits: the last dimension of the projection must be even and contiguous (stride 1); any leading shape.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from ._host import cdiv, next_pow2

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_halves(h_ptr, row, h_row, F_half, BLOCK: tl.constexpr):
    """This program's columns of the row's two halves, a and g, in fp32."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F_half
    a = tl.load(h_ptr + row * h_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptr + row * h_row + F_half + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, a, g


@triton.jit
def _geglu_fwd_kernel(
    h_ptr,  # (M, 2F) projection output; row stride h_row, last dim contiguous
    out_ptr,  # (M, F) contiguous
    h_row, F_half,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols, mask, a, g = _load_halves(h_ptr, row, h_row, F_half, BLOCK)
    gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    tl.store(out_ptr + row * F_half + cols, (a * gelu).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    h_ptr,  # (M, 2F) saved projection output; row stride h_row
    dout_ptr,  # (M, F) grad of the output; row stride dout_row
    dh_ptr,  # (M, 2F) contiguous: [da, dg]
    h_row, dout_row, F_half,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols, mask, a, g = _load_halves(h_ptr, row, h_row, F_half, BLOCK)
    dout = tl.load(dout_ptr + row * dout_row + cols, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
    da = dout * g * cdf
    dg = dout * a * (cdf + g * pdf)
    base = dh_ptr + row * 2 * F_half
    tl.store(base + cols, da.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(base + F_half + cols, dg.to(dh_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _check_input(h: Tensor, name: str) -> None:
    if h.dtype not in _DTYPES:
        raise ValueError(f"geglu: {name} dtype {h.dtype} is not supported; use one of {_DTYPES}")
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"geglu: {name} last dim must be even (a and gate halves), got shape {tuple(h.shape)}")
    if h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"geglu: {name} is on {h.device.type}; the Triton kernel needs a CUDA tensor (or "
                         "TRITON_INTERPRET=1 set before import, for testing). Use ops.backend=torch on this device.")


def _rows(t: Tensor) -> Tensor:
    """A (M, last) view without copying when the leading dims collapse; copies only when they cannot."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims not collapsible (rare: a sliced batch); one copy
        return t.reshape(-1, t.shape[-1])


def _block(f_half: int) -> tuple[int, int]:
    block = min(next_pow2(max(f_half, 16)), 1024)
    return block, (4 if block <= 512 else 8)


def geglu_forward(h: Tensor) -> Tensor:
    """``a * gelu(g)`` for ``a, g = h.chunk(2, -1)``; returns ``h.shape[:-1] + (F,)``."""
    _check_input(h, "h")
    h2 = _rows(h)
    m, f_half = h2.shape[0], h2.shape[1] // 2
    out = torch.empty((m, f_half), device=h.device, dtype=h.dtype)
    if m and f_half:
        block, warps = _block(f_half)
        _geglu_fwd_kernel[(m, cdiv(f_half, block))](h2, out, h2.stride(0), f_half, BLOCK=block,
                                                           num_warps=warps)
    return out.view(*h.shape[:-1], f_half)


def geglu_backward(h: Tensor, dout: Tensor) -> Tensor:
    """Gradient of the whole projection, ``[da, dg]`` in one ``h``-shaped tensor."""
    h2, d2 = _rows(h), _rows(dout)
    m, f_half = h2.shape[0], h2.shape[1] // 2
    if d2.shape != (m, f_half):
        raise ValueError(f"geglu: grad_output shape {tuple(dout.shape)} does not match the output "
                         f"{tuple(h.shape[:-1]) + (f_half,)}")
    dh = torch.empty((m, 2 * f_half), device=h.device, dtype=h.dtype)
    if m and f_half:
        block, warps = _block(f_half)
        _geglu_bwd_kernel[(m, cdiv(f_half, block))](h2, d2, dh, h2.stride(0), d2.stride(0), f_half,
                                                           BLOCK=block, num_warps=warps)
    return dh.view(h.shape)


class GEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return geglu_forward(h)

    @staticmethod
    def backward(ctx, dout: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return geglu_backward(h, dout)


def geglu(h: Tensor) -> Tensor:
    """Functional fused GEGLU over a projection output ``h`` (..., 2F) -> (..., F)."""
    if not (torch.is_grad_enabled() and h.requires_grad):
        return geglu_forward(h)  # no graph to build: skip autograd.Function's overhead
    return GEGLUFunction.apply(h)


def geglu_ref(h: Tensor, upcast: bool = False) -> Tensor:
    """The torch reference: diffusers' GEGLU after its projection (exact GELU)."""
    x = h.float() if upcast else h
    a, g = x.chunk(2, dim=-1)
    return (a * F.gelu(g)).to(h.dtype)


class TritonGEGLU(nn.Module):
    """Drop-in for ``diffusers.models.activations.GEGLU``: same ``proj`` Linear, same state_dict keys."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_diffusers(cls, module: nn.Module) -> "TritonGEGLU":
        """Wrap an existing GEGLU, sharing its projection (no copy; frozen weights stay frozen)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.proj = module.proj
        return new

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return geglu(self.proj(hidden_states))
