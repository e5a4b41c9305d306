"""One training step at SD1.5 scale: ours at two operating points vs the official recipe, each arm in its own
process (peak RSS is per process), arms interleaved round by round so they share the machine's load.

Arms (issue 12):
  baseline  the official step (baseline_official.py): UNet and the reward tower left requires_grad=True, every
            UNet call of the last K steps checkpointed, plain VAE decode, fp32, stock ops;
  lean      ours, every graph-carrying UNet call checkpointed (sampler.checkpoint=step), the VAE decode stage by
            stage (checkpoint_vae=blocks), and the tower's and text encoder's transformer layers
            (sampler.checkpoint_towers); each encoder tensor steps inside backward (optim.step_in_backward: the
            same update, no whole gradient held);
  fast      ours, sampler.checkpoint=auto and checkpoint_vae=auto: with the budget ample (CPU's default),
            nothing is recomputed;
  lora      (only when asked for: --arms) lean's settings with encoder.method=lora (rank 16 on the attention
            projections): the adapters train, the original encoder is the base with them off.
Models: random weights in the SD1.5 architecture, one original-layout file through the real single-file loader;
a reward with a CLIP ViT-L/14 tower (clip_score; its weight gradients are the official code's waste) whose text
half is the SD1.5 file's text encoder, as for the published models (ours keeps one copy, the official code two).

  python benchmarks/sd15_step.py --out DIR [--rounds 2 --steps 2 --threads 2 --latent 16 --num-steps 25 --k 5]
                                           [--arms baseline,lean,fast,lora]

writes DIR/sd15_step.json (every arm's step times and peak RSS per process, medians, ratios to the baseline).
The benchmark suite (test_bench_sd15_step.py) calls `run` at this size; under `--benchmark-disable` (make test) it
runs the same code on tiny random models, so it cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("baseline", "lean", "fast")  # the default run's arms
ALL_ARMS = (*ARMS, "lora")
ARM_OVERRIDES = {
    "baseline": [],  # baseline_official.OFFICIAL_OVERRIDES are added by official_trainer
    "lean": ["sampler.checkpoint=step", "sampler.checkpoint_vae=blocks", "sampler.checkpoint_towers=true",
             "optim.step_in_backward=true"],
    "fast": ["sampler.checkpoint=auto", "sampler.checkpoint_vae=auto"],
}
ARM_OVERRIDES["lora"] = [*ARM_OVERRIDES["lean"], "encoder.method=lora"]


def sd15_overrides(model: Path, tower: Path, latent: int, num_steps: int, k: int, batch: int) -> list[str]:
    return ["model.kind=pretrained", f'model.path="{model}"', f"model.resolution={8 * latent}",
            f"sampler.num_steps={num_steps}", f"sampler.grad_steps={k}", f"train.batch_size={batch}",
            f'rewards=[{{name="clip_score", path="{tower}"}}]', "train.device=cpu", "data.max_prompts=16",
            "train.progress_bar=false", "output.overwrite=true", "train.checkpointing_steps=100000"]


def tiny_overrides(tower: Path, num_steps: int, k: int, batch: int) -> list[str]:
    """The same code path on tiny random SD models (make test)."""
    return ["model.kind=tiny_random", "model.resolution=32", f"sampler.num_steps={num_steps}",
            f"sampler.grad_steps={k}", f"train.batch_size={batch}", f'rewards=[{{name="clip_score", path="{tower}"}}]',
            "train.device=cpu", "data.max_prompts=16", "train.progress_bar=false", "output.overwrite=true",
            "train.checkpointing_steps=100000"]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _vm_hwm_gib() -> float:
    """Peak RSS since the last `_reset_vm_hwm` (VmHWM; the process's whole-life peak is ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def _reset_vm_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def run_arm(arm: str, overrides: list[str], steps: int, out_dir: Path) -> dict:
    """In this process: build the arm's Trainer, one warm-up step, then `steps` timed steps. A precision the run
    sets (`train.mixed_precision`) holds for the baseline too, over the official fp32."""
    sys.path.insert(0, str(HERE))
    from baseline_official import official_trainer, weight_grads
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import Trainer

    same = [o for o in overrides if o.startswith("train.mixed_precision=")]
    overrides = [*overrides, *ARM_OVERRIDES[arm], f'output.dir="{out_dir / arm}"']
    t0 = time.perf_counter()
    trainer = official_trainer(None, overrides, same) if arm == "baseline" else Trainer(load_config(None, overrides))
    build_s = time.perf_counter() - t0
    rss_built = _rss_gib()
    # The loaders read every module in fp32 and the trainer casts the frozen ones after (bf16 runs): that load
    # peak is not the step's, so the steps' peak is also taken on its own.
    _reset_vm_hwm()
    _warm_up(trainer)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    plan = trainer.memory_plan
    return {"arm": arm, "build_s": build_s, "step_s": times, "rss_after_build_gib": rss_built,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_rss_steps_gib": _vm_hwm_gib(), "plain_unet_calls": plan.plain_unet_calls, "vae": str(plan.vae),
            "threads": _threads(), "encoder": type(trainer.text_encoder).__name__,
            "trained_params": sum(p.numel() for p in trainer.params), "unet_dtype": str(trainer.unet.dtype),
            "unet_requires_grad": any(p.requires_grad for p in trainer.unet.parameters()),
            "weight_grad_bytes": {name: g[2] for name, g in weight_grads(trainer).items()}}


def _warm_up(trainer) -> None:
    """One step on a (K + 1)-step schedule: every shape a timed step runs (the no-grad steps, the K graph-carrying
    ones, the decode, the towers) is met once, so allocator growth and oneDNN kernel creation fall here, at about
    a quarter of a 25-step step's cost (minutes of `make bench` on 2 cores)."""
    with schedule_of(trainer, trainer.cfg.sampler.grad_steps + 1):
        trainer.train_step()


@contextlib.contextmanager
def schedule_of(trainer, num_steps: int) -> Iterator[None]:
    """Inside the block `trainer` samples on a `num_steps` DDIM schedule (its own eta and spacing)."""
    from textcraftor_fast.sampler import make_schedule

    s, full = trainer.cfg.sampler, trainer.schedule
    trainer.schedule = make_schedule(_scheduler_config(trainer.cfg.model), num_steps, s.eta, s.timestep_spacing)
    try:
        yield
    finally:
        trainer.schedule = full


def _scheduler_config(model) -> dict:
    """The scheduler config of the model `model` (a ModelConfig) names: a diffusers folder's, a tiny family's, or
    SD1.5's (single files, tiny SD1.5)."""
    from textcraftor_fast.models import load_scheduler
    from textcraftor_fast.models.families import CONFIG_DIRS

    if model.kind == "pretrained" and Path(model.path).is_dir():
        return load_scheduler(Path(model.path) / "scheduler").config
    if model.kind == "tiny_random" and model.family not in ("auto", "sd15"):
        return load_scheduler(CONFIG_DIRS[model.family] / "scheduler").config
    return load_scheduler().config


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _spawn(arm: str, overrides: list[str], steps: int, out_dir: Path, threads: int) -> dict:
    result = out_dir / f"{arm}-{time.monotonic_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--steps", str(steps), "--result",
           str(result), "--out", str(out_dir), "--overrides-json", json.dumps(overrides)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def run(overrides: list[str], out_dir: Path, rounds: int = 2, steps: int = 2, threads: int = 2,
        arms: tuple[str, ...] = ARMS) -> dict:
    """Every arm `rounds` times, one process per arm and round, interleaved; medians and ratios to the baseline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm in arms:
            runs[arm].append(_spawn(arm, overrides, steps, out_dir, threads))
    summary: dict = {"threads": threads, "rounds": rounds, "steps_per_round": steps, "overrides": overrides,
                     "runs": runs, "arms": {}}
    for arm, rs in runs.items():
        times = [t for r in rs for t in r["step_s"]]
        summary["arms"][arm] = {"median_step_s": statistics.median(times), "min_step_s": min(times),
                                "max_step_s": max(times), "samples_per_s": _batch(overrides) / statistics.median(times),
                                "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                                "peak_rss_steps_gib": max(r["peak_rss_steps_gib"] for r in rs),
                                "rss_after_build_gib": max(r["rss_after_build_gib"] for r in rs),
                                "plain_unet_calls": rs[0]["plain_unet_calls"], "vae": rs[0]["vae"]}
    if "baseline" in runs:
        base = summary["arms"]["baseline"]
        for arm in arms:
            a = summary["arms"][arm]
            a["speedup_vs_baseline"] = base["median_step_s"] / a["median_step_s"]
            a["peak_rss_vs_baseline"] = a["peak_rss_gib"] / base["peak_rss_gib"]
            a["peak_rss_steps_vs_baseline"] = a["peak_rss_steps_gib"] / base["peak_rss_steps_gib"]
    return summary


def _batch(overrides: list[str]) -> int:
    return next(int(o.split("=")[1]) for o in overrides if o.startswith("train.batch_size="))


def format_table(summary: dict) -> str:
    lines = ["| arm | median s/step [min, max] | samples/s | peak RSS GiB | RSS after build | steps' peak RSS | "
             "x baseline speed | x baseline peak RSS (steps') | plain UNet calls | VAE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        lines.append(f"| {arm} | {a['median_step_s']:.2f} [{a['min_step_s']:.2f}, {a['max_step_s']:.2f}] | "
                     f"{a['samples_per_s']:.3f} | {a['peak_rss_gib']:.2f} | {a['rss_after_build_gib']:.2f} | "
                     f"{a['peak_rss_steps_gib']:.2f} | {a.get('speedup_vs_baseline', float('nan')):.2f} | "
                     f"{a.get('peak_rss_vs_baseline', float('nan')):.2f} "
                     f"({a.get('peak_rss_steps_vs_baseline', float('nan')):.2f}) | {a['plain_unet_calls']} | "
                     f"{a['vae']} |")
    return "\n".join(lines)


def step_arguments(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The command line both step benchmarks (SD1.5 and SDXL) share."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--num-steps", type=int, default=25)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--arms", type=lambda s: tuple(s.split(",")), default=ARMS,
                    help=f"comma-separated arms, of {', '.join(ALL_ARMS)} (default {','.join(ARMS)})")
    return ap


def main() -> int:
    ap = step_arguments(__doc__, rounds=2)
    ap.add_argument("--arm", choices=ALL_ARMS, help=argparse.SUPPRESS)  # child process: one arm
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--overrides-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        result = run_arm(args.arm, json.loads(args.overrides_json), args.steps, args.out)
        args.result.write_text(json.dumps(result))
        return 0
    from random_towers import write_random_sd15

    models = args.out / "models"
    model, tower = models / "sd15.safetensors", models / "vit_l14"
    if not model.exists() or not tower.exists():
        write_random_sd15(model, tower=tower)
    unknown = set(args.arms) - set(ALL_ARMS)
    if unknown:
        ap.error(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ALL_ARMS)}")
    summary = run(sd15_overrides(model, tower, args.latent, args.num_steps, args.k, args.batch), args.out,
                  args.rounds, args.steps, args.threads, args.arms)
    (args.out / "sd15_step.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
