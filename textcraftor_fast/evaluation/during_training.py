"""Evaluation during training (train.eval_every): the encoder (or UNet) being trained against the original, paired,
on a few held-out prompts, with the same noise seeds at every evaluation so the curve moves only with the model.

It draws no random numbers from the training generators (each sample's noise comes from its own seed), so a
run with evaluation trains exactly as one without, and resumes bit for bit.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..inference import conditioning
from ..sampler import DDIMSchedule, sample_images
from .core import reward_scorer, sample_set
from .prompts import eval_prompts, extra_scorers
from .stats import paired_diff

if TYPE_CHECKING:
    from ..config import TrainConfig

logger = logging.getLogger(__name__)

GRID_SAMPLES = 8


class TrainingEvaluator:
    """`evaluator(encoder, unet)` -> ({'eval/<metric>': mean, 'eval/<metric>_diff': paired diff}, picture grid),
    the differences against the original encoder with `unet` (the UNet before training)."""

    def __init__(self, cfg: TrainConfig, unet: nn.Module, vae: nn.Module, tokenizer, original: nn.Module,
                 schedule: DDIMSchedule, latent_shape: tuple[int, int, int], rewards) -> None:
        self.cfg, self.unet, self.vae, self.tokenizer, self.original = cfg, unet, vae, tokenizer, original
        self.schedule, self.latent_shape = schedule, latent_shape
        prompts = eval_prompts(cfg.data.eval_path, cfg.data.field, cfg.data.eval_max_prompts)
        self.samples, self.seeds = sample_set(prompts, cfg.data.eval_seeds_per_prompt)
        self.scorers = [reward_scorer(rewards), *extra_scorers(cfg.data.eval_path, cfg.model.kind)]
        self.switch = min(cfg.sampler.effective_switch_step, len(schedule.steps) - 1)
        self._base: tuple[dict[str, Tensor], Tensor] | None = None
        logger.info("Evaluation every %d steps on %d samples of %s", cfg.train.eval_every, len(self.samples),
                    cfg.data.eval_path)

    @torch.no_grad()
    def _run(self, tuned: nn.Module | None, unet: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
        scores: dict[str, list[Tensor]] = {}
        shown = []
        bs = self.cfg.train.batch_size
        for start in range(0, len(self.samples), bs):
            prompts, seeds = self.samples[start:start + bs], self.seeds[start:start + bs]
            frozen, mixed = conditioning(self.original, [tuned] if tuned is not None else [], [1.0], self.tokenizer,
                                         prompts, self.cfg.sampler.train_uncond)
            images = sample_images(unet, self.vae, self.schedule, seeds, self.latent_shape, frozen, mixed,
                                   self.cfg.sampler.guidance_scale, self.switch)
            for scorer in self.scorers:
                for k, v in scorer(images, prompts).items():
                    scores.setdefault(k, []).append(v)
            if start < GRID_SAMPLES:
                shown.append(images[: GRID_SAMPLES - start].cpu())
        return {k: torch.cat(v) for k, v in scores.items()}, torch.cat(shown)

    def __call__(self, encoder: nn.Module | None, unet: nn.Module | None = None) -> tuple[dict[str, float], Tensor]:
        """Metrics of `encoder` (None: the original) with `unet` (None: the base UNet), each left in the mode it came
        in, and a (2N, 3, H, W) grid: original row, tuned row."""
        if self._base is None:
            self._base = self._run(None, self.unet)
        modules = [m for m in (encoder, unet) if m is not None]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            scores, images = self._run(encoder, unet if unet is not None else self.unet)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        base_scores, base_images = self._base
        metrics: dict[str, float] = {}
        for name, values in scores.items():
            metrics[f"eval/{name}"] = float(values.mean())
            metrics[f"eval/{name}_diff"] = paired_diff(values, base_scores[name])["diff"]
        return metrics, torch.cat([base_images, images])
