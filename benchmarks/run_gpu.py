"""The prepared GPU run for the Triton kernels: kernel benchmarks vs torch/SDPA and one SD1.5 training step.

  python benchmarks/run_gpu.py --out DIR [--only groupnorm,attention,geglu,sweep,step,step4]

Writes DIR/kernels-<device>.json (device name, versions, every row) and prints a compact table. Each suite
runs in its own try block, so one failure still leaves the others' numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script


def _suites(workdir: Path) -> dict:
    from benchmarks import gpu_attention, gpu_attention_sweep, gpu_geglu, gpu_groupnorm, gpu_step

    return {"groupnorm": gpu_groupnorm.run, "attention": gpu_attention.run, "geglu": gpu_geglu.run,
            "sweep": gpu_attention_sweep.run, "step": lambda: gpu_step.run(workdir, batch=1),
            "step4": lambda: gpu_step.run(workdir, batch=4, rounds=2, control=False)}


_SHOWN = ("shape", "memory_format", "weight_grad", "impl", "best_sdpa", "kernel", "tile", "op", "ms", "dtype")


def _fmt(row: dict) -> str:
    """Identity fields, speed-ups and memory; the full row (every time) is in the JSON."""
    keep = {k: v for k, v in row.items() if k in _SHOWN or "speedup" in k or "peak" in k or "cosine" in k
            or "s_per_step" in k or k.endswith("_ops")}
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="groupnorm,attention,geglu,sweep,step,step4")
    args = ap.parse_args()
    import triton

    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "suites": {}}
    with tempfile.TemporaryDirectory() as tmp:
        suites = _suites(Path(tmp))
        for name in args.only.split(","):
            t0 = time.perf_counter()
            try:
                rows = suites[name]()
                result["suites"][name] = {"rows": rows, "seconds": time.perf_counter() - t0}
                print(f"== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
                for row in rows:  # per-implementation attention rows stay in the JSON; print the summary
                    if row.get("impl", "summary") == "summary":
                        print("  " + _fmt(row), flush=True)
            except Exception:  # keep the other suites' numbers
                result["suites"][name] = {"error": traceback.format_exc()}
                print(f"== {name} FAILED\n{traceback.format_exc()}", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            slug = device.replace(" ", "-")
            (args.out / f"kernels-{slug}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if all("rows" in s for s in result["suites"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
