"""Original single-file layout: a tiny model saved that way loads to exactly the weights of its diffusers folder."""
import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast.config import ModelConfig
from textcraftor_fast.models import load_components
from textcraftor_fast.models import build_tiny_random, keymap, load_diffusers_folder, load_single_file

PARTS = ("unet", "vae", "text_encoder")


def test_single_file_equals_diffusers_folder(assert_same_weights, tiny, tiny_folder, tiny_single_file):
    from_folder = load_diffusers_folder(tiny_folder)
    from_file = load_single_file(tiny_single_file, config_dir=tiny_folder)
    for part in PARTS:
        assert_same_weights(getattr(from_folder, part), getattr(from_file, part))
        assert_same_weights(getattr(tiny, part), getattr(from_file, part))
        assert not getattr(from_file, part).training
    cat_ids = [49406, 320, 2368, 49407]
    assert from_file.tokenizer("a cat").input_ids == from_folder.tokenizer("a cat").input_ids == cat_ids
    assert dict(from_file.scheduler.config) == dict(from_folder.scheduler.config)


def test_single_file_uses_original_key_layout(tiny_single_file):
    keys = set(load_file(str(tiny_single_file)))
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys


def test_loaded_text_encoder_runs_like_the_original(tiny, tiny_folder, tiny_single_file):
    loaded = load_single_file(tiny_single_file, config_dir=tiny_folder).text_encoder
    ids = tiny.tokenizer(["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], tiny.text_encoder(ids)[0], rtol=0, atol=0)


def test_ckpt_with_state_dict_wrapper(assert_same_weights, tiny, tiny_folder, tiny_single_file, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_file)), "global_step": 7}, path)
    loaded = load_single_file(path, config_dir=tiny_folder)
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(loaded, part))


def test_half_precision_file_loads_as_float32(tiny, tiny_folder, tmp_path):
    from textcraftor_fast.models import save_single_file

    path = save_single_file(tiny, tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_file(str(path))["model.diffusion_model.out.2.weight"].dtype == torch.float16
    loaded = load_single_file(path, config_dir=tiny_folder)
    w = loaded.unet.conv_out.weight
    assert w.dtype == torch.float32 and torch.equal(w, tiny.unet.conv_out.weight.half().float())


def test_diffusers_from_single_file_reads_our_export(assert_same_weights, tiny, tiny_folder, tiny_single_file):
    # Interop: diffusers' own single-file loader (what other tools use) reads our inverse mapping identically.
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        model = cls.from_single_file(str(tiny_single_file), config=str(tiny_folder), subfolder=part,
                                     local_files_only=True)
        assert_same_weights(getattr(tiny, part), model)


def test_load_components_pretrained_folder(assert_same_weights, tiny, tiny_folder):
    comp = load_components(ModelConfig(kind="pretrained", path=str(tiny_folder)))
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(comp, part))


def test_unknown_diffusers_key_is_not_guessed():
    with pytest.raises(KeyError, match="not_a_block"):
        keymap.diffusers_to_ldm_unet({"not_a_block.weight": torch.zeros(1)}, 2)


def test_tiny_random_is_deterministic_and_runs_at_32px(assert_same_weights, tiny):
    again = build_tiny_random(seed=0)
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(again, part))
    other = build_tiny_random(seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    ids = tiny.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = tiny.text_encoder(ids)[0]  # (1, 77, 32)
        latents = tiny.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean  # (1, 4, 16, 16)
        eps = tiny.unet(latents, torch.tensor([999]), encoder_hidden_states=emb).sample
        image = tiny.vae.decode(eps / tiny.vae.config.scaling_factor).sample
    assert latents.shape == (1, 4, 32 // tiny.vae_scale_factor, 32 // tiny.vae_scale_factor)
    assert eps.shape == latents.shape and image.shape == (1, 3, 32, 32)
