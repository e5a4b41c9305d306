"""CLIP score: 100 x cosine(image embedding, text embedding), and the shared CLIP-similarity reward.

The paper uses OpenCLIP ViT-g-14 (`laion2b_s34b_b88k`: `open_clip_pytorch_model.bin` from
laion/CLIP-ViT-g-14-laion2B-s34B-b88K); any open_clip ViT checkpoint (`arch="auto"`) or transformers
CLIPModel folder works. PickScore and HPSv2 are the same computation with another scale.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import RewardConfig
from .base import Reward, reward_options
from .clip_tower import TOWER_OPTIONS, ClipTower, tower_from_options


class ClipSimilarityReward(Reward):
    """scale * cos(image_i, text_i) per sample; text embeddings are cached per prompt (no grad)."""

    name = "clip_similarity"
    default_arch = "auto"
    default_scale: float | None = 1.0
    """None: use the checkpoint's own logit_scale.exp() (PickScore)."""
    extra_options: dict[str, Any] = {}

    def __init__(self, tower: ClipTower, scale: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tower = tower
        self.scale = self.default_scale if scale is None else float(scale)
        self.input_size, self.mean, self.std = tower.image_size, tower.mean, tower.std

    def effective_scale(self) -> Tensor | float:
        """The fixed scale, or the checkpoint's own logit_scale.exp() when the scale is None (PickScore)."""
        return self.tower.logit_scale.exp().float() if self.scale is None else self.scale

    def cosine(self, pixels: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm image (B, E, differentiable) and text (B, E, cached, no grad) embeddings."""
        img = self.tower.image_features(pixels)
        txt = self.tower.text_features(prompts)
        return img, txt

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        img, txt = self.cosine(pixels, prompts)
        return self.effective_scale() * (img * txt).sum(-1)  # (B,)

    @classmethod
    def from_config(cls, spec: RewardConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "ClipSimilarityReward":
        opts = reward_options(spec.options, {**TOWER_OPTIONS, "scale": None, **cls.extra_options}, spec.name)
        tower = tower_from_options(spec.path, opts, default_arch=cls.default_arch, with_text=True,
                                   device=device, dtype=dtype, what=f"reward '{spec.name}'")
        extra = {k: opts[k] for k in cls.extra_options}
        return cls(tower, scale=opts["scale"], resize=spec.resize, clamp_min=spec.clamp_min,
                   clamp_max=spec.clamp_max, **extra)


class ClipScoreReward(ClipSimilarityReward):
    """100 x cos(image, prompt) with an open_clip model (default architecture: ViT-g-14, as the paper)."""

    name = "clip_score"
    default_arch = "ViT-g-14"
    default_scale = 100.0
