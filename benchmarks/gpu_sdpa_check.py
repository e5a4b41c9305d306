"""Which attention backend gives the text-encoder gradient of an fp32 run? A diagnosis, not a benchmark.

In the SD1.5 step benchmark the bf16 gradient of the torch and auto configs (SDPA attention) matched an
fp32 control (cosine 0.9999) in one run and not in two others (cosine 0.29), while the all-Triton config
matched in every run. This recomputes ONE step's gradient (no optimizer step, same prompts and noise) for
the fp32 control and for bf16 under each SDPA backend, before and after the attention benchmark's SDPA
calls, so the backend that departs can be named.

  python benchmarks/gpu_sdpa_check.py [--tiny]     # --tiny: tiny random models on the CPU (a dry run)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def _step_grad(trainer, k: int) -> torch.Tensor:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.generator.manual_seed(trainer.cfg.seed * 7919)  # the same x_T for every call
    loss, _ = trainer.forward(trainer.probe_prompts[:1], k)  # the first prompt of the set, every call
    loss.backward()
    return torch.cat([p.grad.float().flatten() for p in trainer.params if p.grad is not None])


def _backends() -> dict:
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return {n.split("_")[0].lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def _bench_like_sdpa_calls(device: str) -> None:
    """The attention benchmark's SDPA activity: each backend forced at a UNet shape, fwd + bwd."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(2, n, 8, 40, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
               for n in (4096, 77, 77))
    for backend in _backends().values():
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
        except RuntimeError:
            pass


def run(tiny: bool) -> dict:
    from torch.nn.attention import sdpa_kernel

    from benchmarks.gpu_step import _sd15_file, _trainer
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import Trainer

    device = "cpu" if tiny else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if tiny:
            def make(precision, backend="torch"):
                return Trainer(load_config("configs/tiny_random.toml", [
                    "sampler.num_steps=3", "sampler.grad_steps=2", "train.progress_bar=false", "data.max_prompts=2",
                    f"train.mixed_precision={precision}", f"ops.backend={backend}",
                    f'output.dir="{work / (precision + backend)}"']))
            k = 2
        else:
            path = _sd15_file(work)

            def make(precision, backend="torch"):
                return _trainer(path, work, 1, backend, precision=precision)
            k = 5
        result: dict = {"device": torch.cuda.get_device_name() if not tiny else "cpu"}
        control = make("no")
        ref = _step_grad(control, k)
        del control
        bf16 = make("bf16")
        cos = lambda g: torch.nn.functional.cosine_similarity(g, ref, dim=0).item()  # noqa: E731
        for phase in ("fresh", "after_bench_sdpa_calls"):
            if phase == "after_bench_sdpa_calls":
                _bench_like_sdpa_calls(device)
            result[f"{phase}/default"] = cos(_step_grad(bf16, k))
            result[f"{phase}/default_again"] = cos(_step_grad(bf16, k))
            for name, backend in _backends().items():
                try:
                    with sdpa_kernel(backend):
                        result[f"{phase}/{name}"] = cos(_step_grad(bf16, k))
                except RuntimeError as err:
                    result[f"{phase}/{name}"] = f"refused: {str(err).splitlines()[0][:60]}"
        del bf16
        triton = make("bf16", "triton") if not tiny else None
        if triton is not None:
            result["triton_attention"] = cos(_step_grad(triton, k))
        return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = run(args.tiny)
    for key, value in res.items():
        print(f"{key}: {value}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sdpa-check.json").write_text(json.dumps(res, indent=1))
