"""Rewards against numbers that come from outside the code under test.

- OpenAI CLIP's normalisation and input size: literals from OpenAI's clip/clip.py `_transform`.
- Each published tower's widths, layers, heads, MLP size and activation: literals from open_clip's
  `model_configs/ViT-L-14.json`, `ViT-H-14.json`, `ViT-g-14.json` (head_width 64 default, 80 for H, 88 for g;
  ViT-g's mlp_ratio 4.3637 -> int(1408 * 4.3637) = 6144) and from OpenAI's QuickGELU, asserted on the BUILT
  transformers towers (their attention modules, not only the config).
- The CLIP score, PickScore and HPSv2 formulas on fixed unit vectors, against hand-computed numbers.
"""
from __future__ import annotations

import math

import pytest
import torch

from reward_fixtures import OPENAI_MEAN, OPENAI_STD
from textcraftor_fast.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from textcraftor_fast.rewards.clip_score import ClipScoreReward
from textcraftor_fast.rewards.clip_tower import openclip_model_from_state_dict
from textcraftor_fast.rewards.hpsv2 import HPSv2Reward
from textcraftor_fast.rewards.openclip_convert import ARCHS, meta_openclip_state_dict
from textcraftor_fast.rewards.pickscore import PickScoreReward


def test_openai_normalisation_literals():
    assert (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) == (OPENAI_MEAN, OPENAI_STD)


# name: (embed, image, patch, (vision width, layers, heads, head_dim, mlp), (text width, layers, heads, mlp), act)
PUBLISHED = {
    "ViT-L-14": (768, 224, 14, (1024, 24, 16, 64, 4096), (768, 12, 12, 3072), "quick_gelu"),
    "ViT-H-14": (1024, 224, 14, (1280, 32, 16, 80, 5120), (1024, 24, 16, 4096), "gelu"),
    "ViT-g-14": (1024, 224, 14, (1408, 40, 16, 88, 6144), (1024, 24, 16, 4096), "gelu"),
}


def _attn(layer):
    attn = layer.self_attn
    return attn.num_heads, attn.head_dim


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_built_towers_have_the_published_architecture(name):
    embed, image, patch, (vw, vl, vh, vd, vm), (tw, tl, th, tm), act = PUBLISHED[name]
    model = openclip_model_from_state_dict(meta_openclip_state_dict(ARCHS[name]), name, True, f"{name} (meta)")
    v, t = model.config.vision_config, model.config.text_config
    assert (model.config.projection_dim, v.image_size, v.patch_size) == (embed, image, patch)
    assert (v.hidden_size, len(model.vision_model.encoder.layers), v.intermediate_size) == (vw, vl, vm)
    assert {_attn(layer) for layer in model.vision_model.encoder.layers} == {(vh, vd)}
    assert (t.hidden_size, len(model.text_model.encoder.layers), t.intermediate_size) == (tw, tl, tm)
    assert {_attn(layer) for layer in model.text_model.encoder.layers} == {(th, tw // th)}
    assert (v.hidden_act, t.hidden_act) == (act, act)
    assert model.vision_model.encoder.layers[0].mlp.fc1.out_features == vm
    assert model.text_model.embeddings.position_embedding.num_embeddings == 77
    assert model.text_model.embeddings.token_embedding.num_embeddings == 49408


class _FixedTower(torch.nn.Module):
    """Unit-norm image/text embeddings fixed by hand; logit_scale as the checkpoint would hold it."""

    def __init__(self, img, txt, logit_scale: float) -> None:
        super().__init__()
        self.img, self.txt = img, txt
        self.logit_scale = torch.tensor(logit_scale)
        self.image_size, self.mean, self.std = 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def image_features(self, pixels):
        return self.img

    def text_features(self, prompts):
        return self.txt


# cos(img_0, txt_0) = 0.6 * 0.8 + 0.8 * 0.6 = 0.96; cos(img_1, txt_1) = 0; the cross terms are 0.8 and 0.8.
IMG = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
TXT = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
PIXELS = torch.zeros(2, 3, 224, 224)


def test_clip_score_is_100_times_the_cosine():
    reward = ClipScoreReward(_FixedTower(IMG, TXT, math.log(100)))
    torch.testing.assert_close(reward.score(PIXELS, ["a", "b"]), torch.tensor([96.0, 0.0]))


def test_hpsv2_is_the_cosine():
    reward = HPSv2Reward(_FixedTower(IMG, TXT, math.log(100)))
    torch.testing.assert_close(reward.score(PIXELS, ["a", "b"]), torch.tensor([0.96, 0.0]))


def test_pickscore_uses_the_checkpoints_logit_scale():
    reward = PickScoreReward(_FixedTower(IMG, TXT, math.log(50)))  # exp(log 50) = 50
    torch.testing.assert_close(reward.score(PIXELS, ["a", "b"]), torch.tensor([48.0, 0.0]))
    # The official TextCraftor loss: row means of 50 * img @ txt.T = 50 * [[0.96, 0.8], [0.8, 0.0]].
    official = PickScoreReward(_FixedTower(IMG, TXT, math.log(50)), official_matrix_mean=True)
    torch.testing.assert_close(official.score(PIXELS, ["a", "b"]), torch.tensor([44.0, 20.0]))
