"""A user's custom reward module, named in a config as 'custom_reward_example:<name>'."""
from __future__ import annotations

import torch
from torch import nn

from textcraftor_fast.rewards import Reward


class MeanRed(Reward):
    """A Reward subclass: the mean red channel."""

    name = "mean_red"

    def __init__(self, gain: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gain = gain

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.gain * pixels[:, 0].mean((1, 2))


class _Scorer(nn.Module):
    input_size = 8  # the wrapper resizes to this before calling

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 1)

    def forward(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.lin(pixels.flatten(1)).squeeze(-1)


def make_scorer(spec) -> nn.Module:
    """A factory returning a plain scoring module: the registry wraps it in CallableReward."""
    return _Scorer()


NOT_CALLABLE = 3
