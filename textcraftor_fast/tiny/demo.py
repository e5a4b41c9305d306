"""The tiny-world demo: fine-tune only the text encoder, then a paired before/after evaluation on held-out
prompts (optionally the same for the paper's recipe), an interpolation grid and the reward curves.

    textcraftor-fast demo [--config builtin:tiny] [--out outputs/demo] [--quick] [--paper] [--split test|validation]
    textcraftor-fast demo --seeds 0,1,2,3,4 --threads 1,2      # the robustness sweep (tiny/sweep.py)

Every run goes through `textcraftor_fast.train` (the engine the SD1.5 path uses). The held-out split is the
loaded world's (its build_info.json, split.py): the demo evaluates on it and trains on the world's other
captions. Evaluation: every caption of the split x `seeds_per_caption` seeds; the base and tuned encoders see
the same (caption, initial noise) pairs, so intervals are on paired differences. The acceptance verdict is
computed, never tuned.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from . import data as D
from .evaluate import compare, eval_set, evaluate_encoder, format_read_as, pair_breakdown, verdict
from .split import SPLITS, HeldOut, read_held_out, write_prompt_files

logger = logging.getLogger(__name__)

# Noise seeds per held-out caption, 648 paired samples on either split: 36 captions x 18 each. Enough that a
# shape gain of 0.05 is resolved (half-width ~0.025) and that a side effect as small as 4 samples in 648 shows
# in another attribute's interval: more samples make "others held" stricter, not looser.
SEEDS_PER_CAPTION = {"test": 18, "validation": 18}
INTERPOLATION = (0.25, 0.5, 0.75)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` intra-op threads (None: unchanged). Float reductions, hence a fine-tuning
    trajectory, depend on the thread count: the sweep sets it inside the run, not only through OMP_NUM_THREADS."""
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"evaluation split {split!r} is not one of {', '.join(map(repr, SPLITS))}")


def eval_captions(split: str, held_out: HeldOut) -> list[D.Caption]:
    """The captions of `split` ('test': the reported numbers, once per run; 'validation': design work)."""
    check_split(split)
    return held_out.captions(split)


def for_world(cfg: TrainConfig, out_dir: Path) -> tuple[TrainConfig, HeldOut]:
    """`cfg` fitted to the world it loads, and that world's split. The world's train/test/validation captions
    are written to out_dir/prompts/; data.path 'builtin:tiny_world' (the shipped world's files) becomes its
    train.txt (for the shipped world the same lines in the same order), and tiny_alignment rewards without a
    `path` read this world's judge. Training prompts naming a held-out pair are refused."""
    from ..data import load_prompts
    from .world import world_folder

    world = world_folder(cfg.model)
    held_out = read_held_out(world)
    files = write_prompt_files(held_out, out_dir / "prompts")
    data = cfg.data
    if data.path == "builtin:tiny_world":
        data = dataclasses.replace(data, path=str(files["train"]))
    captions = map(D.parse_caption, load_prompts(data.path, data.field, data.max_prompts, data.on_bad_line))
    leaked = sorted(c.text for c in captions if (c.colour, c.shape) in held_out.all_pairs)
    if leaked:
        raise ValueError(f"data.path {data.path!r} trains on captions of pairs held out in the world at {world} "
                         f"(e.g. {leaked[0]!r}): use 'builtin:tiny_world' (its own training captions) or "
                         f"{files['train']}")
    rewards = tuple(dataclasses.replace(r, path=str(world)) if r.name == "tiny_alignment" and not r.path else r
                    for r in cfg.rewards)
    return dataclasses.replace(cfg, data=data, rewards=rewards), held_out


