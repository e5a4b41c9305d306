"""Where one arm's peak RSS goes at SD1.5 scale on CPU: RSS (anonymous and file-backed) after the build and after each
step, the parameter bytes of every model, the optimizer state and the gradient (docs/performance.md, Memory policy).

  python benchmarks/rss_probe.py --models DIR [--arm lean] [--steps 2] [--set optim.name=adamw8bit ...]

DIR gets the random SD1.5 file and ViT-L/14 tower of benchmarks/sd15_step.py if it lacks them (16x16 latent, batch 1,
25 steps, K = 5, clip_score). Run it alone, with OMP_NUM_THREADS=2 as the step suite does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: round(int(fields[k].split()[0]) / 2**20, 3) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _gib(module) -> float:
    return 0.0 if module is None else round(sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--arm", choices=("lean", "fast"), default="lean")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from random_towers import write_sd15_in_child
    from sd15_step import ARM_OVERRIDES, sd15_overrides
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import Trainer
    from textcraftor_fast.memory.saved_bytes import optimizer_state_bytes

    model, tower = args.models / "sd15.safetensors", args.models / "vit_l14"
    if not model.exists() or not tower.exists():
        write_sd15_in_child(model, tower)
    overrides = [*sd15_overrides(model, tower, 16, 25, 5, 1), *ARM_OVERRIDES[args.arm], *args.set,
                 f'output.dir="{args.models / "probe_run"}"']
    print("start", _rss(), flush=True)
    trainer = Trainer(load_config(None, overrides))
    print("built", _rss(), flush=True)
    clip = trainer.rewards.rewards[0].tower.model
    print("parameters GiB", {"unet": _gib(trainer.unet), "vae": _gib(trainer.vae), "encoder": _gib(trainer.text_encoder),
                             "original encoder": _gib(trainer.original_encoder),
                             "tower vision": _gib(clip.vision_model), "tower text": _gib(getattr(clip, "text_model", None))})
    for i in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        print(f"step {i} {time.perf_counter() - t0:.1f} s", _rss(), flush=True)
    state = optimizer_state_bytes(trainer.optimizer)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainer.params if p.grad is not None)
    print(f"optimizer state {state / 2**30:.3f} GiB, gradient {grads / 2**30:.3f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
