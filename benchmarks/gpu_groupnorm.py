"""GroupNorm+SiLU on the GPU: our fused Triton kernel vs torch eager (``F.group_norm`` then ``F.silu``).

SD1.5 shapes (UNet at batch 2, VAE decoder at batch 1), bf16 in both memory formats plus one fp32 row and one
row with weight gradients; forward, backward and forward+backward times (``triton.testing.do_bench`` median)
and the peak memory of forward+backward above the inputs, both from ``gpu_common.bench_fwd_bwd``. The UNet and
VAE are frozen in TextCraftor, so by default only x needs a gradient (``weight_grad=False``).

    python -m benchmarks.gpu_groupnorm          # prints one row per (shape, dtype, format, op)

Every case also reports CUDA-graph replay times (GPU time alone) beside the eager ones; see gpu_common.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_common import bench_fwd_bwd, compare

GROUPS = 32
SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (1, 128, 512, 512), (1, 512, 64, 64)]
# (shape, dtype, memory format, weight_grad)
CASES = [(s, torch.bfloat16, f, False) for s in SHAPES for f in (torch.contiguous_format, torch.channels_last)] + [
    ((2, 320, 64, 64), torch.float32, torch.contiguous_format, False),
    ((2, 320, 64, 64), torch.bfloat16, torch.contiguous_format, True),
]


def _ours(x, w, b):
    from textcraftor_fast.kernels.groupnorm import group_norm
    return group_norm(x, GROUPS, w, b, 1e-5, silu=True)


def _torch(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def _case(shape, dtype, fmt, weight_grad) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=gen).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device="cuda", dtype=dtype, generator=gen).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    # Random affine parameters (METHOD.md: never time on zeros/ones).
    w = (1 + 0.5 * torch.randn(shape[1], device="cuda", generator=gen)).to(dtype).requires_grad_(weight_grad)
    b = (0.5 * torch.randn(shape[1], device="cuda", generator=gen)).to(dtype).requires_grad_(weight_grad)
    inputs = [t for t in (x, w, b) if t.requires_grad]
    ours = bench_fwd_bwd(lambda: _ours(x, w, b), inputs, dy)
    ref = bench_fwd_bwd(lambda: _torch(x, w, b), inputs, dy)
    rows: list[dict] = []
    compare(rows, ours, ref, op="groupnorm+silu", baseline="torch eager", shape=str(tuple(shape)),
            dtype=str(dtype).removeprefix("torch."),
            memory_format="channels_last" if fmt == torch.channels_last else "contiguous", weight_grad=weight_grad)
    return rows


def run() -> list[dict]:
    """One row per (shape, dtype, memory format, op); needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks.gpu_groupnorm needs a CUDA device")
    rows = []
    for case in CASES:
        rows.extend(_case(*case))
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
