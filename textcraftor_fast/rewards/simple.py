"""Simple differentiable rewards that need no weights: smoke tests and the foundation's default."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Reward

_LUMA = (0.299, 0.587, 0.114)


class BrightnessReward(Reward):
    """Mean luminance of the image, in [0, 1] (or closeness to `target` when one is given)."""

    name = "brightness"

    def __init__(self, target: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.target = target

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        luma = torch.tensor(_LUMA, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        mean = (pixels * luma).sum(1).mean((1, 2))  # (B,)
        return mean if self.target is None else -(mean - self.target).abs()


class ColorfulnessReward(Reward):
    """Hasler & Suesstrunk colourfulness (differentiable), a cheap stand-in for an aesthetic score."""

    name = "colorfulness"

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        r, g, b = pixels.unbind(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = (rg.flatten(1).var(1) + yb.flatten(1).var(1) + 1e-8).sqrt()
        mean = (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2 + 1e-8).sqrt()
        return std + 0.3 * mean
