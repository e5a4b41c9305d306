"""Timing and memory helpers for the CUDA kernel benchmarks (benchmarks/gpu_*.py, run by run_gpu.py).

Two clocks, because SD1.5's ops at batch 1-2 are small enough that launch cost can dominate:
- eager: ``triton.testing.do_bench`` medians (CUDA events around each call; it clears L2 before each call,
  which also gives the CPU a head start of ~0.1 ms, so only host overhead beyond that shows). What a plain
  PyTorch training loop pays, Python and launch overhead included.
- graph: the same work captured once in a CUDA graph and replayed: GPU time alone, what the kernels cost
  under CUDA graphs (or any loop whose host side runs ahead).
- loop: wall time per call over back-to-back calls with one synchronize at the end: the throughput of an op
  repeated as a network repeats it, max(host time, GPU time) per call, where host overhead cannot hide.
Peak memory is ``max_memory_allocated`` during one forward+backward minus what was allocated before it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _median_ms(fn: Callable[[], object], grad_to_none: Sequence[Tensor] = ()) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, grad_to_none=list(grad_to_none), return_mode="median"))


def graph_ms(fn: Callable[[], object], inputs: Sequence[Tensor] = ()) -> float | None:
    """Median ms of replaying ``fn`` captured in a CUDA graph; None if it cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs documents
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for t in inputs:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = _median_ms(graph.replay)
        del graph
        return ms
    except Exception:  # a backend that cannot be captured: report no number rather than a wrong one
        torch.cuda.synchronize()
        return None
    finally:
        for t in inputs:
            t.grad = None


def loop_ms(fn: Callable[[], object], inputs: Sequence[Tensor] = (), calls: int = 200) -> float:
    """Wall ms per call over ``calls`` back-to-back calls (one synchronize at the end)."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / calls
    for t in inputs:
        t.grad = None
    return ms


def bench_fwd_bwd(fwd: Callable[[], Tensor], inputs: Sequence[Tensor], dout: Tensor) -> dict[str, float | None]:
    """One implementation: eager fwd / fwd without grad / bwd / fwd+bwd ms, graph-replay ms, peak MiB."""
    fwd_ms = _median_ms(fwd)
    with torch.no_grad():
        fwd_nograd_ms = _median_ms(fwd)
        graph_fwd_nograd_ms = graph_ms(fwd)
        loop_fwd_nograd_ms = loop_ms(fwd)
    out = fwd()
    bwd_ms = _median_ms(lambda: out.backward(dout, retain_graph=True), inputs)
    del out
    full_ms = _median_ms(lambda: fwd().backward(dout), inputs)
    graph_full_ms = graph_ms(lambda: fwd().backward(dout), inputs)
    loop_full_ms = loop_ms(lambda: fwd().backward(dout), inputs)
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
    return {"fwd_ms": fwd_ms, "fwd_nograd_ms": fwd_nograd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": full_ms,
            "graph_fwd_nograd_ms": graph_fwd_nograd_ms, "graph_fwd_bwd_ms": graph_full_ms,
            "loop_fwd_nograd_ms": loop_fwd_nograd_ms, "loop_fwd_bwd_ms": loop_full_ms, "peak_mb": peak_mb}


_TIMES = ("fwd", "fwd_nograd", "bwd", "fwd_bwd", "graph_fwd_nograd", "graph_fwd_bwd", "loop_fwd_nograd",
          "loop_fwd_bwd")


def compare(rows: list[dict], ours: dict, base: dict, **fields) -> None:
    """Append one row: ours and the baseline side by side with speed-ups (>1 = ours faster) and memory."""
    row = dict(fields)
    for key in (*(f"{t}_ms" for t in _TIMES), "peak_mb"):
        row[f"ours_{key}"], row[f"base_{key}"] = ours[key], base[key]
    for t in _TIMES:
        o, b = ours[f"{t}_ms"], base[f"{t}_ms"]
        row[f"speedup_{t}"] = b / o if o and b else None
    rows.append(row)
