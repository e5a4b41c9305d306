"""Timing and memory helpers for the CUDA kernel benchmarks (benchmarks/gpu_*.py, run by run_gpu.py).

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up excluded); peak memory is
``max_memory_allocated`` during one forward+backward minus what was allocated before it (inputs excluded).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _median_ms(fn: Callable[[], object], grad_to_none: Sequence[Tensor] = ()) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none), return_mode="median"))


def bench_fwd_bwd(fwd: Callable[[], Tensor], inputs: Sequence[Tensor], dout: Tensor) -> dict[str, float]:
    """Forward, backward and forward+backward median ms, and the fwd+bwd peak MiB of one implementation."""
    fwd_ms = _median_ms(fwd)
    out = fwd()
    bwd_ms = _median_ms(lambda: out.backward(dout, retain_graph=True), inputs)
    del out
    full_ms = _median_ms(lambda: fwd().backward(dout), inputs)
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd().backward(dout)
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in inputs:
        t.grad = None
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": full_ms, "peak_mb": peak_mb}


def compare(rows: list[dict], ours: dict[str, float], base: dict[str, float], **fields) -> None:
    """Append one row: ours and the baseline side by side with speed-ups (>1 = ours faster) and memory."""
    row = dict(fields)
    for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb"):
        row[f"ours_{key}"], row[f"base_{key}"] = ours[key], base[key]
    for key in ("fwd", "bwd", "fwd_bwd"):
        row[f"speedup_{key}"] = base[f"{key}_ms"] / ours[f"{key}_ms"]
    rows.append(row)
