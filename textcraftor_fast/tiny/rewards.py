"""Differentiable rewards of the tiny world (the `Reward` protocol): judge alignment and an aesthetic proxy.

- `AlignmentReward` ("tiny_alignment"): the judge's probability of the caption's class, averaged over the
  chosen attributes (default: all four; a table attribute -> weight gives a weighted mean): bounded in [0, 1]. Rewarding one attribute alone is hackable too:
  a shape-only reward made every held-out shape right while colour accuracy fell from 92% to 8%.
  mode="geomean" gives the weighted geometric mean of the probabilities, in [0, 1], which falls towards 0
  when any one attribute does. mode="logprob" gives the mean log-probability clamped below at
  `logprob_floor`; it is the hackable kind (blurry, ambiguous images raise it while accuracy falls), kept
  for comparison. Prompts are parsed back into attribute values (`data.parse_caption`).
- `PaletteAestheticReward` ("tiny_aesthetic"): how close every pixel is to one of the world's pure colours
  (objects and backgrounds), in [0, 1]: crisp, clean images score high, muddy or blended ones low.

Clamping (`clamp_min` / `clamp_max` in a [[rewards]] entry) is applied by the Reward base class to any reward.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..rewards.base import Reward
from . import data as D


class AlignmentReward(Reward):
    name = "tiny_alignment"
    input_size = D.IMAGE_SIZE

    def __init__(self, attributes: Sequence[str] | Mapping[str, float] = tuple(D.ATTRIBUTES), mode: str = "prob",
                 logprob_floor: float = -5.0, path: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        weights = dict(attributes) if isinstance(attributes, Mapping) else {a: 1.0 for a in attributes}
        bad = [a for a in weights if a not in D.ATTRIBUTES]
        if bad or not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"tiny_alignment: attributes must be a non-empty subset of {list(D.ATTRIBUTES)} "
                             f"(a list, or a table attribute -> weight >= 0 with a positive sum), got {attributes!r}")
        if mode not in ("prob", "logprob", "geomean"):
            raise ValueError(f"tiny_alignment: mode must be 'prob', 'logprob' or 'geomean', got {mode!r}")
        from .world import load_judge

        total = sum(weights.values())
        self.weights = {a: float(w) / total for a, w in weights.items()}  # normalised: the score stays in [0, 1]
        self.attributes = tuple(self.weights)
        self.mode = mode
        self.logprob_floor = logprob_floor
        self.judge = load_judge(path or None)

    @classmethod
    def from_config(cls, spec, device="cpu", dtype=torch.float32) -> "AlignmentReward":
        return cls(path=spec.path, resize=spec.resize, clamp_min=spec.clamp_min, clamp_max=spec.clamp_max,
                   **dict(spec.options))

    def targets(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        caps = [D.parse_caption(p) for p in prompts]
        return {a: torch.tensor([c.label(a) for c in caps], device=device) for a in self.attributes}

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        logits = self.judge(pixels.float())
        targets = self.targets(prompts, pixels.device)
        score = pixels.new_zeros(pixels.shape[0], dtype=torch.float32)
        for a, w in self.weights.items():
            logp = logits[a].log_softmax(1).gather(1, targets[a][:, None]).squeeze(1)  # (B,)
            if self.mode == "prob":
                score = score + w * logp.exp()
            elif self.mode == "logprob":
                score = score + w * logp.clamp(min=self.logprob_floor)
            else:
                score = score + w * logp
        # geomean: exp of the weighted mean log-probability, the weighted geometric mean of the probabilities,
        # in [0, 1]. Unlike the arithmetic mean it cannot be raised by trading one attribute for another.
        return score.exp() if self.mode == "geomean" else score


class PaletteAestheticReward(Reward):
    name = "tiny_aesthetic"
    input_size = D.IMAGE_SIZE

    def __init__(self, sigma: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        palette = list(D.COLOURS.values()) + list(D.BACKGROUNDS.values())
        self.register_buffer("palette", torch.tensor(palette, dtype=torch.float32) / 255.0, persistent=False)
        self.sigma = sigma

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        x = pixels.float().permute(0, 2, 3, 1)[..., None, :]  # (B, H, W, 1, 3)
        d2 = (x - self.palette).pow(2).sum(-1)  # (B, H, W, P)
        near = torch.exp(-d2 / (2 * self.sigma ** 2)).amax(-1)  # (B, H, W) in (0, 1]
        return near.mean((1, 2))
