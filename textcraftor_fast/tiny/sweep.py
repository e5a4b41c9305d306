"""The demo's robustness sweep: the main arm fine-tuned at every (seed, thread count), each run evaluated
once on one held-out split of the loaded world (its build_info.json) against the original encoder, and one
table of verdicts.

    textcraftor-fast demo --seeds 0,1,2,3,4 --threads 1,2 [--split test] [--out outputs/demo-sweep]

Exits 1 unless every run passes.

A thread count changes float reduction orders and so the whole fine-tuning trajectory: a verdict that
flips with it is noise. The count is set inside each run (torch.set_num_threads), so one process sweeps
both. The original encoder is evaluated once per thread count, on the same (caption, noise) pairs as
every tuned encoder, so each run's intervals are paired. Writes sweep.md and sweep.json under --out.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from .demo import (SEEDS_PER_CAPTION, VERDICT_COLUMNS, arm_report, check_split, eval_captions, for_world, interval,
                   load_world, torch_threads, verdict_line)
from .evaluate import eval_set, evaluate_encoder


def format_sweep(sweep: dict[str, Any]) -> str:
    """A Markdown table: one line per (seed, threads) run with every paired difference and the verdict."""
    head = ["seed", "threads", "shape (target)", "reward", "colour", "size", "background", "train s", "verdict"]
    lines = [f"Sweep on the held-out {sweep['split']} split: {sweep['n_samples']} paired samples per run "
             f"({sweep['n_captions']} captions x {sweep['seeds_per_caption']} noise seeds); paired differences "
             "tuned - original with 95% intervals.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in sweep["runs"]:
        cells = [str(run["seed"]), str(run["threads"])] + [interval(run["table"][c]) for c in VERDICT_COLUMNS]
        cells += [f"{run['train_seconds']:.0f}", "PASS" if run["verdict"]["passed"] else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{sweep['passed']} of {len(sweep['runs'])} runs PASS."]
    return "\n".join(lines)


def run_sweep(cfg: TrainConfig, seeds: list[int], threads: list[int], out_dir: str | Path = "outputs/demo-sweep",
              split: str = "test", seeds_per_caption: int | None = None) -> dict[str, Any]:
    """Fine-tune the main arm at every (seed, threads) and evaluate each once on `split`; returns the sweep."""
    check_split(split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, held_out = for_world(cfg, out_dir)  # the loaded world's split, and training on its own captions
    captions = eval_captions(split, held_out)
    spc = seeds_per_caption or SEEDS_PER_CAPTION[split]
    comp, judge, rewards = load_world(cfg)
    prompts, eval_seeds = eval_set(captions, spc)
    sweep: dict[str, Any] = {"split": split, "held_out_pairs": held_out.to_json()[split], "n_samples": len(prompts),
                             "n_captions": len(captions), "seeds_per_caption": spc, "runs": []}
    t0 = time.time()
    for n_threads in threads:
        with torch_threads(n_threads):
            base = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, eval_seeds,
                                    progress=f"evaluating the original ({n_threads} threads)")
            for seed in seeds:
                name = f"seed{seed}-threads{n_threads}"
                res, _, _ = arm_report(comp, judge, rewards, name, dataclasses.replace(cfg, seed=seed), out_dir,
                                        base, prompts, eval_seeds)
                res.pop("history")
                sweep["runs"].append({"seed": seed, "threads": n_threads, **res})
                print(verdict_line(name, res), flush=True)
    sweep["passed"] = sum(r["verdict"]["passed"] for r in sweep["runs"])
    sweep["seconds"] = time.time() - t0
    text = format_sweep(sweep)
    (out_dir / "sweep.md").write_text(text + "\n")
    (out_dir / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    print(text)
    print(f"\nwrote {out_dir / 'sweep.md'} in {sweep['seconds']:.0f} s")
    return sweep
