"""The paired-evaluation core shared by `evaluate` and evaluation during training: sample sets, conditioning
of each encoder variant, no-grad sampling with per-sample noise, and per-sample scores.

Sample k of an evaluation is (prompt k mod P, noise seed seed0 + k): every encoder variant sees the same
(prompt, initial noise) pairs, whatever the batch size, so per-sample differences are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..inference import mix_embeddings
from ..models.components import encode_prompts
from ..sampler import (DDIMSchedule, Embeddings, decode_latents, sample_latents, seeded_noise,
                       switch_sampling_config)

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


encode = torch.no_grad()(encode_prompts)
"""`models.components.encode_prompts` without a graph: evaluation never trains an encoder."""


@torch.no_grad()
def conditioning(original: nn.Module, tuned: nn.Module | None, tokenizer, prompts: list[str], weight: float,
                 train_uncond: bool) -> tuple[Embeddings, Embeddings | None]:
    """(frozen, mixed): the original encoder's embeddings and w * tuned + (1 - w) * original, mixed as `generate`
    mixes them (`inference.mix_embeddings`, exact at both ends: w = 0 gives the original, w = 1 the tuned
    embedding, bit for bit). The unconditional embedding is mixed only when training tuned it
    (sampler.train_uncond)."""
    frozen = Embeddings(encode(original, tokenizer, prompts), encode(original, tokenizer, [""]))
    if tuned is None:
        return frozen, None
    cond = encode(tuned, tokenizer, prompts)
    uncond = encode(tuned, tokenizer, [""]) if train_uncond else frozen.uncond
    return frozen, Embeddings(mix_embeddings(frozen.cond, [cond], [weight]),
                              mix_embeddings(frozen.uncond, [uncond], [weight]))


@torch.no_grad()
def sample_images(unet: nn.Module, vae: nn.Module, schedule: DDIMSchedule, seeds: list[int],
                  latent_shape: tuple[int, int, int], frozen: Embeddings, mixed: Embeddings | None,
                  guidance_scale: float, switch_step: int) -> Tensor:
    """Images in [0, 1] (B, 3, H, W): deterministic DDIM from each seed's noise, `frozen` before
    `switch_step` and `mixed` after it (None: `frozen` throughout)."""
    device, dtype = frozen.cond.device, next(unet.parameters()).dtype
    x_T = seeded_noise(seeds, latent_shape).to(device, dtype)  # (B, 4, h, w)
    cfg = switch_sampling_config(len(schedule.steps), guidance_scale, switch_step)
    cast = lambda e: Embeddings(e.cond.to(dtype), e.uncond.to(dtype))
    latents = sample_latents(unet, schedule, x_T, cast(frozen), cast(mixed) if mixed else None, cfg, grad_steps=0)
    return decode_latents(vae, latents.to(vae.dtype), use_checkpoint=False).float()


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


def tiny_world_scorer() -> Scorer:
    """Judge accuracy per attribute ('<attr>_correct' in {0, 1}) of the tiny world's captions."""
    from ..tiny.evaluate import judge_samples  # lazy: only for the embedded world
    from ..tiny.world import load_judge

    judge = load_judge()

    def score(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        res = judge_samples(judge, images.cpu().float(), prompts)
        return {k: v.double() for k, v in res.items() if k.endswith("_correct")}
    return score
