"""Reward step cost: frozen towers + cached prompt embeddings (ours) vs the official code's way.

The official TextCraftor code (baseline_official.py) keeps the reward towers' requires_grad=True (weight
gradients computed and kept) and re-encodes the prompt every step: under no_grad for CLIP score and PickScore
(`official`), in grad mode inside `hps_model(image, text)` for HPSv2 (`official_hpsv2`: text-side weight
gradients too). Ours: requires_grad False (input gradients only) and each prompt's text embedding computed once,
no grad, then cached (`frozen_cached`; `frozen_uncached` re-encodes every step). All modes run the same reward
code; only the tower differs (baseline_official.OfficialTower).
A small CLIP (width 128, 4+4 layers, 77-token text, 56 px images) keeps this within a CPU budget; the
ratio, not the absolute time, is the result. Run: `pytest benchmarks/test_bench_rewards.py`
(`--benchmark-disable` in CI runs each body once with its asserts).
"""
from __future__ import annotations

import statistics
import time
import types

import pytest
import torch

from baseline_official import OfficialTower
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes
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


def _reward(mode: str) -> ClipSimilarityReward:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in openclip_state_shapes(ARCH).items()}
    model = openclip_model_from_state_dict(sd, "auto", True, "bench", vision_heads=4, text_heads=4)
    tower = ClipTower(model, _CharTokenizer(), cache_size=0 if mode == "frozen_uncached" else 4096)
    if mode.startswith("official"):
        tower = OfficialTower(tower, keep_text_graph=mode == "official_hpsv2")
    return ClipSimilarityReward(tower, scale=100.0)


MODES = ("official", "official_hpsv2", "frozen_uncached", "frozen_cached")


def _run(reward: ClipSimilarityReward) -> None:
    images = torch.rand(4, 3, 112, 112, requires_grad=True)
    (-reward(images, PROMPTS).sum()).backward()
    assert images.grad is not None


@pytest.fixture(autouse=True)
def one_thread():
    """This suite's setting, restored after: the suites that run later measure at the session's thread count
    (they ran at 1 thread after this one in `make bench` before)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", MODES)
def test_bench_reward_step(benchmark, mode):
    torch.manual_seed(0)
    reward = _reward(mode)
    benchmark.pedantic(_run, args=(reward,), rounds=8, iterations=1, warmup_rounds=1)
    calls = reward.tower.text_forward_calls
    benchmark.extra_info.update(mode=mode, text_tower_calls=calls, device="cpu (1 thread)")
    rounds = 1 + (8 if benchmark.enabled else 0)  # pedantic runs warmup + rounds when enabled, once when disabled
    assert calls == (1 if mode == "frozen_cached" else rounds)
    model = reward.tower.model
    vision = [p.grad for n, p in model.named_parameters() if n.startswith(("vision_model", "visual_projection"))]
    text = [p.grad for n, p in model.named_parameters() if n.startswith(("text_model", "text_projection"))]
    if mode.startswith("frozen"):
        assert all(p.grad is None for p in reward.parameters())
    else:  # the official waste: image-side weight gradients, and HPSv2's text side too
        assert all(g is not None for g in vision)
        assert all((g is not None) == (mode == "official_hpsv2") for g in text)


def test_reward_step_ratios(benchmark):
    """Every mode once per round, interleaved, so the ratios see the same machine load (medians, one run)."""
    torch.manual_seed(0)
    rewards = {mode: _reward(mode) for mode in MODES}
    rounds = 1 if benchmark.disabled else 15
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(rounds + 1):
        for mode, reward in rewards.items():
            t0 = time.perf_counter()
            _run(reward)
            if i:  # round 0 warms up (and fills the cache)
                times[mode].append(time.perf_counter() - t0)
    _assert_what_the_modes_do(rewards, runs=rounds + 1)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    ratios = {mode: med[mode] / med["frozen_cached"] for mode in MODES}
    benchmark.extra_info.update(median_ms={m: 1e3 * v for m, v in med.items()}, ratio_to_frozen_cached=ratios,
                                times_ms={m: [1e3 * v for v in t] for m, t in times.items()})
    print("\nreward step, median of %d interleaved rounds (ms): " % rounds +
          ", ".join(f"{m} {1e3 * med[m]:.1f} (x{ratios[m]:.2f})" for m in MODES))
    benchmark.pedantic(_run, args=(rewards["frozen_cached"],), rounds=1, iterations=1)


def _assert_what_the_modes_do(rewards: dict[str, ClipSimilarityReward], runs: int) -> None:
    """Why the ratios come out as they do, as deterministic facts (never a time), after `runs` steps of each mode:
    the text tower ran once per step except where cached; weight gradients exist only in the official modes; and
    the frozen towers keep less for backward (an extra, untimed step under a saved-tensors counter)."""
    calls = {mode: r.tower.text_forward_calls for mode, r in rewards.items()}
    assert calls == {"official": runs, "official_hpsv2": runs, "frozen_uncached": runs, "frozen_cached": 1}
    with_grad = {mode: sum(p.grad is not None for p in r.parameters()) for mode, r in rewards.items()}
    assert with_grad["frozen_cached"] == with_grad["frozen_uncached"] == 0
    assert 0 < with_grad["official"] < with_grad["official_hpsv2"], with_grad  # HPSv2: the text side's as well
    saved = {mode: saved_tensor_bytes(lambda r=r: _run(r), ignore=r.parameters())[0] for mode, r in rewards.items()}
    assert saved["frozen_cached"] == saved["frozen_uncached"] < saved["official"] < saved["official_hpsv2"], saved