def paper_recipe(cfg: TrainConfig) -> TrainConfig:
    """The paper's default recipe on the same world: last K = 5 steps, trainable unconditional embedding;
    everything else (reward, lr, steps, batch, checkpointing) as `cfg` for a controlled comparison. The official
    code checkpoints every UNet call; that changes memory, not numbers (tests/test_sampler_proofs.py), and the
    tiny world's activations are small, so the arm keeps `cfg`'s policy rather than pay for recomputation."""
    sampler = dataclasses.replace(cfg.sampler, grad_steps=min(5, cfg.sampler.num_steps), train_uncond=True,
                                  switch_step=None)
    return dataclasses.replace(cfg, sampler=sampler)


def quick_config(cfg: TrainConfig) -> TrainConfig:
    """A shortened run for smoke tests: 3 optimizer steps at batch 4."""
    train = dataclasses.replace(cfg.train, steps=3, batch_size=4, checkpointing_steps=1000)
    return dataclasses.replace(cfg, train=train)


def target_attributes() -> list[str]:
    """The attribute(s) the world leaves partly right (data.TARGET_ATTRIBUTES): the acceptance's target.
    Fixed by the world's design, not by the reward, so a reward choice cannot move the goalposts."""
    return list(D.TARGET_ATTRIBUTES)


def _train_arm(name: str, cfg: TrainConfig, out_dir: Path, base_encoder):
    from .. import train

    # The demo owns out_dir/<arm>: every demo run starts over there (a real run refuses to, see output.overwrite).
    output = dataclasses.replace(cfg.output, dir=str(out_dir / name), overwrite=True)
    arm_cfg = dataclasses.replace(cfg, output=output)
    t0 = time.time()
    threads = _threads()  # what this run trained with (the sweep sets it per run)
    result = train(arm_cfg)
    if result.steps < arm_cfg.train.steps:
        # Stopped by a signal (the engine saved and returned): a half-trained encoder's verdict means nothing.
        print(f"{name}: fine-tuning stopped at step {result.steps} of {arm_cfg.train.steps}; not evaluating a partial "
              f"run (checkpoint: {result.checkpoint})", file=sys.stderr)
        raise KeyboardInterrupt
    from ..models import load_text_encoder

    # A LoRA run's result is an adapter file: merged into the world's own encoder, as generate/evaluate load it.
    tuned = load_text_encoder(result.text_encoder, base=base_encoder).eval().requires_grad_(False)
    return arm_cfg, result, tuned, time.time() - t0, threads


def _summary_line(name: str, table: dict, key: str) -> str:
    r = table[key]
    return (f"| {name} | {key} | {r['before']:.3f} ± {r['before_hw']:.3f} | {r['after']:.3f} ± {r['after_hw']:.3f} "
            f"| {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] |")


VERDICT_COLUMNS = ("shape_correct", "reward", "colour_correct", "size_correct", "background_correct")


def interval(row: dict[str, float]) -> str:
    """A paired difference with its 95% interval: '+0.060 [+0.017, +0.103]'."""
    return f"{row['diff']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]"


