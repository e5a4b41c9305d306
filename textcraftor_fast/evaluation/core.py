"""The paired-evaluation core shared by `evaluate`, evaluation during training and the tiny world's demo: sample
sets, variants and per-sample scores. Conditioning is `inference.conditioning`, sampling `sampler.sample_images`.

Sample k of an evaluation is (prompt k mod P, noise seed seed0 + k): every encoder variant sees the same
(prompt, initial noise) pairs, whatever the batch size, so per-sample differences are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

EVAL_SEED0 = 1_000_000  # far from every training seed


@dataclass(frozen=True)
class Variant:
    """One way to sample: the original encoder (`encoder` None), or tuned encoder number `encoder` mixed in at
    weight w (e = w * e_tuned + (1 - w) * e_original) from `switch_step` on; with the base UNet (`unet` None) or
    tuned UNet number `unet` at every step."""

    label: str
    encoder: int | None = None
    weight: float = 1.0
    switch_step: int = 0
    unet: int | None = None


def sample_set(prompts: list[str], seeds_per_prompt: int, seed0: int = EVAL_SEED0) -> tuple[list[str], list[int]]:
    """(prompts, seeds) of the evaluation: every prompt repeated `seeds_per_prompt` times, each sample its seed."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds per prompt must be >= 1, got {seeds_per_prompt}")
    samples = [p for _ in range(seeds_per_prompt) for p in prompts]
    return samples, [seed0 + k for k in range(len(samples))]


Scorer = Callable[[Tensor, list[str]], dict[str, Tensor]]


def reward_scorer(rewards) -> Scorer:
    """Per-sample scores of a `WeightedRewards`: 'reward' (the weighted sum training maximises) and
    'reward/<name>' for each part."""
    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        total, parts = rewards(images, prompts)
        out = {"reward": total.detach().double().cpu()}
        out.update({f"reward/{k}": v.detach().double().cpu() for k, v in parts.items()})
        return out
    return score
