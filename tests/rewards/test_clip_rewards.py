"""CLIP score, PickScore and HPSv2 end to end on tiny same-class towers saved in their published layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reward_fixtures import OPENAI_MEAN, OPENAI_STD, PROMPTS, random_openclip_state_dict, save_hf_clip, tiny_arch
from textcraftor_fast.config import ConfigError, RewardConfig
from textcraftor_fast.rewards import build_reward, build_rewards
from textcraftor_fast.rewards.clip_tower import ClipTower


def _tiny_opts(tokenizer_dir, **extra):
    return {"arch": "auto", "vision_heads": 2, "text_heads": 2, "tokenizer_path": str(tokenizer_dir), **extra}


def _expected_cosine(tower: ClipTower, images, prompts, mean, std):
    """cos(image, text) computed by hand from the transformers model (no cache, no reward code)."""
    m = tower.model
    pix = (F.adaptive_avg_pool2d(images, tower.image_size) - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    ids = tower.tokenizer(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = F.normalize(m.visual_projection(m.vision_model(pixel_values=pix).pooler_output), dim=-1)
        txt = F.normalize(m.text_projection(m.text_model(input_ids=ids).pooler_output), dim=-1)
    return img, txt


@pytest.fixture
def openclip_bin(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(random_openclip_state_dict(tiny_arch(), seed=5), path)
    return path


def test_clip_score_openclip_file(openclip_bin, tokenizer_dir, images):
    reward = build_reward(RewardConfig(name="clip_score", path=str(openclip_bin), options=_tiny_opts(tokenizer_dir)))
    scores = reward(images, PROMPTS)
    img, txt = _expected_cosine(reward.tower, images, PROMPTS, OPENAI_MEAN, OPENAI_STD)
    torch.testing.assert_close(scores, 100 * (img * txt).sum(-1))


def test_clip_score_default_arch_is_vit_g(openclip_bin, tokenizer_dir):
    with pytest.raises(ConfigError, match=r"open_clip_pytorch_model\.bin(.|\n)*ViT-g-14"):
        build_reward(RewardConfig(name="clip_score", path=str(openclip_bin),
                                  options={"tokenizer_path": str(tokenizer_dir)}))


def test_clip_score_hf_folder_uses_its_own_tokenizer(tmp_path, tokenizer_dir, images):
    folder = save_hf_clip(tmp_path / "clip", tiny_arch(), tokenizer_dir)
    reward = build_reward(RewardConfig(name="clip_score", path=str(folder)))
    img, txt = _expected_cosine(reward.tower, images, PROMPTS, OPENAI_MEAN, OPENAI_STD)
    torch.testing.assert_close(reward(images, PROMPTS), 100 * (img * txt).sum(-1))


@pytest.mark.parametrize("matrix_mean", [False, True])
def test_pickscore_hf_folder(tmp_path, tokenizer_dir, images, matrix_mean):
    folder = save_hf_clip(tmp_path / "pick", tiny_arch(), tokenizer_dir)
    reward = build_reward(RewardConfig(name="pickscore", path=str(folder),
                                       options={"official_matrix_mean": matrix_mean}))
    img, txt = _expected_cosine(reward.tower, images, PROMPTS, OPENAI_MEAN, OPENAI_STD)
    scale = reward.tower.logit_scale.exp()
    assert float(scale) == pytest.approx(100.0, rel=1e-4)
    got = reward(images, PROMPTS)
    if matrix_mean:  # the official loss: mean over the whole B x B matrix equals the mean of our row means
        torch.testing.assert_close(got.mean(), (scale * img @ txt.T).mean())
    else:
        torch.testing.assert_close(got, scale * (img * txt).sum(-1))


def test_hpsv2_published_layout(tmp_path, tokenizer_dir, images):
    # HPS_v2*_compressed.pt: {"state_dict": open_clip ViT-H-14 state dict}; here with DDP's "module." prefix too.
    sd = {f"module.{k}": v for k, v in random_openclip_state_dict(tiny_arch(), seed=7).items()}
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = build_reward(RewardConfig(name="hpsv2", weight=100.0, path=str(tmp_path / "HPS_v2.1_compressed.pt"),
                                       options=_tiny_opts(tokenizer_dir)))
    img, txt = _expected_cosine(reward.tower, images, PROMPTS, OPENAI_MEAN, OPENAI_STD)
    torch.testing.assert_close(reward(images, PROMPTS), (img * txt).sum(-1))


def test_safetensors_checkpoint_and_bicubic(tmp_path, tokenizer_dir, images):
    save_file(random_openclip_state_dict(tiny_arch()), str(tmp_path / "m.safetensors"))
    spec = RewardConfig(name="hpsv2", path=str(tmp_path / "m.safetensors"), resize="bicubic",
                        options=_tiny_opts(tokenizer_dir))
    scores = build_reward(spec)(images, PROMPTS)
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_text_tower_runs_once_per_unique_prompt(openclip_bin, tokenizer_dir, images):
    cached = build_reward(RewardConfig(name="hpsv2", path=str(openclip_bin), options=_tiny_opts(tokenizer_dir)))
    uncached = build_reward(RewardConfig(name="hpsv2", path=str(openclip_bin),
                                         options=_tiny_opts(tokenizer_dir, cache_size=0)))
    for step in range(4):
        a, b = cached(images, PROMPTS), uncached(images, PROMPTS)
        torch.testing.assert_close(a, b)
    assert cached.tower.text_forward_calls == 1 and cached.tower.cache.misses == 2  # 2 unique prompts
    assert uncached.tower.text_forward_calls == 4
    cached(images, ["a new prompt", "a red cat", "a blue dog"])
    assert cached.tower.text_forward_calls == 2 and cached.tower.cache.misses == 3


def test_only_the_image_gets_gradients(openclip_bin, tokenizer_dir, images):
    specs = [RewardConfig(name="clip_score", weight=0.5, path=str(openclip_bin), options=_tiny_opts(tokenizer_dir)),
             RewardConfig(name="hpsv2", weight=100.0, path=str(openclip_bin), options=_tiny_opts(tokenizer_dir))]
    rewards = build_rewards(specs)
    x = images.clone().requires_grad_(True)
    total, parts = rewards(x, PROMPTS)
    (-total.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in rewards.parameters())
    assert all(not m.training for m in rewards.modules())
    torch.testing.assert_close(total, 0.5 * parts["clip_score"] + 100.0 * parts["hpsv2"])
    logged = rewards.metrics(total, parts)
    assert set(logged) == {"reward/total", "reward/clip_score", "reward/clip_score/weighted", "reward/hpsv2",
                           "reward/hpsv2/weighted"}


def test_bf16_tower_returns_fp32(openclip_bin, tokenizer_dir, images):
    spec = RewardConfig(name="clip_score", path=str(openclip_bin), options=_tiny_opts(tokenizer_dir))
    ref = build_reward(spec)(images, PROMPTS)
    low = build_reward(spec, dtype=torch.bfloat16)
    assert low.tower.dtype == torch.bfloat16
    got = low(images, PROMPTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=3.0, rtol=0.05)  # 100 x cosine: bf16 keeps ~2-3 digits


def test_unknown_option_and_missing_path(openclip_bin):
    with pytest.raises(ConfigError, match=r"unknown option.*'tokeniser_path'.*tokenizer_path"):
        build_reward(RewardConfig(name="hpsv2", path=str(openclip_bin), options={"tokeniser_path": "x"}))
    with pytest.raises(ConfigError, match="no path given"):
        build_reward(RewardConfig(name="pickscore"))
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        build_reward(RewardConfig(name="hpsv2", path="/nowhere/HPS_v2_compressed.pt"))


def test_rewards_from_a_toml_config(tmp_path, openclip_bin, tokenizer_dir, images):
    from textcraftor_fast.config import load_config

    sd = random_openclip_state_dict(tiny_arch(embed_dim=768, quick_gelu=True))
    torch.save(sd, tmp_path / "vit-l.pt")
    tiny = 'arch = "auto", vision_heads = 2, text_heads = 2'
    (tmp_path / "run.toml").write_text(f"""
