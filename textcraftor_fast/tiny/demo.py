"""The tiny-world demo: fine-tune only the text encoder, then a paired before/after evaluation on held-out
prompts, the same for the paper's recipe, an interpolation grid and the reward curves.

    textcraftor-fast demo --config configs/tiny.toml [--out outputs/demo] [--quick]

Both runs go through `textcraftor_fast.train` (the engine the SD1.5 path uses). Evaluation: every held-out
caption x `seeds_per_caption` seeds; the base and tuned encoders see the same (caption, initial noise)
pairs, so intervals are on paired differences. The acceptance verdict is computed, never tuned.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any


from ..config import TrainConfig
from . import data as D
from .evaluate import compare, eval_set, evaluate_encoder, verdict
from .plots import pick_grid_rows, save_grid, save_reward_curve, stack_rows

logger = logging.getLogger(__name__)

SEEDS_PER_CAPTION = 9  # 24 held-out captions x 9 seeds = 216 paired samples
INTERPOLATION = (0.25, 0.5, 0.75)


def paper_recipe(cfg: TrainConfig) -> TrainConfig:
    """The paper's default recipe on the same world: last K = 5 steps, trainable unconditional embedding,
    UNet calls checkpointed; everything else (reward, lr, steps, batch) as `cfg` for a controlled comparison."""
    sampler = dataclasses.replace(cfg.sampler, grad_steps=min(5, cfg.sampler.num_steps), train_uncond=True,
                                  switch_step=None, checkpoint="step")
    return dataclasses.replace(cfg, sampler=sampler)


def quick_config(cfg: TrainConfig) -> TrainConfig:
    """A shortened run for smoke tests: 3 optimizer steps at batch 4."""
    train = dataclasses.replace(cfg.train, steps=3, batch_size=4, checkpointing_steps=1000)
    return dataclasses.replace(cfg, train=train)


def target_attributes() -> list[str]:
    """The attribute(s) the world leaves partly right (data.TARGET_ATTRIBUTES): the acceptance's target.
    Fixed by the world's design, not by the reward, so a reward choice cannot move the goalposts."""
    return list(D.TARGET_ATTRIBUTES)


def _train_arm(name: str, cfg: TrainConfig, out_dir: Path):
    from .. import train

    # The demo owns out_dir/<arm>: every demo run starts over there (a real run refuses to, see output.overwrite).
    output = dataclasses.replace(cfg.output, dir=str(out_dir / name), overwrite=True)
    arm_cfg = dataclasses.replace(cfg, output=output)
    t0 = time.time()
    result = train(arm_cfg)
    from transformers import CLIPTextModel

    tuned = CLIPTextModel.from_pretrained(result.text_encoder).eval().requires_grad_(False)
    return arm_cfg, result, tuned, time.time() - t0


def _summary_line(name: str, table: dict, key: str) -> str:
    r = table[key]
    return (f"| {name} | {key} | {r['before']:.3f} ± {r['before_hw']:.3f} | {r['after']:.3f} ± {r['after_hw']:.3f} "
            f"| {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] |")


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table: every metric of every arm, before/after with 95% intervals and the paired difference."""
    lines = [f"Held-out evaluation: {report['n_samples']} paired samples ({report['n_captions']} held-out captions "
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
    return "\n".join(lines)


def _grid(comp, judge, rewards, arm_cfg, tuned, base, prompts, seeds, out_dir: Path) -> Path:
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


def _arm_report(comp, judge, rewards, name, cfg, out_dir, base, prompts, seeds) -> tuple[dict, Any, Any]:
    from ..monitor import weight_drift

    arm_cfg, result, tuned, seconds = _train_arm(name, cfg, out_dir)
    t0 = time.time()
    after = evaluate_encoder(comp, judge, rewards, arm_cfg.sampler, prompts, seeds, tuned=tuned)
    table = compare(base, after)
    res = {"table": table, "verdict": verdict(table, target_attributes()), "train_seconds": seconds,
           "eval_seconds": time.time() - t0, "steps": result.steps, "emb_cos_after": float(after["emb_cos"]),
           "drift": weight_drift(tuned, comp.text_encoder), "history": result.history,
           "config": {"grad_steps": arm_cfg.sampler.grad_steps, "train_uncond": arm_cfg.sampler.train_uncond,
                      "lr": arm_cfg.optim.lr, "steps": arm_cfg.train.steps, "batch_size": arm_cfg.train.batch_size}}
    logger.info("%s: trained %d steps in %.0f s; %s", name, result.steps, seconds, res["verdict"])
    return res, arm_cfg, tuned


def run_demo(cfg: TrainConfig, out_dir: str | Path = "outputs/demo", quick: bool = False,
             seeds_per_caption: int | None = None, paper: bool = True) -> dict[str, Any]:
    """Train, evaluate, plot; writes report.json, report.md, grid.png, reward_curve.png under `out_dir`."""
    from ..loaders import load_components
    from ..rewards import build_rewards
    from .world import load_judge

    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = quick_config(cfg) if quick else cfg
    spc = seeds_per_caption or (1 if quick else SEEDS_PER_CAPTION)
    comp = load_components(cfg.model, seed=cfg.seed)
    judge, rewards = load_judge(), build_rewards(cfg.rewards)
    prompts, seeds = eval_set(D.held_out_captions(), spc)
    base = evaluate_encoder(comp, judge, rewards, cfg.sampler, prompts, seeds)
    report: dict[str, Any] = {
        "n_samples": len(prompts), "n_captions": len(D.held_out_captions()), "seeds_per_caption": spc,
        "num_steps": cfg.sampler.num_steps, "guidance_scale": cfg.sampler.guidance_scale,
        "emb_cos_before": float(base["emb_cos"]), "arms": {}, "quick": quick}
    arms = {"tuned": cfg, "paper_recipe": paper_recipe(cfg)} if paper else {"tuned": cfg}
    main_cfg = main_tuned = None
    for name, arm in arms.items():
        res, arm_cfg, tuned = _arm_report(comp, judge, rewards, name, arm, out_dir, base, prompts, seeds)
        report["arms"][name] = res
        if name == "tuned":
            main_cfg, main_tuned = arm_cfg, tuned
    _grid(comp, judge, rewards, main_cfg, main_tuned, base, prompts, seeds, out_dir)
    save_reward_curve({k: v["history"] for k, v in report["arms"].items()}, out_dir / "reward_curve.png")
    report["seconds"] = time.time() - t_start
    text = format_report(report)
    (out_dir / "report.md").write_text(text + "\n")
    slim = {**report, "arms": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                               for k, v in report["arms"].items()}}
    (out_dir / "report.json").write_text(json.dumps(slim, indent=2) + "\n")
    print(text)
    print(f"\nwrote {out_dir / 'grid.png'}, {out_dir / 'reward_curve.png'}, {out_dir / 'report.md'} "
          f"in {report['seconds']:.0f} s")
    return report


def main(cfg: TrainConfig, out_dir: str | Path = "outputs/demo", quick: bool = False) -> int:
    run_demo(cfg, out_dir, quick)
    return 0
