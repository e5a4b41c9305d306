"""A small timing sweep of the flash-attention kernel's tiles at the SD1.5 shapes that carry most FLOPs.

The shipped tiles (``kernels/attention.py::_default_tiles``) were chosen from an offline sm_90 compile
(registers, no spills), not from timings; this sweep times a handful of alternatives per head dim on the
GPU, forward and backward separately (bf16, batch 2, 8 heads), so the table can be set from measurements.
Run through ``python benchmarks/run_gpu.py --only sweep``.
"""
from __future__ import annotations

import torch

from benchmarks.gpu_common import _median_ms

T = tuple  # (block_m, block_n, num_warps, num_stages)
# (name, Nq, Nk, D, forward candidates, (dkdv, dq) backward candidates); the first of each is the original
# offline-compile choice; _default_tiles now ships the fastest of each list as measured on an H100.
SWEEP = [
    ("self64", 4096, 4096, 40,
     [T((128, 64, 4, 3)), T((128, 64, 8, 3)), T((128, 128, 8, 3)), T((64, 64, 4, 3)), T((128, 32, 4, 4)),
      T((64, 128, 4, 3))],
     [(T((32, 128, 8, 3)), T((128, 32, 8, 3))), (T((64, 128, 8, 3)), T((128, 64, 8, 3))),
      (T((32, 64, 4, 3)), T((64, 32, 4, 3))), (T((64, 64, 4, 3)), T((64, 64, 4, 3))),
      (T((32, 128, 4, 3)), T((128, 32, 4, 3)))]),
    ("self32", 1024, 1024, 80,
     [T((128, 64, 8, 3)), T((128, 32, 8, 3)), T((64, 64, 4, 3)), T((128, 128, 8, 2)), T((64, 32, 4, 3))],
     [(T((32, 64, 8, 2)), T((64, 32, 4, 2))), (T((64, 64, 8, 2)), T((64, 64, 8, 2))),
      (T((32, 128, 8, 2)), T((128, 32, 8, 2))), (T((32, 64, 4, 3)), T((64, 32, 4, 3)))]),
    ("self16", 256, 256, 160,
     [T((64, 32, 8, 2)), T((64, 64, 8, 2)), T((32, 32, 4, 2)), T((128, 32, 8, 2)), T((64, 16, 4, 2))],
     [(T((32, 32, 8, 2)), T((16, 32, 8, 2))), (T((64, 32, 8, 2)), T((32, 64, 8, 2))),
      (T((32, 64, 8, 2)), T((32, 32, 8, 2))), (T((16, 64, 4, 2)), T((16, 64, 4, 2)))]),
]


def run(batch: int = 2, heads: int = 8, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    from textcraftor_fast.kernels.attention import _default_tiles, _Tile, flash_attention

    rows: list[dict] = []
    for name, nq, nk, d, fwd_cands, bwd_cands in SWEEP:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, n, heads, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
                   .requires_grad_(True) for n in (nq, nk, nk))
        dout = torch.randn(batch, heads, nq, d, device="cuda", dtype=dtype, generator=g)
        shipped = _default_tiles(d, dtype)
        for cand in fwd_cands:
            tiles = shipped._replace(fwd=_Tile(*cand))
            try:
                with torch.no_grad():
                    ms = _median_ms(lambda: flash_attention(q, k, v, _tiles=tiles))
            except Exception as err:  # out of resources etc.: record, go on
                ms = f"failed: {str(err).splitlines()[0][:80]}"
            rows.append(dict(shape=name, head_dim=d, kernel="fwd", tile=cand, ms=ms))
        out = flash_attention(q, k, v)
        for dkdv, dq in bwd_cands:
            tiles = shipped._replace(dkdv=_Tile(*dkdv), dq=_Tile(*dq))
            try:
                out = flash_attention(q, k, v, _tiles=tiles)
                ms = _median_ms(lambda: out.backward(dout, retain_graph=True), [q, k, v])
            except Exception as err:
                ms = f"failed: {str(err).splitlines()[0][:80]}"
            rows.append(dict(shape=name, head_dim=d, kernel="bwd", tile=(dkdv, dq), ms=ms))
    return rows