def verdict_line(name: str, res: dict[str, Any]) -> str:
    """One line per run: PASS/FAIL, then every judged metric's paired difference with its interval."""
    cells = ", ".join(f"{c.removesuffix('_correct')} {interval(res['table'][c])}" for c in VERDICT_COLUMNS)
    return f"{name}: {'PASS' if res['verdict']['passed'] else 'FAIL'}: {cells}"


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table: every metric of every arm, before/after with 95% intervals and the paired difference."""
    lines = [f"Held-out {report['split']} evaluation: {report['n_samples']} paired samples ({report['n_captions']} captions "
             f"x {report['seeds_per_caption']} seeds), DDIM {report['num_steps']} steps, CFG {report['guidance_scale']}.",
             "", "| run | metric | before | after | paired diff [95% CI] |", "|---|---|---|---|---|"]
    for arm, res in report["arms"].items():
        lines += [_summary_line(arm, res["table"], k) for k in res["table"]]
    lines += ["", "| run | emb cos (held-out, before -> after) | weight drift | train s | verdict |",
              "|---|---|---|---|---|"]
    for arm, res in report["arms"].items():
        v = res["verdict"]
        lines.append(f"| {arm} | {report['emb_cos_before']:.3f} -> {res['emb_cos_after']:.3f} | {res['drift']:.4f} "
                     f"| {res['train_seconds']:.0f} | {'PASS' if v['passed'] else 'FAIL'}: target {v['target_improved']}, "
                     f"reward {v['reward_improved']}, others held {v['others_held']} |")
    lines += ["", "Shape per held-out colour-shape pair (the judge's reading: circle / square / triangle):", "",
              "| run | pair | samples | shape before | shape after | read as, before | read as, after |",
              "|---|---|---|---|---|---|---|"]
    for arm, res in report["arms"].items():
        for pair, e in res["pairs"].items():
            lines.append(f"| {arm} | {pair} | {e['n']} | {e['before']:.3f} | {e['after']:.3f} | "
                         f"{format_read_as(e['before_read_as'])} | {format_read_as(e['after_read_as'])} |")
    return "\n".join(lines)


def _grid(comp, judge, rewards, arm_cfg, tuned, base, prompts, seeds, out_dir: Path) -> Path:
    from .plots import pick_grid_rows, save_grid, stack_rows  # lazy: matplotlib only where a picture is drawn

    rows = pick_grid_rows(prompts)
    sub_p, sub_s = [prompts[i] for i in rows], [seeds[i] for i in rows]
    columns, titles = [stack_rows(base["images"], rows)], ["original"]
    for w in INTERPOLATION:
        res = evaluate_encoder(comp, judge, rewards, arm_cfg.sampler, sub_p, sub_s, tuned=tuned, w=w)
        columns.append(res["images"])
        titles.append(f"w = {w}")
    res = evaluate_encoder(comp, judge, rewards, arm_cfg.sampler, sub_p, sub_s, tuned=tuned, w=1.0)
    columns.append(res["images"])
    titles.append("tuned")
    labels = [p.removeprefix("a ") for p in sub_p]
    return save_grid(columns, titles, labels, out_dir / "grid.png")


def arm_report(comp, judge, rewards, name, cfg, out_dir, base, prompts, seeds) -> tuple[dict, Any, Any]:
    """Fine-tune one arm (`cfg`) into out_dir/<name> and evaluate it on (prompts, seeds) against `base`, the
    original encoder's results there: (report entry with table and verdict, the run's config, tuned encoder)."""
    from ..training.monitor import weight_drift

    arm_cfg, result, tuned, seconds, threads = _train_arm(name, cfg, out_dir, comp.text_encoder)
    t0 = time.time()
    after = evaluate_encoder(comp, judge, rewards, arm_cfg.sampler, prompts, seeds, tuned=tuned,
                             progress=f"evaluating {name}")
    table = compare(base, after)
    res = {"table": table, "verdict": verdict(table, target_attributes()), "train_seconds": seconds,
           "pairs": pair_breakdown(base, after, prompts),
           "train_threads": threads,
           "eval_seconds": time.time() - t0, "steps": result.steps, "emb_cos_after": float(after["emb_cos"]),
           "drift": weight_drift(tuned, comp.text_encoder), "history": result.history,
           "config": {"grad_steps": arm_cfg.sampler.grad_steps, "train_uncond": arm_cfg.sampler.train_uncond,
                      "lr": arm_cfg.optim.lr, "steps": arm_cfg.train.steps, "batch_size": arm_cfg.train.batch_size,
                      "encoder": dataclasses.asdict(arm_cfg.encoder)}}
    logger.info("%s: trained %d steps in %.0f s; %s", name, result.steps, seconds, res["verdict"])
    return res, arm_cfg, tuned


def load_world(cfg: TrainConfig):
    """(components, judge, rewards) of the demo's world, loaded once for every arm and evaluation."""
    from ..models.loading import load_components
    from ..rewards import build_rewards
    from .world import load_judge, world_folder

    return load_components(cfg.model, seed=cfg.seed), load_judge(world_folder(cfg.model)), build_rewards(cfg.rewards)


