"""HPSv2 / HPSv2.1 (Wu et al. 2023): cosine(image, prompt) with a fine-tuned open_clip ViT-H-14.

Weights: `HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt` from the xswu/HPSv2 repository: a
{"state_dict": ...} of an open_clip ViT-H-14 (what `hpsv2.score` loads with `model.load_state_dict`).
Loaded into a transformers CLIPModel through the open_clip key map (see openclip_convert.py); the score is the
diagonal of `image_features @ text_features.T` with unit-norm features, as `hpsv2.score` computes it
(about 0.27 for SD1.5). The official TextCraftor weight is 100.
"""
from __future__ import annotations

from .clip_score import ClipSimilarityReward


class HPSv2Reward(ClipSimilarityReward):
    """cos(image_i, text_i) under the HPSv2 ViT-H-14."""

    name = "hpsv2"
    default_arch = "ViT-H-14"
    default_scale = 1.0
