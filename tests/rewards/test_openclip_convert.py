"""The open_clip -> transformers key map: exact published architectures on meta, and numerics on a tiny one.

The reference below recomputes open_clip's forward (model.py CLIP.encode_image / encode_text,
VisionTransformer, ResidualAttentionBlock with nn.MultiheadAttention) directly from the open_clip-layout
weights, so a wrong rename, split or transpose shows up as different embeddings.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reward_fixtures import VOCAB, random_openclip_state_dict, tiny_arch
from textcraftor_fast.config import ConfigError
from textcraftor_fast.rewards.clip_tower import ClipTower, hf_model_from_state_dict, openclip_model_from_state_dict
from textcraftor_fast.rewards.openclip_convert import (ARCHS, hf_clip_config, infer_arch, meta_openclip_state_dict,
                                                       openclip_to_transformers)


def _block(x, sd, p, heads, act, mask=None):  # x (L, B, W), as open_clip's LND layout
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], 1e-5)
    a, _ = F.multi_head_attention_forward(
        h, h, h, w, heads, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"], None, None, False, 0.0,
        sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)
    x = x + a
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], 1e-5)
    h = F.linear(act(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])),
                 sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
    return x + h


def _act(quick: bool):
    return (lambda t: t * torch.sigmoid(1.702 * t)) if quick else F.gelu


def ref_encode_image(sd, arch, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=arch.patch_size)  # (B, W, g, g)
    x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (x.shape[-1],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5).transpose(0, 1)
    for i in range(arch.vision_layers):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", arch.vision_heads, _act(arch.quick_gelu))
    x = F.layer_norm(x[0], (x.shape[-1],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return x @ sd["visual.proj"]


def ref_encode_text(sd, arch, ids):
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"]).transpose(0, 1)  # (L, B, W)
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu_(1)  # open_clip's build_attention_mask
    for i in range(arch.text_layers):
        x = _block(x, sd, f"transformer.resblocks.{i}", arch.text_heads, _act(arch.quick_gelu), mask)
    x = F.layer_norm(x.transpose(0, 1), (x.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_key_map_matches_direct_openclip_computation(quick_gelu):
    arch = tiny_arch(quick_gelu=quick_gelu)
    sd = random_openclip_state_dict(arch, seed=3)
    model = openclip_model_from_state_dict(dict(sd), "auto", True, "memory", quick_gelu=quick_gelu,
                                           vision_heads=2, text_heads=2)
    tower = ClipTower(model, tokenizer=None)
    pixels = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[62, 5, 30, 63, 63, 63, 63, 63, 63, 63, 63, 63],
                        [62, 7, 8, 40, 2, 33, 63, 63, 63, 63, 63, 63]])
    with torch.no_grad():
        img = tower.image_features(pixels)
        txt = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
    torch.testing.assert_close(img, F.normalize(ref_encode_image(sd, arch, pixels), dim=-1), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(txt, F.normalize(ref_encode_text(sd, arch, ids), dim=-1), atol=2e-6, rtol=1e-5)
    assert float(model.logit_scale) == pytest.approx(float(sd["logit_scale"]))


# Parameter counts (millions) from open_clip's docs/model_profile.csv: total, image tower, text tower.
PROFILE = {"ViT-L-14": (427.62, 303.97, 123.65), "ViT-H-14": (986.11, 632.08, 354.03),
           "ViT-g-14": (1366.68, 1012.65, 354.03)}


@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-H-14", "ViT-g-14"])
def test_published_architectures_load_strictly_on_meta(name):
    arch = ARCHS[name]
    sd = meta_openclip_state_dict(arch)
    sd["attn_mask"] = torch.empty(77, 77, device="meta")  # written by some open_clip versions: ignored
    model = openclip_model_from_state_dict(sd, name, True, f"{name} (meta)")
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    image = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_model", "visual_proj")))
    want_total, want_image, want_text = PROFILE[name]
    assert round(total / 1e6, 2) == pytest.approx(want_total, abs=0.011)
    assert round(image / 1e6, 2) == pytest.approx(want_image, abs=0.011)
    assert round((total - image - 1) / 1e6, 2) == pytest.approx(want_text, abs=0.011)  # -1: logit_scale
    vision_only = openclip_model_from_state_dict(meta_openclip_state_dict(arch), name, False, name)
    assert type(vision_only).__name__ == "CLIPVisionModelWithProjection"


def test_pickscore_folder_layout_loads_strictly_on_meta():
    # PickScore_v1 is a transformers CLIPModel of ViT-H-14 (its config.json: projection_dim 1024, vision 1280x32,
    # text 1024x24, heads 16, gelu); older transformers also saved the position_ids buffers.
    config = hf_clip_config(ARCHS["ViT-H-14"])
    config.text_config.eos_token_id = 49407
    hf_sd = openclip_to_transformers(meta_openclip_state_dict(ARCHS["ViT-H-14"]))
    hf_sd["text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    hf_sd["vision_model.embeddings.position_ids"] = torch.empty(1, 257, device="meta")
    model = hf_model_from_state_dict(config, hf_sd, True, "PickScore_v1 (meta)")
    assert model.config.vision_config.hidden_size == 1280 and model.config.text_config.num_hidden_layers == 24


def _acts(model) -> set[str]:
    cfg = model.config
    configs = [cfg.vision_config, cfg.text_config] if hasattr(cfg, "vision_config") else [cfg]
    return {c.hidden_act for c in configs}


def _openai(sd: dict) -> dict:
    """OpenAI's state dict layout: the same weights plus its three top-level non-weight entries."""
    return {**sd, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(49408)}


