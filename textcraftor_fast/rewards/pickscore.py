"""PickScore (Kirstain et al. 2023): logit_scale.exp() x cos(image, prompt) with a CLIP ViT-H-14.

Weights: the transformers CLIPModel folder yuvalkirstain/PickScore_v1 (its processor and tokenizer come
from laion/CLIP-ViT-H-14-laion2B-s32B-b79K; without a tokenizer in the folder the SD1.5 one is used, as the
official TextCraftor code feeds every tower the SD tokenizer's ids).
The official TextCraftor loss averages the whole B x B matrix `logit_scale * text @ image.T` (cross pairs
included); `official_matrix_mean = true` reproduces that as per-sample row means (their batch mean equals the
matrix mean), the default is the per-sample diagonal PickScore defines.
"""
from __future__ import annotations

from torch import Tensor

from .clip_score import ClipSimilarityReward


class PickScoreReward(ClipSimilarityReward):
    """logit_scale.exp() * cos(image_i, text_i) (about 18-22 for SD1.5 images)."""

    name = "pickscore"
    default_arch = "ViT-H-14"
    default_scale = None  # the checkpoint's logit_scale.exp() (100 for PickScore_v1), unless options.scale
    extra_options = {"official_matrix_mean": False}

    def __init__(self, tower, scale: float | None = None, official_matrix_mean: bool = False, **kwargs) -> None:
        super().__init__(tower, scale=scale, **kwargs)
        self.official_matrix_mean = bool(official_matrix_mean)

    def score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        img, txt = self.cosine(pixels, prompts)
        scale = self.effective_scale()
        if self.official_matrix_mean:
            return scale * (img @ txt.T).mean(1)  # row means of the B x B matrix
        return scale * (img * txt).sum(-1)
