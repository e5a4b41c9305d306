"""Per held-out pair breakdown of a finished demo sweep: where each run's shape gain comes from (or not).

    python benchmarks/tiny_pairs.py outputs/demo-sweep > pairs.md

Re-evaluates every run's saved tuned encoder (`<sweep>/seed*-threads*/text_encoder`) on the sweep's split and
noise seeds, at the run's own thread count, against the original encoder at that thread count, and prints
`evaluate.pair_breakdown` per run. The overall shape difference it recomputes must equal the sweep's (checked):
the same command, the same numbers. A diagnostic: it reads the split the sweep was evaluated on again.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import CLIPTextModel

from textcraftor_fast.config import load_config
from textcraftor_fast.tiny import data as D
from textcraftor_fast.tiny.demo import eval_captions, load_world, torch_threads
from textcraftor_fast.tiny.evaluate import compare, eval_set, evaluate_encoder, pair_breakdown


def main(sweep_dir: str) -> int:
    sweep = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    cfg = load_config("builtin:tiny")
    comp, judge, rewards = load_world(cfg)
    prompts, seeds = eval_set(eval_captions(sweep["split"]), sweep["seeds_per_caption"])
    print(f"Shape per held-out pair, {sweep['split']} split, {len(prompts)} samples per run; the judge's reading "
          "circle / square / triangle, before -> after.\n")
    print("| seed | threads | " + " | ".join(_pairs(prompts)) + " |")
    print("|---|---|" + "---|" * len(_pairs(prompts)))
    base_by_threads = {}
    for run in sweep["runs"]:
        n = run["threads"]
        with torch_threads(n):
            if n not in base_by_threads:
                base_by_threads[n] = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, seeds)
            base = base_by_threads[n]
            folder = Path(sweep_dir) / f"seed{run['seed']}-threads{n}" / "text_encoder"
            tuned = CLIPTextModel.from_pretrained(folder).eval().requires_grad_(False)
            after = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, seeds, tuned=tuned)
        diff = compare(base, after)["shape_correct"]["diff"]
        if abs(diff - run["table"]["shape_correct"]["diff"]) > 1e-9:
            raise SystemExit(f"seed {run['seed']} threads {n}: shape diff {diff} differs from the sweep's "
                             f"{run['table']['shape_correct']['diff']}: not the same evaluation")
        cells = []
        for e in pair_breakdown(base, after, prompts).values():
            read = lambda counts: "/".join(str(counts[c]) for c in D.SHAPES)  # noqa: E731
            cells.append(f"{e['before']:.2f} -> {e['after']:.2f} ({read(e['before_read_as'])} -> "
                         f"{read(e['after_read_as'])})")
        print(f"| {run['seed']} | {n} | " + " | ".join(cells) + " |", flush=True)
    return 0


def _pairs(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(f"{c.colour} {c.shape}" for c in map(D.parse_caption, prompts)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo-sweep"))