@pytest.mark.parametrize("with_text", [True, False])
def test_activation_follows_the_checkpoint_format(with_text, tmp_path):
    """OpenAI files -> QuickGELU, open_clip/LAION files -> GELU ('auto'); a named arch keeps its own; a
    transformers folder keeps its config's. (The OpenAI marker is among the keys cleaning drops.)"""
    from reward_fixtures import save_hf_clip
    from textcraftor_fast.rewards.clip_tower import load_clip_tower

    sd = random_openclip_state_dict(tiny_arch(), with_text=with_text)
    kw = dict(vision_heads=2, text_heads=2)
    assert _acts(openclip_model_from_state_dict(_openai(sd), "auto", with_text, "openai.pt", **kw)) == {"quick_gelu"}
    assert _acts(openclip_model_from_state_dict(dict(sd), "auto", with_text, "laion.bin", **kw)) == {"gelu"}
    forced = openclip_model_from_state_dict(_openai(sd), "auto", with_text, "openai.pt", quick_gelu=False, **kw)
    assert _acts(forced) == {"gelu"}  # an explicit quick_gelu wins
    # Named: OpenAI's ViT-L/14 is QuickGELU even as an open_clip re-save (no marker); LAION's ViT-H/14 is GELU.
    big = {"ViT-L-14": "quick_gelu", "ViT-H-14": "gelu"}
    for name, act in big.items():
        meta = meta_openclip_state_dict(ARCHS[name], with_text)
        assert _acts(openclip_model_from_state_dict(meta, name, with_text, name)) == {act}, name
    for quick in (True, False):
        folder = save_hf_clip(tmp_path / f"hf-{quick}", tiny_arch(quick_gelu=quick), None)
        tower = load_clip_tower(folder, with_text=False)
        assert _acts(tower.model) == {"quick_gelu" if quick else "gelu"}


def test_aesthetic_backbone_is_openai_quickgelu():
    cfg = hf_clip_config(ARCHS["ViT-L-14"], with_text=False)
    assert (cfg.hidden_act, cfg.hidden_size, cfg.num_hidden_layers, cfg.projection_dim) == ("quick_gelu", 1024, 24, 768)
    assert hf_clip_config(ARCHS["ViT-g-14"]).vision_config.intermediate_size == 6144


def test_mismatch_names_file_and_keys():
    arch = tiny_arch()
    sd = random_openclip_state_dict(arch)
    del sd["visual.ln_post.bias"]
    sd["visual.proj"] = torch.zeros(16, 9)
    sd["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError) as e:
        openclip_model_from_state_dict(sd, "auto", True, "/x/bad.bin", vision_heads=2, text_heads=2)
    msg = str(e.value)
    assert "/x/bad.bin" in msg and "visual.ln_post.bias" in msg and "visual.extra.weight" in msg
    with pytest.raises(ConfigError, match=r"ViT-g-14.*\n.*missing keys"):  # a tiny file is not a ViT-g-14
        openclip_model_from_state_dict(random_openclip_state_dict(arch), "ViT-g-14", True, "/x/small.bin")


def test_infer_arch_reads_shapes():
    arch = tiny_arch(embed_dim=8)
    got = infer_arch(random_openclip_state_dict(arch), vision_heads=2, text_heads=2)
    assert (got.vision_layers, got.text_layers, got.image_size, got.vocab_size) == (2, 2, 14, VOCAB)
    big = infer_arch(meta_openclip_state_dict(ARCHS["ViT-g-14"]))
    assert big.vision_heads == 16 and big.vision_mlp == 6144 and big.text_layers == 24
