"""LAION "improved aesthetic predictor": an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

Weights: `sac+logos+ava1-l14-linearMSE.pth` from christophschuhmann/improved-aesthetic-predictor (Apache-2.0),
shipped in `rewards/weights/` with its license and used when `path` is empty. The published module is
`nn.Sequential(Linear(768,1024), Dropout, Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16),
Linear(16,1))` - no activations (the ReLUs are commented out upstream) - hence keys layers.{0,2,4,6,7}.
The backbone is OpenAI's CLIP ViT-L/14 (QuickGELU), from a transformers folder or the OpenAI/open_clip file.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ConfigError, RewardConfig
from .base import Reward, reward_options
from .checkpoints import load_strict, read_state_dict, require_path
from .clip_tower import TOWER_OPTIONS, ClipTower, tower_from_options

DEFAULT_HEAD = Path(__file__).resolve().parent / "weights" / "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The published head, module for module (dropouts are identity in eval), so the file loads strictly."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding)  # (B, 1), as upstream


def load_aesthetic_head(path: str | Path = "") -> AestheticMLP:
    """The head from `path` (default: the shipped LAION file), loaded strictly with key/shape errors, frozen
    in eval mode (its dropouts must be off for scoring)."""
    p = require_path(path or DEFAULT_HEAD, "aesthetic head")
    sd = read_state_dict(p)
    width = sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd and sd["layers.0.weight"].ndim == 2 else 768
    head = load_strict(AestheticMLP(width), sd, str(p), f"aesthetic MLP {width}-1024-128-64-16-1")
    return head.eval().requires_grad_(False)


class AestheticReward(Reward):
    """Aesthetic score (about 1..10) of each image: head(normalize(CLIP_L14_image_embedding))."""

    name = "aesthetic"

    def __init__(self, tower: ClipTower, head: AestheticMLP, **kwargs) -> None:
        super().__init__(**kwargs)
        embed = tower.model.visual_projection.weight.shape[0]
        if embed != head.input_size:
            raise ConfigError(f"aesthetic: the CLIP tower's embedding has {embed} dims but the head expects "
                              f"{head.input_size} (the LAION head needs CLIP ViT-L/14: 768)")
        self.tower, self.head = tower, head
        self.input_size, self.mean, self.std = tower.image_size, tower.mean, tower.std

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        emb = self.tower.image_features(pixels)  # (B, 768) unit norm, fp32
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_config(cls, spec: RewardConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "AestheticReward":
        opts = reward_options(spec.options, TOWER_OPTIONS, spec.name)
        if not spec.clip_path:
            raise ConfigError(f"reward '{spec.name}': set clip_path to a CLIP ViT-L/14 (a transformers folder such as "
                              "openai/clip-vit-large-patch14, or OpenAI's ViT-L-14.pt); `path` is the head "
                              f"(default: the shipped {DEFAULT_HEAD.name})")
        tower = tower_from_options(spec.clip_path, opts, default_arch="ViT-L-14", with_text=False,
                                   device=device, dtype=dtype, what="aesthetic CLIP ViT-L/14")
        head = load_aesthetic_head(spec.path).to(device)  # 1M params: kept fp32 whatever the tower dtype
        return cls(tower, head, resize=spec.resize, clamp_min=spec.clamp_min, clamp_max=spec.clamp_max)
