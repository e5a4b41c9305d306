"""One TextCraftor training step at SD1.5 scale on CUDA: ops.backend=triton vs torch, side by side.

Random weights in the exact SD1.5 architecture, written as one original-layout .safetensors file and loaded
through the real single-file loader (no real weights exist here), 512x512, bf16 frozen towers, batch 1,
DDIM 25 steps with the last K=5 differentiable (the paper's recipe), every UNet call and the VAE decode
checkpointed. Both trainers live in one process and alternate steps, so they see the same card state.
Reported: median s/step and the step's peak memory above what the trainer holds between steps.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def _sd15_file(folder: Path) -> Path:
    from benchmarks.random_towers import write_random_sd15

    return write_random_sd15(folder / "sd15.safetensors", device="cuda")


def _trainer(path: Path, out: Path, batch: int, backend: str, precision: str = "bf16", attention: str = "auto"):
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import Trainer

    cfg = load_config(None, [
        "model.kind=pretrained", f'model.path="{path}"', "model.resolution=512", f"train.mixed_precision={precision}",
        "train.device=cuda", f"train.batch_size={batch}", "train.progress_bar=false", "data.max_prompts=16",
        'rewards=[{name="colorfulness"}]', f"ops.backend={backend}", f"ops.attention={attention}",
        f"ops.tf32={'false' if precision == 'no' else 'true'}",  # the fp32 control is strict fp32
        f'output.dir="{out / f"{backend}-{attention}-{precision}"}"'])
    return Trainer(cfg)


def _grad(trainer) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in trainer.params if p.grad is not None])


def _measure(path: Path, workdir: Path, batch: int, rounds: int, ref: torch.Tensor | None) -> dict:
    configs = {"torch": ("torch", "auto"), "auto": ("auto", "auto"), "triton": ("triton", "auto")}
    trainers = {name: _trainer(path, workdir, batch, backend=b, attention=a) for name, (b, a) in configs.items()}
    row: dict = {"op": "train_step", "shape": f"SD1.5 512x512 batch {batch}, 25 DDIM steps, K=5, bf16"}
    for name, t in trainers.items():  # warm-up step (Triton compiles here); the same step as the control's
        t.train_step()
        if ref is not None:
            row[f"{name}_grad_cosine_vs_fp32"] = torch.nn.functional.cosine_similarity(_grad(t), ref, dim=0).item()
        row[f"{name}_ops"] = t.ops_counts
    times: dict[str, list[float]] = {b: [] for b in trainers}
    peaks: dict[str, list[float]] = {b: [] for b in trainers}
    for _ in range(rounds):  # interleaved: every config sees the same card state
        for name, t in trainers.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            t.train_step()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            peaks[name].append((torch.cuda.max_memory_allocated() - base) / 2**30)
    for name in trainers:
        row[f"{name}_s_per_step"] = statistics.median(times[name])
        row[f"{name}_step_peak_gib"] = max(peaks[name])
    for name in ("auto", "triton"):
        row[f"{name}_speedup"] = row["torch_s_per_step"] / row[f"{name}_s_per_step"]
        row[f"{name}_peak_ratio"] = row["torch_step_peak_gib"] / row[f"{name}_step_peak_gib"]
    return row


def run(workdir: Path, batch: int = 1, rounds: int = 3, control: bool = True) -> list[dict]:
    """Configs: torch; auto (Triton GroupNorm+SiLU and GEGLU, SDPA attention); triton (all three kernels).

    ``control``: each config's first-step text-encoder gradient is compared with an fp32 torch run of the same
    step (same seed: same prompts and noise) as a cosine; torch-bf16's own cosine is the bar to meet.
    """
    path = workdir / "sd15.safetensors"
    if not path.exists():  # shared by the batch sizes of one run
        path = _sd15_file(workdir)
    torch.cuda.empty_cache()
    ref = None
    if control:
        trainer = _trainer(path, workdir, batch, "torch", precision="no")
        trainer.train_step()
        ref = _grad(trainer)
        del trainer
        torch.cuda.empty_cache()
    return [_measure(path, workdir, batch, rounds, ref)]
