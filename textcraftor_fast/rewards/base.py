"""The Reward protocol, differentiable preprocessing, and the weighted sum of rewards.

A reward takes decoded images in [0, 1] (B, 3, H, W) and the prompts that made them and returns one
score per image (B,). Rewards are frozen: parameters never require grad and stay in eval mode, so
backward computes input gradients only (the official TextCraftor code computes and discards tower
weight gradients).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: Tensor, size: int | None, mean: Sequence[float] | None, std: Sequence[float] | None,
               resize: str = "adaptive_avg") -> Tensor:
    """Differentiably resize [0,1] images to `size` and normalise with mean/std.

    'adaptive_avg' is the official code's resize (adaptive average pooling); 'bicubic' is antialiased bicubic.
    """
    x = images
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        if resize == "adaptive_avg":
            x = F.adaptive_avg_pool2d(x, size)
        elif resize == "bicubic":
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        else:
            raise ValueError(f"resize must be 'adaptive_avg' or 'bicubic', got {resize!r}")
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def reward_options(options: Mapping[str, Any], defaults: Mapping[str, Any], reward: str) -> dict[str, Any]:
    """`defaults` updated with `options`; an unknown option is a ConfigError naming the close and valid ones."""
    from ..config import ConfigError

    unknown = [k for k in options if k not in defaults]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=2)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"reward '{reward}': unknown option(s) {', '.join(map(repr, unknown))}{hint}; "
                          f"valid options: {', '.join(defaults) or 'none'}")
    return {**defaults, **options}


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and requires_grad False on every parameter: input gradients only."""
    module.eval()
    module.requires_grad_(False)
    return module


class Reward(nn.Module):
    """Base class of every reward. Subclasses set the class attributes and implement `score`.

    input_size: side the tower expects (None: any); mean/std: its normalisation (None: none).
    `forward` resizes/normalises, calls `score`, and applies the optional clamp.
    """

    name: str = "reward"
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    def __init__(self, resize: str = "adaptive_avg", clamp_min: float | None = None,
                 clamp_max: float | None = None) -> None:
        super().__init__()
        self.resize = resize
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        pixels = preprocess(images, self.input_size, self.mean, self.std, self.resize)
        scores = self.score(pixels, prompts)
        if self.clamp_min is not None or self.clamp_max is not None:
            scores = scores.clamp(self.clamp_min, self.clamp_max)
        return scores

    def train(self, mode: bool = True) -> "Reward":
        # Towers are frozen: keep every submodule in eval mode whatever the caller asks.
        return super().train(False)


class CallableReward(Reward):
    """Wraps a custom scorer `fn(pixels, prompts) -> (B,)`; its `input_size`/`mean`/`std` attributes, when it
    has them, choose the preprocessing (default: none, the scorer sees the [0, 1] images)."""

    def __init__(self, fn: Any, name: str = "custom", **kwargs) -> None:
        super().__init__(**kwargs)
        self.fn = fn  # an nn.Module here is registered, so it is frozen and moved with the reward
        self.name = name
        self.input_size = getattr(fn, "input_size", None)
        self.mean, self.std = getattr(fn, "mean", None), getattr(fn, "std", None)

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        return self.fn(pixels, prompts)


class WeightedRewards(nn.Module):
    """total = sum_i w_i * R_i, with each R_i kept for per-reward metrics."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float], names: Sequence[str] | None = None):
        super().__init__()
        if len(rewards) != len(weights):
            raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights")
        self.rewards = nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]
        self.names = list(names) if names is not None else _unique_names([r.name for r in rewards])
        self.eval()

    def train(self, mode: bool = True) -> "WeightedRewards":
        # Frozen like its rewards: `model.train()` on a parent module must not switch dropout on in a tower.
        return super().train(False)

    def forward(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = images.new_zeros(images.shape[0], dtype=torch.float32)
        for name, reward, weight in zip(self.names, self.rewards, self.weights):
            r = reward(images, prompts).float()
            parts[name] = r
            total = total + weight * r
        return total, parts

    def metrics(self, total: Tensor, parts: Mapping[str, Tensor]) -> dict[str, float]:
        """Batch means for the log: 'reward/<name>' (raw R_i), 'reward/<name>/weighted' (w_i R_i), 'reward/total'."""
        out = {"reward/total": float(total.detach().mean())}
        for name, weight in zip(self.names, self.weights):
            if name in parts:
                mean = float(parts[name].detach().mean())
                out[f"reward/{name}"] = mean
                out[f"reward/{name}/weighted"] = weight * mean
        return out


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
