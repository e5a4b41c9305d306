"""rewards/shared_text.py: a reward tower whose text transformer equals the original encoder's uses that module.

Expected values come from the tower's own, unshared copy (its text features before sharing) and from the kernel's
page accounting (/proc/self/smaps), not from the sharing code.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from textcraftor_fast.rewards.clip_tower import load_clip_tower
from textcraftor_fast.rewards.shared_text import share_text_transformers

PROMPTS = ["a red circle above a blue square", "a photo of a cat", ""]
# The real vocabulary (the shipped SD1.5 tokenizer feeds every tower) makes the token embedding 12.6 MB at width
# 64: large enough that paging it in shows in /proc/self/smaps beyond doubt.
TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=32)


def _text_bytes(text_model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in text_model.parameters())


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, CLIPModel]:
    """A CLIP folder (safetensors) and the model saved there."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)).eval()
    model.save_pretrained(str(folder))
    assert (folder / "model.safetensors").is_file()
    return folder, model


def _encoder_like(model: CLIPModel) -> CLIPTextModel:
    """An SD-style text encoder holding the tower's text weights (what SD1.5 is to CLIP ViT-L/14)."""
    encoder = CLIPTextModel(copy.deepcopy(model.config.text_config)).eval().requires_grad_(False)
    _transformer(encoder).load_state_dict(model.text_model.state_dict())
    return encoder


def _transformer(encoder: CLIPTextModel) -> nn.Module:
    return getattr(encoder, "text_model", encoder)  # transformers 4 wraps it; 5 does not


def test_an_equal_text_transformer_is_shared_and_gives_the_same_features(pair):
    folder, model = pair
    tower = load_clip_tower(folder)
    own = tower.model.text_model
    before = tower.encode_text(PROMPTS)  # the tower's own copy
    encoder = _encoder_like(model)
    shared = share_text_transformers(encoder, nn.ModuleList([tower]))
    assert shared == {"0": _text_bytes(own)} and _text_bytes(own) > 12 * 2**20
    assert tower.model.text_model is _transformer(encoder)
    assert torch.equal(tower.encode_text(PROMPTS), before)
    assert not any(p.requires_grad for p in tower.parameters())


def test_a_lora_adapted_encoder_is_shared_with_its_adapters_off(pair):
    from textcraftor_fast.models.encoder_lora import add_encoder_lora
    from textcraftor_fast.models.adapters import AdaptersDisabled

    folder, model = pair
    tower = load_clip_tower(folder)
    before = tower.encode_text(PROMPTS)
    encoder = _encoder_like(model)
    add_encoder_lora(encoder, 4, 4.0, ("q_proj", "v_proj"))
    with torch.no_grad():  # trained adapters: the adapted encoder is no longer the tower's text transformer
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_()
    original = AdaptersDisabled(encoder)
    assert share_text_transformers(original, nn.ModuleList([tower])) == {"0": _text_bytes(model.text_model)}
    assert tower.model.text_model is original
    torch.testing.assert_close(tower.encode_text(PROMPTS), before, atol=0, rtol=0)
    assert all(p.requires_grad for name, p in encoder.named_parameters() if ".lora_" in name)


@pytest.mark.parametrize("change", ["one weight", "eos token", "dtype"])
def test_a_different_text_transformer_is_not_shared(pair, change):
    folder, model = pair
    tower = load_clip_tower(folder)
    encoder = _encoder_like(model)
    if change == "one weight":
        with torch.no_grad():
            _transformer(encoder).final_layer_norm.weight[3] += 2**-10
    elif change == "eos token":  # picks the pooled token: same weights, another forward
        _transformer(encoder).config.eos_token_id = 2
        tower.model.text_model.config.eos_token_id = 49407
    else:
        encoder.double()
    own = tower.model.text_model
    assert share_text_transformers(encoder, nn.ModuleList([tower])) == {}
    assert tower.model.text_model is own


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of every mapping of `path` in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_comparing_does_not_page_in_the_towers_mapped_copy(pair):
    folder, model = pair
    weights = (folder / "model.safetensors").resolve()
    encoder = _encoder_like(model)
    tower = load_clip_tower(folder)
    text_bytes = _text_bytes(tower.model.text_model)
    text_kib = text_bytes // 1024
    assert _mapped_rss_kib(weights) < text_kib // 4, "the loader paged the file in: this test measures nothing"
    assert share_text_transformers(encoder, nn.ModuleList([tower])) == {"0": text_bytes}
    assert _mapped_rss_kib(weights) < text_kib // 4
    # The control: comparing through the loaded copy, as a plain torch.equal would, pages the text half in.
    other = load_clip_tower(folder)
    assert all(torch.equal(p, q) for p, q in zip(other.model.text_model.parameters(), encoder.parameters()))
    assert _mapped_rss_kib(weights) > text_kib * 3 // 4
