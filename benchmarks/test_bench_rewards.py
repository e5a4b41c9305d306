"""Reward step cost: frozen towers + cached prompt embeddings (ours) vs the official code's way.

The official TextCraftor code keeps the reward towers' requires_grad=True (weight gradients computed, then
thrown away) and re-runs each tower's text side, with a graph, every step. Ours: requires_grad False
(input gradients only) and each prompt's text embedding computed once, no grad, then cached.
A small CLIP (width 128, 4+4 layers, 77-token text, 56 px images) keeps this within a CPU budget; the
ratio, not the absolute time, is the result. Run: `pytest benchmarks/test_bench_rewards.py`
(`--benchmark-disable` in CI runs each body once with its asserts).
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from textcraftor_fast.rewards.clip_score import ClipSimilarityReward
from textcraftor_fast.rewards.clip_tower import ClipTower, openclip_model_from_state_dict
from textcraftor_fast.rewards.openclip_convert import OpenClipArch, openclip_state_shapes

ARCH = OpenClipArch("bench", embed_dim=128, image_size=56, patch_size=14, vision_width=128, vision_layers=4,
                    vision_heads=4, vision_mlp=512, text_width=128, text_layers=4, text_heads=4, text_mlp=512,
                    context_length=77, vocab_size=1000)
PROMPTS = ["a red cat", "a blue dog on a hill", "an oil painting of a lighthouse", "a bowl of fruit"]


class _CharTokenizer:
    """Stand-in tokenizer: one id per character, end-of-text = the largest id (as 49407 in CLIP's BPE)."""

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        eot = ARCH.vocab_size - 1
        rows = [[eot - 1] + [ord(c) % (eot - 1) for c in p][: max_length - 2] + [eot] for p in prompts]
        ids = torch.tensor([r + [eot] * (max_length - len(r)) for r in rows])
        return types.SimpleNamespace(input_ids=ids)


def _reward(cache_size: int = 4096) -> ClipSimilarityReward:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in openclip_state_shapes(ARCH).items()}
    model = openclip_model_from_state_dict(sd, "auto", True, "bench", vision_heads=4, text_heads=4)
    return ClipSimilarityReward(ClipTower(model, _CharTokenizer(), cache_size=cache_size), scale=100.0)


def _official_step(reward: ClipSimilarityReward, images: torch.Tensor) -> None:
    tower = reward.tower
    tower.model.requires_grad_(True)  # as the official code leaves PickScore / HPSv2 / ViT-g
    pixels = F.adaptive_avg_pool2d(images, ARCH.image_size)
    img = tower.image_features(pixels)
    ids = tower.tokenizer(PROMPTS, "max_length", 77, True, "pt").input_ids
    tower.text_forward_calls += 1
    txt = F.normalize(tower.model.text_projection(tower.model.text_model(input_ids=ids).pooler_output), dim=-1)
    (-(100 * (img * txt).sum(-1)).sum()).backward()
    tower.model.zero_grad(set_to_none=True)


def _our_step(reward: ClipSimilarityReward, images: torch.Tensor) -> None:
    (-reward(images, PROMPTS).sum()).backward()


@pytest.mark.parametrize("mode", ["official", "frozen_uncached", "frozen_cached"])
def test_bench_reward_step(benchmark, mode):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reward = _reward(cache_size=0 if mode == "frozen_uncached" else 4096)
    step = _official_step if mode == "official" else _our_step

    def run():
        images = torch.rand(4, 3, 112, 112, requires_grad=True)
        step(reward, images)
        assert images.grad is not None

    benchmark.pedantic(run, rounds=8, iterations=1, warmup_rounds=1)
    calls = reward.tower.text_forward_calls
    benchmark.extra_info.update(mode=mode, text_tower_calls=calls, device="cpu (1 thread)")
    rounds = 1 + (8 if benchmark.enabled else 0)  # pedantic runs warmup + rounds when enabled, once when disabled
    assert calls == (1 if mode == "frozen_cached" else rounds)
    assert all(p.grad is None for p in reward.parameters())
