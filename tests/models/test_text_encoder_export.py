"""Text-encoder export in both layouts round-trips exactly, and model.text_encoder_path swaps it in."""
import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast.config import ModelConfig
from textcraftor_fast.models import load_components
from textcraftor_fast.models import build_tiny_random, export_text_encoder, load_text_encoder


@pytest.fixture(scope="module")
def tuned():
    # A "fine-tuned" encoder: same architecture, different weights (another seed) than tiny_random(0)'s.
    return build_tiny_random(seed=5).text_encoder


def test_diffusers_layout_round_trip(tuned, tmp_path, assert_same_weights):
    out = export_text_encoder(tuned, tmp_path / "text_encoder", layout="diffusers")
    assert (out / "config.json").is_file()
    assert_same_weights(tuned, load_text_encoder(out))
    assert_same_weights(tuned, load_text_encoder(tmp_path))  # a parent folder holding text_encoder/ also works


def test_re_exporting_a_loaded_encoder_keeps_one_prefix(tuned, tmp_path, assert_same_weights):
    # transformers saves a model loaded from a prefixed file back prefixed: the export must not add a second one.
    first = load_text_encoder(export_text_encoder(tuned, tmp_path / "a", layout="diffusers"))
    out = export_text_encoder(first, tmp_path / "b", layout="diffusers")
    keys = list(load_file(str(out / "model.safetensors")))
    assert all(k.startswith("text_model.") and not k.startswith("text_model.text_model.") for k in keys)
    assert_same_weights(tuned, load_text_encoder(out))


def test_single_file_layout_round_trip(tuned, tmp_path, assert_same_weights):
    out = export_text_encoder(tuned, tmp_path / "te.safetensors", layout="single_file")
    keys = load_file(str(out))
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert_same_weights(tuned, load_text_encoder(out, config=tuned.config))


def test_plain_state_dict_file_in_old_transformers_layout(tuned, tmp_path, assert_same_weights):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"  # transformers < 5.6 keys: "text_model.*"
    save_file({"text_model." + k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path))
    assert_same_weights(tuned, load_text_encoder(path, config=tuned.config))


def test_export_does_not_change_the_model(tuned, tmp_path):
    before = tuned.final_layer_norm.weight.clone()
    export_text_encoder(tuned, tmp_path / "half", layout="diffusers", dtype=torch.float16)
    assert tuned.final_layer_norm.weight.dtype == torch.float32 and torch.equal(tuned.final_layer_norm.weight, before)


def test_bad_layout_and_names(tuned, tmp_path):
    with pytest.raises(ValueError, match="layout must be one of"):
        export_text_encoder(tuned, tmp_path / "x", layout="onnx")
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        export_text_encoder(tuned, tmp_path / "x.bin", layout="single_file")


@pytest.mark.parametrize("layout,name", [("diffusers", "text_encoder"), ("single_file", "te.safetensors")])
def test_text_encoder_path_override(tuned, tmp_path, layout, name, assert_same_weights):
    path = export_text_encoder(tuned, tmp_path / name, layout=layout)
    comp = load_components(ModelConfig(kind="tiny_random", resolution=32, text_encoder_path=str(path)), seed=0)
    assert_same_weights(tuned, comp.text_encoder)
    assert not comp.text_encoder.training


def test_override_with_wrong_architecture_is_rejected(tuned, tmp_path):
    path = export_text_encoder(tuned, tmp_path / "te.safetensors", layout="single_file")
    # Default config is SD1.5's CLIP-L (hidden 768): the tiny file must not load into it.
    with pytest.raises(ValueError, match=r"te\.safetensors': the text encoder weights do not match.*wrong-shape"):
        load_text_encoder(path)
