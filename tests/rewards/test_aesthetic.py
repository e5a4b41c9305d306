"""The LAION aesthetic head (the real published file) and the aesthetic reward end to end on a tiny ViT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reward_fixtures import OPENAI_MEAN, OPENAI_STD, random_openclip_state_dict, save_hf_clip, tiny_arch
from textcraftor_fast.config import ConfigError, RewardConfig
from textcraftor_fast.rewards import build_reward
from textcraftor_fast.rewards.aesthetic import DEFAULT_HEAD, AestheticMLP, load_aesthetic_head

PUBLISHED_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_published_head_loads_strictly_and_scores_like_a_plain_mlp():
    head = load_aesthetic_head()  # the shipped sac+logos+ava1-l14-linearMSE.pth
    sd = torch.load(DEFAULT_HEAD, map_location="cpu", weights_only=True)
    assert set(sd) == PUBLISHED_KEYS == set(head.state_dict())
    emb = F.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    # A plain MLP from the same file: five Linear layers, no activations (upstream's ReLUs are commented out).
    plain = torch.nn.Sequential(*[torch.nn.Linear(sd[f"layers.{i}.weight"].shape[1], sd[f"layers.{i}.weight"].shape[0])
                                  for i in (0, 2, 4, 6, 7)])
    plain.load_state_dict({f"{j}.{p}": sd[f"layers.{i}.{p}"] for j, i in enumerate((0, 2, 4, 6, 7))
                           for p in ("weight", "bias")})
    with torch.no_grad():
        ours = head.eval()(emb)
        assert torch.equal(ours, plain(emb))
        x = emb.double()
        for i in (0, 2, 4, 6, 7):
            x = x @ sd[f"layers.{i}.weight"].double().T + sd[f"layers.{i}.bias"].double()
        torch.testing.assert_close(ours.double(), x, atol=1e-5, rtol=1e-6)
    assert 4.0 < float(ours.mean()) < 7.0  # LAION aesthetic scale
    assert (DEFAULT_HEAD.parent / "LICENSE.improved-aesthetic-predictor").is_file()


def test_published_head_architecture_on_meta():
    with torch.device("meta"):
        head = AestheticMLP()
    meta_sd = {k: torch.empty(s, device="meta") for k, s in
               {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                "layers.7.bias": (1,)}.items()}
    assert not head.load_state_dict(meta_sd, strict=True, assign=True).missing_keys


def test_bad_head_names_file_and_keys(tmp_path):
    sd = torch.load(DEFAULT_HEAD, map_location="cpu", weights_only=True)
    sd["layers.3.weight"] = sd.pop("layers.2.weight")
    bad = tmp_path / "head.pth"
    torch.save(sd, bad)
    with pytest.raises(ConfigError, match=r"head\.pth(.|\n)*layers\.2\.weight(.|\n)*layers\.3\.weight"):
        load_aesthetic_head(bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_aesthetic_head(tmp_path / "nope.pth")


@pytest.mark.parametrize("layout", ["openai_file", "hf_folder"])
def test_aesthetic_reward_end_to_end(tmp_path, images, layout):
    arch = tiny_arch(embed_dim=768, quick_gelu=True)
    if layout == "openai_file":
        sd = random_openclip_state_dict(arch)
        sd["input_resolution"] = torch.tensor(14)  # OpenAI's state dict marker -> QuickGELU when arch='auto'
        torch.save(sd, tmp_path / "ViT-tiny.pt")
        clip_path = tmp_path / "ViT-tiny.pt"
    else:
        clip_path = save_hf_clip(tmp_path / "clip", arch, tokenizer_dir=None)
    spec = RewardConfig(name="aesthetic", weight=3.0, clip_path=str(clip_path),
                        options={"arch": "auto", "vision_heads": 2, "text_heads": 2})
    reward = build_reward(spec)
    assert not reward.tower.has_text  # the aesthetic head needs the image tower only
    x = images.clone().requires_grad_(True)
    scores = reward(x, ["a", "b", "c"])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    with torch.no_grad():  # the same numbers by hand: head(normalize(embedding of the resized, normalised image))
        pix = (F.adaptive_avg_pool2d(images, 14) - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        m = reward.tower.model
        emb = F.normalize(m.visual_projection(m.vision_model(pixel_values=pix).pooler_output), dim=-1)
        torch.testing.assert_close(scores, load_aesthetic_head()(emb).squeeze(-1))
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_aesthetic_needs_a_backbone():
    with pytest.raises(ConfigError, match="clip_path"):
        build_reward(RewardConfig(name="aesthetic"))
    with pytest.raises(FileNotFoundError, match="missing-vit"):
        build_reward(RewardConfig(name="aesthetic", clip_path="/nowhere/missing-vit.pt"))


def test_head_gradcheck():
    head = load_aesthetic_head().double()
    emb = F.normalize(torch.randn(2, 768, dtype=torch.float64), dim=-1).requires_grad_(True)
    assert torch.autograd.gradcheck(head, (emb,), eps=1e-6, atol=1e-6, fast_mode=True)
