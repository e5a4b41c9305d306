"""GroupNorm+SiLU on the GPU: our fused Triton kernel vs torch eager (``F.group_norm`` then ``F.silu``).

SD1.5 shapes (UNet at batch 2, VAE decoder at batch 1), bf16 in both memory formats plus one fp32 row and one
row with weight gradients; forward, backward and forward+backward times (``triton.testing.do_bench`` median)
and the peak memory of forward+backward above the inputs, both from ``gpu_common.bench_fwd_bwd``. The UNet and
VAE are frozen in TextCraftor, so by default only x needs a gradient (``weight_grad=False``).

    python -m benchmarks.gpu_groupnorm          # prints one row per (shape, dtype, format, op)

~66 timed calls of ~0.15 s plus compiles: about 30 s on an H100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_common import bench_fwd_bwd

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
    w = torch.ones(shape[1], device="cuda", dtype=dtype, requires_grad=weight_grad)
    b = torch.zeros(shape[1], device="cuda", dtype=dtype, requires_grad=weight_grad)
    inputs = [t for t in (x, w, b) if t.requires_grad]
    ours = bench_fwd_bwd(lambda: _ours(x, w, b), inputs, dy)
    ref = bench_fwd_bwd(lambda: _torch(x, w, b), inputs, dy)
    fmt_name = "channels_last" if fmt == torch.channels_last else "contiguous"
    rows = []
    for op, key in (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
        full = op == "fwd+bwd"
        rows.append({
            "shape": tuple(shape), "dtype": str(dtype).removeprefix("torch."), "memory_format": fmt_name,
            "weight_grad": weight_grad, "op": op, "ours_ms": round(ours[key], 4), "torch_ms": round(ref[key], 4),
            "speedup": round(ref[key] / ours[key], 3),
            "ours_peak_mb": round(ours["peak_mb"], 2) if full else None,
            "torch_peak_mb": round(ref["peak_mb"], 2) if full else None,
        })
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
    keys = ["shape", "dtype", "memory_format", "weight_grad", "op", "ours_ms", "torch_ms", "speedup",
            "ours_peak_mb", "torch_peak_mb"]
    print(" | ".join(keys))
    for row in run():
        print(" | ".join(str(row[k]) for k in keys))
