"""The shipped SD2.1 and SDXL base 1.0 configs build the published architectures (on meta: no memory, no init).

Parameter counts are the published models' (diffusers folders of stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0); the UNet/VAE configs are also rebuilt from the original inference YAMLs
(Stability-AI/stablediffusion v2-inference-v.yaml, Stability-AI/generative-models sd_xl_base.yaml) by diffusers'
own `create_*_diffusers_config_from_ldm`, so a typo in a block type or head count cannot hide behind a count.
"""
import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, create_unet_diffusers_config_from_ldm,
                                                 create_vae_diffusers_config_from_ldm)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import textcraftor_fast.models as models_pkg

MODELS = Path(models_pkg.__file__).parent
SD15, SD2, SDXL = MODELS / "sd15", MODELS / "sd2", MODELS / "sdxl"
KL_VAE = 83_653_863


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _on_meta(folder: Path, part: str):
    with torch.device("meta"):
        if part == "unet":
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / part)))
        if part == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / part)))
        cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig.from_pretrained(str(folder / part)))


@pytest.mark.parametrize("folder, part, expected", [
    (SD2, "unet", 865_910_724), (SD2, "vae", KL_VAE), (SD2, "text_encoder", 340_387_840),
    (SDXL, "unet", 2_567_463_684), (SDXL, "vae", KL_VAE), (SDXL, "text_encoder", 123_060_480),
    (SDXL, "text_encoder_2", 694_659_840),
], ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_parameter_counts_match_published(folder, part, expected):
    assert _count(_on_meta(folder, part)) == expected


def test_widths_fit_together():
    sd2_unet, sd2_text = (json.loads((SD2 / p / "config.json").read_text()) for p in ("unet", "text_encoder"))
    assert sd2_unet["cross_attention_dim"] == sd2_text["hidden_size"] == 1024
    assert sd2_text["num_hidden_layers"] == 23 and sd2_text["hidden_act"] == "gelu"  # OpenCLIP ViT-H, penultimate
    unet, te1, te2 = (json.loads((SDXL / p / "config.json").read_text())
                      for p in ("unet", "text_encoder", "text_encoder_2"))
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"] == 2048
    # add_embedding reads the pooled embedding (encoder 2's projection) and 6 time ids of 256 each.
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * 256 == 2816
    assert te1["hidden_act"] == "quick_gelu" and te2["hidden_act"] == "gelu"


# The UNet and first-stage params of the original inference configs (see the module docstring).
_LDM = {
    "sd2": dict(unet=dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                          num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
                          use_linear_in_transformer=True, transformer_depth=1, context_dim=1024),
                scale_factor=0.18215, marker=CHECKPOINT_KEY_NAMES["v2"], marker_shape=(320, 1024)),
    "sdxl": dict(unet=dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4,
                           model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
                           num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10],
                           context_dim=2048),
                 scale_factor=0.13025, marker=CHECKPOINT_KEY_NAMES["xl_base"], marker_shape=(1280,)),
}
_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _lists(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


@pytest.mark.parametrize("family, folder", [("sd2", SD2), ("sdxl", SDXL)])
def test_configs_equal_diffusers_conversion_of_the_original_yaml(family, folder):
    ldm = _LDM[family]
    original = {"model": {"params": {"unet_config": {"params": ldm["unet"]}, "scale_factor": ldm["scale_factor"],
                                     "first_stage_config": {"params": {"ddconfig": _DDCONFIG}}}}}
    # diffusers picks the sample size (768 / 1024 px) from a marker key of the checkpoint.
    checkpoint = {ldm["marker"]: torch.empty(ldm["marker_shape"], device="meta")}
    for part, converted in (("unet", create_unet_diffusers_config_from_ldm(original, checkpoint)),
                            ("vae", create_vae_diffusers_config_from_ldm(original, checkpoint))):
        ours = _on_meta(folder, part).config  # the defaults filled in (SD2's file omits transformer_layers_per_block)
        assert _lists({k: ours[k] for k in converted}) == _lists(converted), part


def test_fp32_flags_not_in_the_yaml():
    # SD2.1-v overflows in fp16 attention (its published unet config upcasts); SDXL's VAE in fp16 decoding.
    assert json.loads((SD2 / "unet" / "config.json").read_text())["upcast_attention"] is True
    assert json.loads((SDXL / "vae" / "config.json").read_text())["force_upcast"] is True  # fp16 VAE overflows


@pytest.mark.parametrize("folder, cls, expected", [
    (SD2, "DDIMScheduler", dict(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)),
    (SDXL, "EulerDiscreteScheduler", dict(prediction_type="epsilon", interpolation_type="linear",
                                          use_karras_sigmas=False)),
], ids=["sd2", "sdxl"])
def test_schedulers(folder, cls, expected):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == cls
    sched = getattr(diffusers, cls).from_config(config)
    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  steps_offset=1, timestep_spacing="leading")
    assert {k: sched.config[k] for k in {**common, **expected}} == {**common, **expected}


@pytest.mark.parametrize("folder, pipeline, parts", [
    (SD2, "StableDiffusionPipeline", {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}),
    (SDXL, "StableDiffusionXLPipeline",
     {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}),
], ids=["sd2", "sdxl"])
def test_model_index_lists_components_that_exist(folder, pipeline, parts):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    assert {k for k in index if not k.startswith("_") and isinstance(index[k], list)} == parts
    for part in parts:
        assert (folder / part).is_dir(), part
    assert index.get("force_zeros_for_empty_prompt") is (True if pipeline.endswith("XLPipeline") else None)
    assert index["scheduler"][1] == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"]
    if "text_encoder_2" in index:
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        assert json.loads((folder / "text_encoder_2" / "config.json").read_text())["architectures"] == [
            "CLIPTextModelWithProjection"]


def test_folder_family_reads_the_shipped_folders():
    from textcraftor_fast.models.families import folder_family

    assert [folder_family(f) for f in (SD15, SD2, SDXL)] == ["sd15", "sd2", "sdxl"]


PHOTO_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("folder, pad_id", [
    (SD15 / "tokenizer", 49407), (SD2 / "tokenizer", 0), (SDXL / "tokenizer", 49407), (SDXL / "tokenizer_2", 0),
], ids=["sd15", "sd2", "sdxl", "sdxl_2"])
def test_tokenizers(folder, pad_id):
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    reference = CLIPTokenizer.from_pretrained(str(SD15 / "tokenizer"), local_files_only=True)
    assert tok("a photo of a cat").input_ids == reference("a photo of a cat").input_ids == PHOTO_IDS
    assert tok.pad_token_id == pad_id and len(tok) == 49408 and tok.model_max_length == 77
    # Both files name it, and agree (transformers lets one override the other).
    assert {json.loads((folder / name).read_text())["pad_token"]
            for name in ("tokenizer_config.json", "special_tokens_map.json")} == {tok.pad_token}
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {pad_id}
    # The same BPE files as SD1.5's (OpenCLIP ships OpenAI's vocabulary), with their license.
    for name in ("vocab.json", "merges.txt", "LICENSE"):
        assert (folder / name).read_bytes() == (SD15 / "tokenizer" / name).read_bytes(), name
