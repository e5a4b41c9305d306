"""Held-out evaluation of the tiny world with paired seeds: judge accuracy per attribute, rewards,
and paired 95% intervals of before/after differences.

Sample k of an evaluation set is (caption k mod C, seed EVAL_SEED0 + k) (evaluation.core.sample_set): every
model is evaluated on the same (caption, initial noise) pairs, so per-sample differences are paired and their
interval is tight. Conditioning and sampling are the engine's (inference.conditioning, sampler.sample_images).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..evaluation.core import Scorer, sample_set
from ..evaluation.stats import Z95, compare_paired, mean_ci, paired_diff  # noqa: F401 (re-exported)
from ..inference import conditioning
from ..sampler import make_schedule, sample_images
from . import data as D
from .models import LATENT_SIZE
from .split import HeldOut

SAMPLE_BATCH = 128  # rows sampled at once: a batch size changes float rounding, so every evaluation keeps this one
LATENT_SHAPE = (4, LATENT_SIZE, LATENT_SIZE)


def eval_set(captions: list[D.Caption], seeds_per_caption: int) -> tuple[list[str], list[int]]:
    """(prompts, seeds): each caption repeated `seeds_per_caption` times, each sample its own seed."""
    return sample_set([c.text for c in captions], seeds_per_caption)


@torch.no_grad()
def judge_samples(judge, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """Per-sample results: '<attr>_correct' (N,) in {0,1}, '<attr>_prob' (N,) = p(correct class) and
    '<attr>_pred' (N,) = the class the judge reads (index into data.ATTRIBUTES[attr])."""
    caps = [D.parse_caption(p) for p in prompts]
    logits = judge(images)
    out: dict[str, Tensor] = {}
    for a in D.ATTRIBUTES:
        target = torch.tensor([c.label(a) for c in caps])
        out[f"{a}_pred"] = logits[a].argmax(1)
        out[f"{a}_correct"] = (out[f"{a}_pred"] == target).float()
        out[f"{a}_prob"] = logits[a].softmax(1).gather(1, target[:, None]).squeeze(1)
    return out


def judge_scorer() -> Scorer:
    """Judge accuracy per attribute ('<attr>_correct' in {0, 1}) of tiny-world images of its captions: the extra
    scores the world's prompt sets bring to `evaluate` and evaluation during training (plugin.py)."""
    from .world import load_judge

    judge = load_judge()

    def score(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        res = judge_samples(judge, images.cpu().float(), prompts)
        return {k: v.double() for k, v in res.items() if k.endswith("_correct")}
    return score


def sample_world(comp, frozen, mixed, seeds: list[int], num_steps: int, guidance_scale: float,
                 timestep_spacing: str = "trailing", switch_step: int = 0, progress: str | None = None) -> Tensor:
    """Images in [0, 1] (N, 3, 32, 32) of the world's model from `seeds`, `frozen` before `switch_step`, `mixed`
    (None: `frozen`) from it."""
    schedule = make_schedule(comp.scheduler.config, num_steps, 0.0, timestep_spacing)
    return sample_images(comp.unet, comp.vae, schedule, seeds, LATENT_SHAPE, frozen, mixed, guidance_scale,
                         switch_step, batch_size=SAMPLE_BATCH, progress=progress)


@torch.no_grad()
def base_accuracy(comp, judge, held_out: HeldOut, seeds_per_caption: int = 9,
                  guidance_scales: tuple[float, ...] = (3.0, 5.0, 7.5), num_steps: int = 10) -> dict:
    """The base model's judge accuracy per attribute at a few CFG scales on `held_out`'s test and validation
    captions (and every fourth training caption)."""
    result: dict = {}
    splits = (("test", held_out.captions("test")), ("validation", held_out.captions("validation")),
              ("train", held_out.train_captions()[::4]))
    for split, caps in splits:
        prompts, seeds = eval_set(caps, 2 if split == "train" else seeds_per_caption)
        frozen, _ = conditioning(comp.text_encoder, [], [], comp.tokenizer, prompts)
        for g in guidance_scales:
            images = sample_world(comp, frozen, None, seeds, num_steps, g)
            scores = judge_samples(judge, images, prompts)
            result[f"{split}/cfg{g}"] = {a: round(scores[f"{a}_correct"].mean().item(), 3) for a in D.ATTRIBUTES}
            result[f"{split}/cfg{g}"]["n"] = len(prompts)
    return result


@torch.no_grad()
def evaluate_encoder(comp, judge, rewards, sampler_cfg, prompts: list[str], seeds: list[int],
                     tuned=None, w: float = 1.0, progress: str | None = None) -> dict[str, Tensor]:
    """Per-sample results of one encoder on (prompts, seeds): judge correctness/probabilities per attribute,
    the weighted reward 'reward' and each part 'reward/<name>', plus the images. tuned=None: the original.

    The tuned encoder takes over from the training run's switch step (num_steps - K), as in training.
    """
    from ..training.monitor import mean_pairwise_cosine

    frozen, mixed = conditioning(comp.text_encoder, [tuned] if tuned is not None else [], [w], comp.tokenizer,
                                 prompts, sampler_cfg.train_uncond)
    images = sample_world(comp, frozen, mixed, seeds, sampler_cfg.num_steps, sampler_cfg.guidance_scale,
                          sampler_cfg.timestep_spacing, sampler_cfg.effective_switch_step, progress)
    out = judge_samples(judge, images, prompts)
    total, parts = rewards(images, prompts)
    out["reward"] = total.detach()
    out.update({f"reward/{k}": v.detach() for k, v in parts.items()})
    out["images"] = images
    distinct = list(dict.fromkeys(prompts))
    cond = (mixed if mixed is not None else frozen).cond[: len(distinct)]
    out["emb_cos"] = torch.tensor(mean_pairwise_cosine(cond))
    return out


def metric_names(result: dict[str, Tensor]) -> list[str]:
    """Per-sample metrics in a result, reward first, then judge accuracy per attribute."""
    rewards = [k for k in result if k.startswith("reward")]
    return rewards + [f"{a}_correct" for a in D.ATTRIBUTES]


def compare(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """metric -> before/after means with 95% half-widths and the PAIRED difference with its interval."""
    return compare_paired(before, after, metric_names(before))


def pair_breakdown(before: dict[str, Tensor], after: dict[str, Tensor], prompts: list[str],
                   attribute: str = "shape") -> dict[str, dict]:
    """Per colour-shape pair of `prompts`: samples, `attribute` accuracy before/after, and how often the judge
    reads each class of it before/after. Where the average gain comes from, or why there is none: a pair
    the base draws as a trained pair's shape shows up as a class other than its own."""
    classes = D.ATTRIBUTES[attribute]
    pairs = [f"{c.colour} {c.shape}" for c in map(D.parse_caption, prompts)]
    out: dict[str, dict] = {}
    for pair in dict.fromkeys(pairs):
        idx = torch.tensor([i for i, p in enumerate(pairs) if p == pair])
        entry: dict = {"n": len(idx)}
        for when, res in (("before", before), ("after", after)):
            entry[when] = res[f"{attribute}_correct"][idx].double().mean().item()
            pred = res[f"{attribute}_pred"][idx]
            entry[f"{when}_read_as"] = {c: int((pred == k).sum()) for k, c in enumerate(classes)}
        out[pair] = entry
    return out


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion k / n. Unlike the normal interval it stays inside
    [0, 1] and is not zero-width at 0 or n successes: the per-pair counts (108 samples, often near 0.8 or 0.3)
    are small enough for that to matter."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the lower (upper) end is 0 (1) exactly; rounding would put it a hair past the estimate.
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def format_read_as(counts: dict[str, int], sep: str = " / ") -> str:
    """A `pair_breakdown` reading in class order, e.g. shape's '32 / 43 / 87' (circle / square / triangle)."""
    return sep.join(map(str, counts.values()))


def verdict(table: dict[str, dict[str, float]], targets: list[str]) -> dict:
    """The demo's acceptance, computed, never tuned: every targeted attribute's accuracy and the reward
    improve with paired 95% intervals above zero, and no other attribute falls by more than its interval."""
    target_ok = {a: table[f"{a}_correct"]["lo"] > 0 for a in targets}
    others_ok = {a: table[f"{a}_correct"]["hi"] >= 0 for a in D.ATTRIBUTES if a not in targets}
    reward_ok = table["reward"]["lo"] > 0
    return {"targets": targets, "target_improved": target_ok, "reward_improved": reward_ok,
            "others_held": others_ok,
            "passed": all(target_ok.values()) and reward_ok and all(others_ok.values())}
