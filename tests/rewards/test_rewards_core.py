"""Preprocessing gradients, the registry (custom rewards, errors), and lazy loading."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from reward_fixtures import PROMPTS, random_openclip_state_dict, tiny_arch
from textcraftor_fast.config import ConfigError, RewardConfig
from textcraftor_fast.rewards import REWARDS, build_reward, preprocess
from textcraftor_fast.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from textcraftor_fast.rewards.clip_score import ClipSimilarityReward
from textcraftor_fast.rewards.clip_tower import ClipTower, openclip_model_from_state_dict, resolve_tokenizer


@pytest.mark.parametrize("resize", ["adaptive_avg", "bicubic"])
def test_preprocess_gradcheck(resize):
    x = torch.rand(1, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda t: preprocess(t, 4, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_through_preprocessing_and_a_small_tower(tokenizer_dir):
    model = openclip_model_from_state_dict(random_openclip_state_dict(tiny_arch(), seed=2), "auto", True, "memory",
                                           vision_heads=2, text_heads=2).double()
    tower = ClipTower(model, tokenizer=resolve_tokenizer(None, str(tokenizer_dir)))
    reward = ClipSimilarityReward(tower, scale=1.0).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    # fast_mode checks random projections of the Jacobian: a few forward passes instead of one per pixel.
    assert torch.autograd.gradcheck(lambda t: reward(t, PROMPTS[:2]), (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    assert all(p.grad is None for p in reward.parameters())


def test_custom_reward_subclass_and_factory(images):
    r = build_reward(RewardConfig(name="custom_reward_example:MeanRed", options={"gain": 2.0}, clamp_max=0.9))
    torch.testing.assert_close(r(images, PROMPTS), (2.0 * images[:, 0].mean((1, 2))).clamp(max=0.9))
    f = build_reward(RewardConfig(name="custom_reward_example:make_scorer"))
    x = images.clone().requires_grad_(True)
    f(x, PROMPTS).sum().backward()
    assert f.name == "make_scorer" and x.grad is not None
    assert all(not p.requires_grad for p in f.parameters())


def test_registry_errors():
    assert {"aesthetic", "clip_score", "pickscore", "hpsv2"} <= set(REWARDS.names())
    with pytest.raises(ConfigError, match=r"unknown reward name 'pickscor'.*'pickscore'"):
        build_reward(RewardConfig(name="pickscor"))
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        build_reward(RewardConfig(name="custom_reward_example:Nope"))
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        build_reward(RewardConfig(name="no_such_module:X"))
    with pytest.raises(ConfigError, match="not a Reward subclass or a callable"):
        build_reward(RewardConfig(name="custom_reward_example:NOT_CALLABLE"))


def test_unused_towers_cost_nothing():
    # Importing the rewards package (and building a weight-free reward) must not import transformers or any tower.
    code = ("import sys; from textcraftor_fast.rewards import build_reward; from textcraftor_fast.config import "
            "RewardConfig; build_reward(RewardConfig(name='brightness')); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers') or m.endswith(('aesthetic', "
            "'pickscore', 'hpsv2', 'clip_score', 'clip_tower')))) ")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checkpoint_reader_layouts(tmp_path):
    from safetensors.torch import save_file

    from textcraftor_fast.rewards.checkpoints import read_state_dict

    lin = torch.nn.Linear(2, 3)
    torch.jit.script(lin).save(str(tmp_path / "jit.pt"))  # OpenAI's ViT-L-14.pt is a TorchScript archive
    torch.save({"state_dict": {f"module.{k}": v for k, v in lin.state_dict().items()}}, tmp_path / "wrapped.pt")
    save_file(lin.state_dict(), str(tmp_path / "m.safetensors"))
    for name in ("jit.pt", "wrapped.pt", "m.safetensors"):
        sd = read_state_dict(tmp_path / name)
        assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match=r"empty\.pt.*no tensors"):
        read_state_dict(tmp_path / "empty.pt")