rewards = [
  {{name = "aesthetic", weight = 3.0, clip_path = "{tmp_path / 'vit-l.pt'}", options = {{{tiny}}}}},
  {{name = "hpsv2", weight = 100.0, path = "{openclip_bin}", options = {{{tiny}, tokenizer_path = "{tokenizer_dir}"}}}},
]

[model]
kind = "tiny_random"
""")
    cfg = load_config(tmp_path / "run.toml")
    rewards = build_rewards(cfg.rewards)
    total, parts = rewards(images, PROMPTS)
    assert rewards.names == ["aesthetic", "hpsv2"] and rewards.weights == [3.0, 100.0]
    torch.testing.assert_close(total, 3.0 * parts["aesthetic"] + 100.0 * parts["hpsv2"])


def test_cache_filled_under_inference_mode_serves_training(openclip_bin, tokenizer_dir, images):
    reward = build_reward(RewardConfig(name="hpsv2", path=str(openclip_bin), options=_tiny_opts(tokenizer_dir)))
    with torch.inference_mode():  # an evaluation pass fills the cache
        reward(images, PROMPTS)
    x = images.clone().requires_grad_(True)
    reward(x, PROMPTS).sum().backward()  # a training step reuses it
    assert x.grad is not None and reward.tower.text_forward_calls == 1
