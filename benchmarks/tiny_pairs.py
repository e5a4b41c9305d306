"""Per colour-shape pair breakdown of the tiny demo: where a shape gain comes from (or why there is none).

    python benchmarks/tiny_pairs.py outputs/demo-sweep > pairs.md          # every run of a finished sweep
    python benchmarks/tiny_pairs.py outputs/demo-sweep --attribute size --runs 1:1   # size, one run
    python benchmarks/tiny_pairs.py --encoder DIR [--threads 2]             # one tuned encoder on the
                                                                            # training captions and validation

A sweep's sweep.json records `evaluate.pair_breakdown` per run; one written before it did (the 2026-11-29 test
sweep) is re-evaluated: every run's saved tuned encoder (`<sweep>/seed*-threads*/text_encoder`) on the sweep's
split and noise seeds, at the run's own thread count, against the original encoder at that thread count. The
overall shape difference it recomputes must equal the sweep's (checked): the same command, the same numbers.
A diagnostic: re-evaluating reads the split the sweep was evaluated on again.
With --encoder it never reads the test split: the 72 training captions x 9 seeds and the validation split
(18 captions x 36 seeds), 648 samples each.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import CLIPTextModel

from textcraftor_fast.config import load_config
from textcraftor_fast.tiny import data as D
from textcraftor_fast.tiny.demo import SEEDS_PER_CAPTION, eval_captions, load_world, torch_threads
from textcraftor_fast.tiny.evaluate import compare, eval_set, evaluate_encoder, format_read_as, pair_breakdown
from textcraftor_fast.tiny.split import read_held_out
from textcraftor_fast.tiny.world import WEIGHTS_DIR


def main(sweep_dir: str, attribute: str = "shape", only: set[tuple[int, int]] | None = None) -> int:
    sweep = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    prompts, seeds = eval_set(eval_captions(sweep["split"], read_held_out(WEIGHTS_DIR)), sweep["seeds_per_caption"])
    pairs = list(dict.fromkeys(f"{c.colour} {c.shape}" for c in map(D.parse_caption, prompts)))
    print(f"{attribute.capitalize()} per held-out pair, {sweep['split']} split, {len(prompts)} samples per run; the "
          f"judge's reading {' / '.join(D.ATTRIBUTES[attribute])}, before -> after.\n")
    print("| seed | threads | " + " | ".join(pairs) + " |")
    print("|---|---|" + "---|" * len(pairs))
    reevaluate = _Reevaluation(sweep_dir, prompts, seeds, attribute)
    for run in sweep["runs"]:
        if only is not None and (run["seed"], run["threads"]) not in only:
            continue
        # A sweep records the shape breakdown only; any other attribute is re-evaluated.
        breakdown = run["pairs"] if "pairs" in run and attribute == "shape" else reevaluate(run)
        cells = [f"{e['before']:.2f} -> {e['after']:.2f} ({_read(e['before_read_as'])} -> {_read(e['after_read_as'])})"
                 for e in breakdown.values()]
        print(f"| {run['seed']} | {run['threads']} | " + " | ".join(cells) + " |", flush=True)
    return 0


class _Reevaluation:
    """pair_breakdown of a sweep run that did not record it: the world loads on first use, the original encoder
    is evaluated once per thread count, and each run must reproduce the sweep's shape difference."""

    def __init__(self, sweep_dir: str, prompts: list[str], seeds: list[int], attribute: str = "shape"):
        self.sweep_dir, self.prompts, self.seeds, self.attribute = Path(sweep_dir), prompts, seeds, attribute
        self.world = None
        self.base_by_threads: dict = {}

    def __call__(self, run: dict) -> dict:
        cfg = load_config("builtin:tiny")
        if self.world is None:
            self.world = load_world(cfg)
        comp, judge, rewards = self.world
        n = run["threads"]
        with torch_threads(n):
            if n not in self.base_by_threads:
                self.base_by_threads[n] = evaluate_encoder(comp, judge, rewards, cfg.sampler, self.prompts, self.seeds)
            base = self.base_by_threads[n]
            folder = self.sweep_dir / f"seed{run['seed']}-threads{n}" / "text_encoder"
            tuned = CLIPTextModel.from_pretrained(folder).eval().requires_grad_(False)
            after = evaluate_encoder(comp, judge, rewards, cfg.sampler, self.prompts, self.seeds, tuned=tuned)
        diff = compare(base, after)["shape_correct"]["diff"]
        if abs(diff - run["table"]["shape_correct"]["diff"]) > 1e-9:
            raise SystemExit(f"seed {run['seed']} threads {n}: shape diff {diff} differs from the sweep's "
                             f"{run['table']['shape_correct']['diff']}: not the same evaluation")
        return pair_breakdown(base, after, self.prompts, self.attribute)


def one_encoder(folder: str, threads: int) -> int:
    cfg = load_config("builtin:tiny")
    comp, judge, rewards = load_world(cfg)
    tuned = CLIPTextModel.from_pretrained(folder).eval().requires_grad_(False)
    held_out = read_held_out(WEIGHTS_DIR)
    for split, captions, per_caption in (("training captions", held_out.train_captions(), 9),
                                         ("validation", held_out.captions("validation"),
                                          SEEDS_PER_CAPTION["validation"])):
        prompts, seeds = eval_set(captions, per_caption)
        with torch_threads(threads):
            base = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, seeds)
            after = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, seeds, tuned=tuned)
        print(f"\n{split}, {len(prompts)} samples, {threads} threads: shape before -> after, the judge's reading "
              "circle / square / triangle before -> after\n\n| pair | samples | shape | read as |\n|---|---|---|---|")
        squares = [0, 0]
        for pair, e in pair_breakdown(base, after, prompts).items():
            squares[0] += e["before_read_as"]["square"]
            squares[1] += e["after_read_as"]["square"]
            print(f"| {pair} | {e['n']} | {e['before']:.2f} -> {e['after']:.2f} | {_read(e['before_read_as'])} -> "
                  f"{_read(e['after_read_as'])} |")
        print(f"\nread as squares: {squares[0]} -> {squares[1]} of {len(prompts)}", flush=True)
    return 0


def _read(counts: dict[str, int]) -> str:
    return format_read_as(counts, sep="/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", default="outputs/demo-sweep")
    parser.add_argument("--encoder", help="one tuned text encoder folder: training captions and validation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attribute", choices=list(D.ATTRIBUTES), default="shape",
                        help="the attribute broken down per pair (a sweep's runs are re-evaluated for any but shape)")
    parser.add_argument("--runs", help="only these runs of the sweep, as seed:threads,... (e.g. 1:1,1:2)")
    args = parser.parse_args()
    only = None
    if args.runs:
        try:
            only = {tuple(int(x) for x in item.split(":")) for item in args.runs.split(",")}
        except ValueError:
            parser.error(f"--runs {args.runs!r}: expected seed:threads pairs separated by commas, e.g. 1:1,1:2")
    raise SystemExit(one_encoder(args.encoder, args.threads) if args.encoder
                     else main(args.sweep_dir, args.attribute, only))
