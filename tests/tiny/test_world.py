"""The tiny world's pieces: captions, tokenizer, shipped weights, rewards (fast, CPU)."""
from __future__ import annotations

import random

import pytest
import torch

from textcraftor_fast.tiny import data as D
from textcraftor_fast.tiny.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer


def test_captions_round_trip():
    caps = D.all_captions()
    assert len(caps) == 216 and len(set(caps)) == 216
    for c in caps:
        assert D.parse_caption(c.text) == c


def test_parse_caption_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not name a shape"):
        D.parse_caption("a small red thing on black")
    with pytest.raises(ValueError, match="two values of colour"):
        D.parse_caption("a small red blue circle on black")


def test_draw_is_deterministic_and_in_range():
    c = D.Caption("red", "triangle", "large", "white")
    a = D.to_tensor([D.draw(c, random.Random(3))])
    b = D.to_tensor([D.draw(c, random.Random(3))])
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1


def test_tokenizer_is_a_real_clip_tokenizer_with_one_token_per_word(tmp_path):
    from transformers import CLIPTokenizer

    tok = load_tokenizer(save_tokenizer(tmp_path))
    assert isinstance(tok, CLIPTokenizer)
    ids = tok("a small red circle on black").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 8
    for word in D.vocabulary():
        assert len(tok(word).input_ids) == 3, word
    padded = tok(["a red square"], padding="max_length", max_length=tok.model_max_length).input_ids[0]
    assert len(padded) == 16 and padded[-1] == tok.eos_token_id  # SD pads with end-of-text
    assert build_tokenizer()("a large blue square on gray").input_ids == tok("a large blue square on gray").input_ids


def test_shipped_world_loads_as_sd_components():
    from textcraftor_fast.config import ModelConfig
    from textcraftor_fast.models import load_components
    from textcraftor_fast.models import SDComponents

    comp = load_components(ModelConfig(kind="tiny_world", resolution=32))
    assert isinstance(comp, SDComponents)
    assert type(comp.unet).__name__ == "UNet2DConditionModel" and type(comp.vae).__name__ == "AutoencoderKL"
    assert type(comp.text_encoder).__name__ == "CLIPTextModel" and type(comp.scheduler).__name__ == "DDIMScheduler"
    assert comp.vae_scale_factor == 2
    assert not any(p.requires_grad for p in comp.unet.parameters())


def test_rewards_are_bounded_differentiable_and_clampable():
    from textcraftor_fast.config import RewardConfig
    from textcraftor_fast.rewards import build_reward

    prompts = ["a small red circle on black", "a large blue square on white"]
    clean = D.to_tensor([D.draw(D.parse_caption(p)) for p in prompts])
    align = build_reward(RewardConfig(name="tiny_alignment", options={"attributes": ["shape", "colour"]}))
    x = clean.clone().requires_grad_(True)
    r = align(x, prompts)
    assert r.shape == (2,) and (r >= 0).all() and (r <= 1).all()
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    aes = build_reward(RewardConfig(name="tiny_aesthetic"))
    a_clean, a_noisy = aes(clean, prompts), aes((clean + 0.3 * torch.randn_like(clean)).clamp(0, 1), prompts)
    assert (a_clean <= 1).all() and (a_clean > a_noisy).all()
    weighted = build_reward(RewardConfig(name="tiny_alignment", options={"attributes": {"shape": 3.0, "colour": 1.0}}))
    assert weighted.weights == {"shape": 0.75, "colour": 0.25}
    with pytest.raises(ValueError, match="subset of"):
        build_reward(RewardConfig(name="tiny_alignment", options={"attributes": ["texture"]}))
    clamped = build_reward(RewardConfig(name="tiny_alignment", clamp_max=0.1, options={"mode": "logprob"}))
    assert (clamped(clean, prompts) <= 0.1).all()


def test_geomean_alignment_is_the_weighted_geometric_mean_of_judge_probabilities():
    from textcraftor_fast.config import RewardConfig
    from textcraftor_fast.rewards import build_reward
    from textcraftor_fast.tiny.world import load_judge

    prompts = ["a small red circle on black", "a large blue square on white", "a small green triangle on gray"]
    x = (D.to_tensor([D.draw(D.parse_caption(p)) for p in prompts]) + 0.2 * torch.randn(3, 3, 32, 32,
         generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    reward = build_reward(RewardConfig(name="tiny_alignment", options={"attributes": {"shape": 3.0, "colour": 1.0},
                                                                        "mode": "geomean"}))
    logits = load_judge()(x)
    probs = {a: logits[a].softmax(1)[torch.arange(3), [D.parse_caption(p).label(a) for p in prompts]]
             for a in ("shape", "colour")}
    expected = probs["shape"] ** 0.75 * probs["colour"] ** 0.25  # weights normalised to 3/4, 1/4
    torch.testing.assert_close(reward(x, prompts), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'geomean'"):
        build_reward(RewardConfig(name="tiny_alignment", options={"mode": "harmonic"}))


def test_paired_interval_math():
    from textcraftor_fast.tiny.evaluate import paired_diff, verdict

    before = torch.tensor([0.0, 1.0, 0.0, 1.0] * 25)
    after = torch.ones(100)
    d = paired_diff(after, before)
    assert d["diff"] == pytest.approx(0.5) and d["lo"] > 0
    table = {f"{a}_correct": {"lo": 0.1, "hi": 0.3} for a in D.ATTRIBUTES}
    table["reward"] = {"lo": 0.01, "hi": 0.02}
    table["colour_correct"] = {"lo": -0.2, "hi": -0.01}  # a significant fall of a non-target attribute
    v = verdict(table, ["shape"])
    assert v["target_improved"] == {"shape": True} and v["others_held"]["colour"] is False and not v["passed"]
