"""Triton flash attention vs F.scaled_dot_product_attention's backends and eager math, SD1.5 UNet shapes.

bf16, batch 2 (one CFG pair), 8 heads; q, k, v are the (B, N, H, D) -> (B, H, N, D) transposed views
diffusers' AttnProcessor2_0 passes. Each implementation: forward, backward, forward+backward median ms
(``triton.testing.do_bench``) and the forward+backward peak MiB over the inputs. An SDPA backend that
refuses a shape (e.g. cuDNN at some head dims) is skipped for that shape. Run through
``python benchmarks/run_gpu.py --only attention``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from benchmarks.gpu_common import bench_fwd_bwd

log = logging.getLogger(__name__)

# (name, Nq, Nk, D): self-attention at 64^2/32^2/16^2/8^2 latents, cross-attention to 77 text tokens, D = 64.
SD15_ATTENTION = [("self64", 4096, 4096, 40), ("cross64", 4096, 77, 40), ("self32", 1024, 1024, 80),
                  ("self16", 256, 256, 160), ("self8", 64, 64, 160), ("self32_d64", 1024, 1024, 64)]
OPS = ("fwd", "fwd_nograd", "bwd", "fwd_bwd", "graph_fwd_nograd", "graph_fwd_bwd", "loop_fwd_nograd", "loop_fwd_bwd")
_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _impls() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from textcraftor_fast.kernels.attention import attention_ref, flash_attention

    impls = {"ours": flash_attention, "eager": attention_ref}
    for name in _SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:  # older torch without this backend
            continue

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        impls[f"sdpa_{name.split('_')[0].lower()}"] = sdpa
    return impls


def _bench_shape(impls: dict, name: str, nq: int, nk: int, d: int, batch: int, heads: int,
                 dtype: torch.dtype) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
               .requires_grad_(True) for n in (nq, nk, nk))
    dout = torch.randn(batch, heads, nq, d, device="cuda", dtype=dtype, generator=g)
    fields = dict(shape=name, batch=batch, heads=heads, nq=nq, nk=nk, head_dim=d, dtype=str(dtype)[6:])
    rows = []
    for impl, fn in impls.items():
        try:  # probe once: compiles ours, and finds backends that refuse this shape
            fn(q, k, v).backward(dout)
        except RuntimeError as err:
            log.info("attention %s: %s skipped (%s)", name, impl, str(err).splitlines()[0][:120])
            continue
        finally:
            for t in (q, k, v):
                t.grad = None
        res = bench_fwd_bwd(lambda fn=fn: fn(q, k, v), [q, k, v], dout)
        for op in OPS:
            if res[f"{op}_ms"] is not None:
                rows.append(dict(fields, op=op, impl=impl, ms=res[f"{op}_ms"], peak_mb=res["peak_mb"]))
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    """Per shape and op: ours vs the fastest SDPA backend there (speedup > 1 = ours faster)."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for op in OPS:
            here = [r for r in rows if r["shape"] == shape and r["op"] == op]
            ours = next((r for r in here if r["impl"] == "ours"), None)
            sdpa = [r for r in here if r["impl"].startswith("sdpa_")]
            if ours is None or not sdpa:
                continue
            best = min(sdpa, key=lambda r: r["ms"])
            out.append(dict(shape=shape, op=op, impl="summary", best_sdpa=best["impl"], ours_ms=ours["ms"],
                            best_sdpa_ms=best["ms"], speedup=best["ms"] / ours["ms"],
                            peak_ratio=ours["peak_mb"] / max(best["peak_mb"], 1e-9)))
    return out


def run(batch: int = 2, heads: int = 8, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    impls = _impls()
    rows: list[dict] = []
    for name, nq, nk, d in SD15_ATTENTION:
        rows += _bench_shape(impls, name, nq, nk, d, batch, heads, dtype)
    return rows + _summary(rows)
