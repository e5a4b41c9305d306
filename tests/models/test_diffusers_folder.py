"""Diffusers folders: ours, and legacy ones laid out like runwayml/stable-diffusion-v1-5's."""
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from textcraftor_fast.config import ModelConfig
from textcraftor_fast.models import load_components
from textcraftor_fast.models import load_diffusers_folder

_OLD_VAE_ATTN = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def _rewrite(path, fn):
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})


def _old_vae_names(sd):
    out = {}
    for key, value in sd.items():
        for new, old in _OLD_VAE_ATTN.items():
            key = key.replace(f"mid_block.attentions.0.{new}", f"mid_block.attentions.0.{old}")
        out[key] = value
    return out


def test_text_encoder_saved_with_text_model_prefix(tiny_folder):
    # Readable by transformers < 5.6 too (a flattened file would load there as random weights).
    keys = load_file(str(tiny_folder / "text_encoder" / "model.safetensors"))
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_legacy_sd15_style_folder(tiny, tiny_folder, tmp_path, assert_same_weights):
    folder = shutil.copytree(tiny_folder, tmp_path / "legacy")
    # SD1.5's published VAE uses the pre-0.14 attention names; its text encoder stores position_ids.
    _rewrite(folder / "vae" / "diffusion_pytorch_model.safetensors", _old_vae_names)
    _rewrite(folder / "text_encoder" / "model.safetensors",
             lambda sd: {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]})
    comp = load_diffusers_folder(folder)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(tiny, part), getattr(comp, part))


def test_truncated_folder_weights_are_rejected(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "broken")
    _rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors",
             lambda sd: {k: v for k, v in sd.items() if not k.startswith("conv_out.")})
    with pytest.raises(ValueError, match=r"unet': the UNet weights do not match its config; "
                                         r"missing keys: 2 \('conv_out.bias', 'conv_out.weight'\)"):
        load_diffusers_folder(folder)


def test_tiny_world_dispatch(tiny, monkeypatch):
    # The tiny world lives in textcraftor_fast.tiny.world, registered by name; load_components only dispatches.
    fake = types.ModuleType("textcraftor_fast.tiny.world")
    fake.load_tiny_world_kind = lambda cfg, seed: tiny
    monkeypatch.setitem(sys.modules, "textcraftor_fast.tiny.world", fake)
    assert load_components(ModelConfig(kind="tiny_world")) is tiny