def run_demo(cfg: TrainConfig, out_dir: str | Path = "outputs/demo", quick: bool = False,
             seeds_per_caption: int | None = None, paper: bool = False, split: str = "test",
             threads: int | None = None) -> dict[str, Any]:
    """Train, evaluate, plot; writes report.json, report.md, grid.png, reward_curve.png under `out_dir`.
    `split`: the held-out captions evaluated ('test' or 'validation'); `threads`: torch threads for the run;
    `paper`: also train and report the paper's recipe (`paper_recipe`) beside the main arm."""
    with torch_threads(threads):
        return _run_demo(cfg, Path(out_dir), quick, seeds_per_caption, paper, split)


def _run_demo(cfg: TrainConfig, out_dir: Path, quick: bool, seeds_per_caption: int | None, paper: bool,
              split: str) -> dict[str, Any]:
    t_start = time.time()
    check_split(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, held_out = for_world(quick_config(cfg) if quick else cfg, out_dir)
    captions = eval_captions(split, held_out)
    spc = seeds_per_caption or (1 if quick else SEEDS_PER_CAPTION[split])
    comp, judge, rewards = load_world(cfg)
    prompts, seeds = eval_set(captions, spc)
    base = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, seeds, progress="evaluating the original")
    report: dict[str, Any] = {
        "split": split, "held_out_pairs": held_out.to_json()[split], "n_samples": len(prompts),
        "n_captions": len(captions), "seeds_per_caption": spc,
        "num_steps": cfg.sampler.num_steps, "guidance_scale": cfg.sampler.guidance_scale,
        "emb_cos_before": float(base["emb_cos"]), "arms": {}, "quick": quick, "threads": _threads()}
    arms = {"tuned": cfg, "paper_recipe": paper_recipe(cfg)} if paper else {"tuned": cfg}
    main_cfg = main_tuned = None
    for name, arm in arms.items():
        res, arm_cfg, tuned = arm_report(comp, judge, rewards, name, arm, out_dir, base, prompts, seeds)
        report["arms"][name] = res
        if name == "tuned":
            main_cfg, main_tuned = arm_cfg, tuned
    _grid(comp, judge, rewards, main_cfg, main_tuned, base, prompts, seeds, out_dir)
    report["seconds"] = time.time() - t_start
    written = write_report(report, out_dir)
    print(format_report(report))
    print("\nVerdict (paired differences tuned - original, 95% intervals; PASS needs shape and reward above zero "
          "and no other attribute's interval below zero):")
    for name, res in report["arms"].items():
        print("  " + verdict_line(name, res))
    if quick:
        print(f"  (--quick: {cfg.train.steps} fine-tuning steps and {len(prompts)} samples, a smoke test of the "
              "pipeline; its verdict says nothing about the method)")
    print(f"\nwrote {', '.join(str(p) for p in [out_dir / 'grid.png', *written])} in {report['seconds']:.0f} s")
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """A finished demo's report: reward_curve.png (training curves), pairs.png (target accuracy per held-out pair,
    before and after, with 95% Wilson intervals), report.md and report.json (everything but the histories)."""
    from .plots import save_pair_chart, save_reward_curve  # lazy: matplotlib only where a picture is drawn

    paths = [save_reward_curve({k: v["history"] for k, v in report["arms"].items()}, out_dir / "reward_curve.png"),
             save_pair_chart({k: v["pairs"] for k, v in report["arms"].items()}, out_dir / "pairs.png",
                             f"held-out {report['split']}")]
    paths.append(out_dir / "report.md")
    paths[-1].write_text(format_report(report) + "\n")
    slim = {**report, "arms": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                               for k, v in report["arms"].items()}}
    paths.append(out_dir / "report.json")
    paths[-1].write_text(json.dumps(slim, indent=2) + "\n")
    return paths


def _threads() -> int:
    import torch

    return torch.get_num_threads()
