"""Bad paths and mismatched checkpoints fail loudly, naming the path and what was expected."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from textcraftor_fast.config import ModelConfig
from textcraftor_fast.models import load_components
from textcraftor_fast.models import load_single_file, load_text_encoder


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist.*diffusers folder"):
        load_components(ModelConfig(kind="pretrained", path=str(missing)))


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a diffusers Stable Diffusion folder: missing model_index\.json, "
                                                r"vae/, text_encoder/, tokenizer/, scheduler/"):
        load_components(ModelConfig(kind="pretrained", path=str(tmp_path)))


def test_wrong_extension(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model\.bin.*extension '\.bin'.*\.safetensors, \.ckpt"):
        load_components(ModelConfig(kind="pretrained", path=str(path)))


def test_missing_keys_are_named(tiny_folder, tiny_single_file, tmp_path):
    sd = load_file(str(tiny_single_file))
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as info:
        load_single_file(path, config_dir=tiny_folder)
    msg = str(info.value)
    assert "broken.safetensors" in msg and "UNet" in msg
    assert "missing keys: 1 ('conv_out.weight')" in msg
    assert "unexpected keys: 1 ('model.diffusion_model.bogus.weight')" in msg


def test_tiny_file_with_sd15_architecture_is_rejected(tiny_single_file):
    # Default config = the shipped SD1.5 architecture: shapes and keys differ, so nothing may load silently.
    with pytest.raises(ValueError, match=r"model\.safetensors': the UNet weights do not match.*wrong-shape keys"):
        load_single_file(tiny_single_file)


def test_file_without_text_encoder(tiny_folder, tiny_single_file, tmp_path):
    sd = {k: v for k, v in load_file(str(tiny_single_file)).items() if not k.startswith("cond_stage_model.")}
    path = tmp_path / "no_clip.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"text encoder weights do not match.*missing keys"):
        load_single_file(path, config_dir=tiny_folder)


def test_config_dir_without_configs(tiny_single_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks unet/config\.json"):
        load_single_file(tiny_single_file, config_dir=tmp_path)


def test_text_encoder_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_text_encoder(tmp_path)


def test_empty_pretrained_path():
    with pytest.raises(ValueError, match="model.path is empty"):
        load_components(ModelConfig(kind="pretrained", path=""))  # not validated: load_components checks too


class _NotATensor:
    pass


def test_ckpt_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "callbacks": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"unsafe\.ckpt' holds Python objects that are unsafe to unpickle"):
        load_single_file(path)
