"""The hand-written SD1.5 configs build the exact SD1.5 architecture (on meta: no memory, no init)."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from textcraftor_fast.models import SD15_CONFIG_DIR, keymap, load_scheduler


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sd15_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder")))
    return unet, vae, text


def test_parameter_counts_match_sd15():
    unet, vae, text = _sd15_on_meta()
    assert _count(unet) == 859_520_964
    assert _count(vae) == 83_653_863
    assert _count(text) == 123_060_480
    assert vae.config.scaling_factor == 0.18215 and vae.config.latent_channels == 4
    assert unet.config.cross_attention_dim == text.config.hidden_size == 768


def test_scheduler_is_sd15_ddim():
    sched = load_scheduler()
    assert type(sched).__name__ == "DDIMScheduler"
    expected = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
    assert {k: sched.config[k] for k in expected} == expected


def test_model_index_lists_components():
    index = json.loads((SD15_CONFIG_DIR / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)


def test_sd15_key_map_round_trips_through_diffusers_converters():
    # Our diffusers -> original map, read back by diffusers' own converters, must give the same keys and shapes
    # for the real SD1.5 architecture (934 UNet+VAE keys + 197 CLIP keys = the 1131 of v1-5-pruned-emaonly).
    unet, vae, text = _sd15_on_meta()
    ldm = keymap.diffusers_to_ldm_unet(unet.state_dict(), unet.config.layers_per_block)
    ldm.update(keymap.diffusers_to_ldm_vae(vae.state_dict(), len(vae.config.up_block_types)))
    ldm.update(keymap.diffusers_to_ldm_clip(text.state_dict(), 77))
    assert len(ldm) == 1131
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # upsampler after a resnet-only level
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # ... after an attention level
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias" in ldm
    for original, back in ((unet, keymap.ldm_to_diffusers_unet(ldm, unet.config)),
                           (vae, keymap.ldm_to_diffusers_vae(ldm, vae.config)),
                           (text, keymap.ldm_to_diffusers_clip(ldm))):
        expected = {k: tuple(v.shape) for k, v in original.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == expected


def test_sd15_original_layout_loads_strictly_into_sd15_architecture():
    # The full single-file loading path for the real SD1.5 architecture, on meta tensors (no 4 GB file).
    from textcraftor_fast.models import loading

    unet, vae, text = _sd15_on_meta()
    ldm = keymap.diffusers_to_ldm_unet(unet.state_dict(), 2)
    ldm.update(keymap.diffusers_to_ldm_vae(vae.state_dict(), 4))
    ldm.update(keymap.diffusers_to_ldm_clip(text.state_dict(), 77))
    ldm["model_ema.decay"] = torch.empty((), device="meta")  # other top-level entries of real files are ignored
    loaded_unet = loading._unet_from_ckpt(ldm, SD15_CONFIG_DIR, "sd15.safetensors", torch.float16)
    loaded_vae = loading._vae_from_ckpt(ldm, SD15_CONFIG_DIR, "sd15.safetensors", torch.float16)
    loaded_text = loading.text_encoder_from_state_dict(ldm, text.config, "sd15.safetensors")
    assert _count(loaded_unet) == 859_520_964 and loaded_unet.conv_in.weight.dtype == torch.float16
    assert _count(loaded_vae) == 83_653_863
    assert _count(loaded_text) == 123_060_480
    assert loaded_text.embeddings.position_ids.tolist() == [list(range(77))]

    ldm["model.diffusion_model.input_blocks.99.0.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"unexpected keys: 1 \('model.diffusion_model.input_blocks.99.0.weight'\)"):
        loading._unet_from_ckpt(ldm, SD15_CONFIG_DIR, "sd15.safetensors", torch.float32)
