"""Issue 12's GPU measurements, run by benchmarks/gpu.sh: SD1.5 at 512x512, K = 5, 25 DDIM steps.

Suites (`--only`, default all):
  step     ours (bf16 towers, checkpoint / checkpoint_vae / checkpoint_towers 'auto' under the default CUDA budget)
           vs the official recipe
           (baseline_official.py: fp32 with TF32, UNet and tower weight gradients, plain VAE decode), batch 1 and 4,
           on a PickScore-sized reward (open_clip ViT-H/14, random weights): s/sample, samples/s, MFU, peak memory.
  speed    ours at batch 1 with each speed option on alone: channels_last, torch.compile (inductor).
  recipe   the full four-reward recipe (aesthetic on CLIP ViT-L/14, PickScore ViT-H/14, HPSv2 ViT-H/14, CLIP score
           ViT-g/14, all in their published architectures, random weights), ours, batch 1 and 4: peak memory and
           s/sample, under train.memory_budget_gb = 20 (the policy recomputes what that budget needs); batch 1 must
           stay under 20 GiB to train on a 24 GB card.

Peak memory of an arm = what its Trainer holds after building (weights, optimizer state) + the step's peak above
that (`max_memory_allocated`), so arms can share one process and still report what a process running only that
arm would allocate (CUDA context excluded). MFU = the FLOP model's useful work (paper/NOTES.md: the sampler,
input-gradient backward, VAE, towers; neither recomputation nor the official code's weight gradients count) /
time / the card's dense bf16 peak; the baseline does the same useful work, so the MFU ratio is the speed ratio.

  python benchmarks/gpu_recipe.py --out DIR [--only step,speed,recipe]
  python benchmarks/gpu_recipe.py --out DIR --smoke     # the same code on CPU with tiny models (tests)
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# paper/NOTES.md's FLOP model, GFLOP per sample at 512x512: one UNet call (64x64 latent) forward and its
# input-gradient backward; VAE decoder forward and forward+backward; reward towers' image sides, forward.
UNET_FWD, UNET_BWD_INPUT = 803.0, 929.0
VAE_FWD, VAE_FWD_BWD = 2515.0, 5063.0
TOWER_FWD = {"ViT-L-14": 162.0, "ViT-H-14": 335.0, "ViT-g-14": 534.0}
# Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


# Ours: recompute only what the memory budget needs (memory/policy.py), UNet calls first, then the decoder, then
# the CLIP transformers. The full recipe runs under a 20 GiB budget: what a 24 GB card leaves (issue 12).
AUTO = ("sampler.checkpoint=auto", "sampler.checkpoint_vae=auto", "sampler.checkpoint_towers=auto")
RECIPE_BUDGET_GB = 20.0


def useful_gflop(num_steps: int, k: int, towers: list[str]) -> float:
    """One sample's useful work: CFG sampler forward, K input-gradient backwards, VAE forward+backward, towers
    forward+input backward (about twice the forward)."""
    return (num_steps * 2 * UNET_FWD + k * 2 * UNET_BWD_INPUT + VAE_FWD_BWD
            + sum(2 * TOWER_FWD.get(t, 0.0) for t in towers))


def executed_gflop(num_steps: int, k: int, towers: list[str], recomputed_calls: int, vae_recomputed: bool,
                   unet_weight_grads: bool, towers_recomputed: bool = False) -> float:
    """What a step really runs per sample: the useful work plus recomputed UNet calls (and decoder, and the towers'
    image sides when checkpointed per layer), plus the official code's UNet weight gradients (about one forward
    per call)."""
    return (useful_gflop(num_steps, k, towers) + recomputed_calls * 2 * UNET_FWD + vae_recomputed * VAE_FWD
            + towers_recomputed * sum(TOWER_FWD.get(t, 0.0) for t in towers) + unet_weight_grads * k * 2 * UNET_FWD)


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


@dataclass(frozen=True)
class Setup:
    device: str
    model: list[str]  # model.* overrides
    resolution: int
    num_steps: int
    k: int
    batches: tuple[int, ...]
    rounds: int
    towers: dict[str, Path]  # arch -> random CLIP folder


def _write_tower(folder: Path, arch: str, device: str, smoke: bool) -> Path:
    if folder.exists():
        return folder
    if smoke:  # tiny, but with the 768-d embedding the shipped aesthetic head reads
        from random_towers import write_random_clip

        return write_random_clip(folder, embed_dim=768)
    from transformers import CLIPModel

    from textcraftor_fast.rewards.openclip_convert import ARCHS, hf_clip_config

    with torch.device(device):
        torch.manual_seed(0)
        model = CLIPModel(hf_clip_config(ARCHS[arch]))
    model.half().save_pretrained(str(folder))  # fp16 on disk halves the write; loaded in the run's dtype
    del model
    return folder


def _setup(workdir: Path, smoke: bool, rounds: int) -> Setup:
    from random_towers import write_random_sd15

    towers = {arch: _write_tower(workdir / arch, arch, "cpu" if smoke else "cuda", smoke) for arch in TOWER_FWD}
    if smoke:
        return Setup("cpu", ["model.kind=tiny_random"], 32, 4, 2, (1, 2), 1, towers)
    model = workdir / "sd15.safetensors"
    if not model.exists():
        write_random_sd15(model, device="cuda")
    return Setup("cuda", ["model.kind=pretrained", f'model.path="{model}"'], 512, 25, 5, (1, 4), rounds, towers)


def _rewards(s: Setup, names: list[str]) -> tuple[str, list[str]]:
    t = s.towers
    specs = {"aesthetic": (f'{{name="aesthetic", weight=3.0, clip_path="{t["ViT-L-14"]}"}}', "ViT-L-14"),
             "pickscore": (f'{{name="pickscore", weight=1.0, path="{t["ViT-H-14"]}"}}', "ViT-H-14"),
             "hpsv2": (f'{{name="hpsv2", weight=100.0, path="{t["ViT-H-14"]}"}}', "ViT-H-14"),
             "clip_score": (f'{{name="clip_score", weight=1.0, path="{t["ViT-g-14"]}"}}', "ViT-g-14")}
    return "rewards=[" + ", ".join(specs[n][0] for n in names) + "]", [specs[n][1] for n in names]


def _overrides(s: Setup, out: Path, batch: int, rewards: str, *extra: str) -> list[str]:
    return [*s.model, f"model.resolution={s.resolution}", f"sampler.num_steps={s.num_steps}",
            f"sampler.grad_steps={s.k}", f"train.batch_size={batch}", f"train.device={s.device}", rewards,
            "data.max_prompts=16", "train.progress_bar=false", "output.overwrite=true",
            "train.checkpointing_steps=100000", f'output.dir="{out}"', *extra]


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _build(arm: str, overrides: list[str]):
    from baseline_official import official_trainer
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import Trainer

    before = _allocated()
    trainer = official_trainer(None, overrides) if arm == "baseline" else Trainer(load_config(None, overrides))
    return trainer, _allocated() - before


def _timed_step(trainer) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    return time.perf_counter() - t0, 0


def _first_gradient(trainer, batch: int) -> torch.Tensor:
    """The encoder gradient of one forward/backward on fixed prompts and noise (the same in every arm)."""
    trainer.generator.manual_seed(1234)
    loss, _ = trainer.forward(["a photo of an astronaut riding a horse"] * batch, trainer.cfg.sampler.grad_steps)
    loss.backward()
    grad = torch.cat([p.grad.float().flatten() for p in trainer.params if p.grad is not None])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad


def measure(arms: dict[str, list[str]], batch: int, rounds: int, towers: list[str], device_name: str) -> list[dict]:
    """Build every arm, one warm-up step each, then `rounds` steps interleaved; one row per arm with MFU (useful
    FLOPs) and HFU (FLOPs the arm's plan really runs: recomputation, the baseline's weight gradients)."""
    built = {name: _build(name.split(":")[0], ov) for name, ov in arms.items()}
    cosine: dict[str, float] = {}
    first = None
    for name, (trainer, _) in built.items():  # also the warm-up (compiles, cuDNN autotuning, text features)
        grad = _first_gradient(trainer, batch)
        first = grad if first is None else first
        cosine[name] = torch.nn.functional.cosine_similarity(grad, first, dim=0).item()
        del grad
        trainer.train_step()
    times: dict[str, list[float]] = {n: [] for n in built}
    peaks: dict[str, list[int]] = {n: [] for n in built}
    for _ in range(rounds):
        for name, (trainer, _) in built.items():
            t, p = _timed_step(trainer)
            times[name].append(t)
            peaks[name].append(p)
    peak = peak_tflops(device_name)
    rows = []
    for name, (trainer, resident) in built.items():
        cfg, plan = trainer.cfg.sampler, trainer.memory_plan
        gflop = useful_gflop(cfg.num_steps, cfg.grad_steps, towers)
        recomputed = cfg.grad_steps - plan.plain_unet_calls if plan.plain_unet_calls is not None else (
            0 if cfg.checkpoint == "none" else cfg.grad_steps)  # 'step': every graph-carrying call
        ran = executed_gflop(cfg.num_steps, cfg.grad_steps, towers, recomputed, plan.vae not in (False, "false"),
                             any(p.requires_grad for p in trainer.unet.parameters()), bool(plan.towers))
        s = statistics.median(times[name])
        row = {"arm": name, "batch": batch, "s_per_step": s, "s_per_sample": s / batch, "samples_per_s": batch / s,
               "times_s": times[name], "resident_gib": resident / 2**30, "step_peak_gib": max(peaks[name]) / 2**30,
               "peak_gib": (resident + max(peaks[name])) / 2**30, "useful_tflop_per_sample": gflop / 1e3,
               "executed_tflop_per_sample": ran / 1e3, "grad_cosine_vs_first_arm": cosine[name], "plain_unet_calls": plan.plain_unet_calls, "vae": str(plan.vae),
               "towers_checkpointed": bool(plan.towers)}
        if peak:
            row["mfu"] = gflop * 1e9 * batch / s / (peak * 1e12)
            row["hfu"] = ran * 1e9 * batch / s / (peak * 1e12)
        rows.append(row)
    base = next((r for r in rows if r["arm"] == "baseline"), None)
    for r in rows:
        if base is not None:
            r["speedup_vs_baseline"] = base["s_per_step"] / r["s_per_step"]
            if base["peak_gib"] > 0:  # CUDA only: CPU rows carry no allocator peak
                r["peak_vs_baseline"] = r["peak_gib"] / base["peak_gib"]
    del built
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def suites(s: Setup, workdir: Path, device_name: str) -> dict:
    pick, pick_archs = _rewards(s, ["pickscore"])
    full, full_archs = _rewards(s, ["aesthetic", "pickscore", "hpsv2", "clip_score"])
    bf16 = "train.mixed_precision=bf16" if s.device == "cuda" else "train.mixed_precision=no"

    def step():
        return [row for b in s.batches for row in measure(
            {"baseline": _overrides(s, workdir / f"base{b}", b, pick),
             "ours": _overrides(s, workdir / f"ours{b}", b, pick, bf16, *AUTO)}, b, s.rounds, pick_archs,
                                device_name)]

    def speed():
        common = (bf16, *AUTO)
        # On CPU (smoke) inductor's C++ compiles take minutes: dynamo's capture alone ('eager') checks the wiring.
        backend = "ops.compile_backend=inductor" if s.device == "cuda" else "ops.compile_backend=eager"
        return measure({"ours": _overrides(s, workdir / "plain", 1, pick, *common),
                        "ours:channels_last": _overrides(s, workdir / "cl", 1, pick, *common, "ops.channels_last=true"),
                        "ours:compile": _overrides(s, workdir / "compile", 1, pick, *common, "ops.compile=true",
                                                        backend)},
                       1, s.rounds, pick_archs, device_name)

    def recipe():
        return [row for b in s.batches for row in measure(
            {"ours": _overrides(s, workdir / f"recipe{b}", b, full, bf16, *AUTO, f"train.memory_budget_gb={RECIPE_BUDGET_GB}")},
            b, s.rounds, full_archs, device_name)]

    return {"step": step, "speed": speed, "recipe": recipe}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="step,speed,recipe")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: checks the script, measures nothing")
    ap.add_argument("--workdir", type=Path, help="where the random models are written (default: OUT/models)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_recipe.py measures a CUDA GPU; none is visible (use --smoke to check the script on CPU)")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu (smoke)"
    workdir = args.workdir or args.out / "models"
    workdir.mkdir(parents=True, exist_ok=True)
    import diffusers
    import transformers

    result = {"device": device_name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "peak_bf16_tflops": peak_tflops(device_name), "suites": {}}
    t0 = time.perf_counter()
    setup = _setup(workdir, args.smoke, args.rounds)
    result["setup_s"] = time.perf_counter() - t0
    slug = device_name.replace(" ", "-").replace("(", "").replace(")", "")
    for name, suite in suites(setup, workdir, device_name).items():
        if name not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        try:
            rows = suite()
            result["suites"][name] = {"rows": rows, "seconds": time.perf_counter() - t0}
            print(f"== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for r in rows:
                print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                       if k != "times_s"), flush=True)
        except Exception:  # keep the other suites' numbers
            result["suites"][name] = {"error": traceback.format_exc()}
            print(f"== {name} FAILED\n{traceback.format_exc()}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu-{slug}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if all("rows" in v for v in result["suites"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
