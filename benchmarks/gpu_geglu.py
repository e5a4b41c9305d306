"""Fused Triton GEGLU vs eager torch (diffusers' ``a * F.gelu(g)``) at the SD1.5 UNet feed-forward shapes.

Run on CUDA through ``python benchmarks/run_gpu.py`` (bf16, batch 2 = one CFG pair).
"""
from __future__ import annotations

import torch

from benchmarks.gpu_common import bench_fwd_bwd, compare

# (tokens, model dim): the feed-forward projects dim -> 2 * 4 * dim; GEGLU halves it to 4 * dim.
SD15_FF = [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]


def run(batch: int = 2, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    from textcraftor_fast.kernels.geglu import geglu, geglu_ref

    rows: list[dict] = []
    for tokens, dim in SD15_FF:
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(batch, tokens, 8 * dim, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
        dout = torch.randn(batch, tokens, 4 * dim, device="cuda", dtype=dtype, generator=g)
        ours = bench_fwd_bwd(lambda: geglu(h), [h], dout)
        base = bench_fwd_bwd(lambda: geglu_ref(h), [h], dout)
        compare(rows, ours, base, op="geglu", baseline="torch eager", shape=f"({batch},{tokens},{8 * dim})",
                dtype=str(dtype).replace("torch.", ""))
    return rows
