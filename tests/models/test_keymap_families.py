"""SD2.x / SDXL single-file key maps: our writer's output, read back by diffusers' own converters, gives the identical
state dict; our reader reads what diffusers reads, and is strict where diffusers is not; family detection.

Every tensor is random (LayerNorms included), so a swapped or transposed name shows up as a different value.
"""
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import textcraftor_fast.models as models_pkg
from textcraftor_fast.models import keymap
from textcraftor_fast.models import keymap_families as kf
from textcraftor_fast.rewards.openclip_convert import (OpenClipArch, openclip_state_shapes, openclip_to_transformers,
                                                       transformers_to_openclip)

MODELS = Path(models_pkg.__file__).parent
SD2_PREFIX, XL1_PREFIX, XL2_PREFIX = kf.SD2_OPENCLIP_PREFIX, kf.SDXL_CLIP_PREFIX, kf.SDXL_OPENCLIP_PREFIX


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _clip(layers: int, projection: bool = False, act: str = "gelu", hidden: int = 32, seed: int = 0):
    """A tiny CLIP text encoder; projection_dim differs from hidden so a missing transpose cannot pass."""
    config = CLIPTextConfig(vocab_size=64, max_position_embeddings=16, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, projection_dim=hidden // 2, hidden_act=act)
    return _randomize((CLIPTextModelWithProjection if projection else CLIPTextModel)(config), seed)


def _assert_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


def _flat(sd: dict) -> dict:
    """diffusers' converters name CLIPTextModel keys `text_model.*`; transformers >= 5.6 flattens them."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------
# OpenCLIP text towers
# ---------------------------------------------------------------------------------------------------------

def test_sd2_writer_round_trips_through_diffusers_converter():
    model = _clip(3)
    sd = model.state_dict()
    written = kf.write_text_encoders("sd2", [sd])
    assert all(k.startswith(SD2_PREFIX) for k in written)
    assert written[SD2_PREFIX + "transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert SD2_PREFIX + "text_projection" not in written and SD2_PREFIX + "ln_final.bias" in written
    assert len(written) == 3 * 12 + 4  # 12 tensors a resblock + token/position embeddings + ln_final
    _assert_equal(_flat(convert_open_clip_checkpoint(model, written, prefix=SD2_PREFIX)), sd)
    _assert_equal(kf.read_text_encoders("sd2", written, [3])[0], sd)


@pytest.mark.parametrize("kept", [23, 3])
def test_sd2_reader_ignores_openclips_last_layer_projection_and_logit_scale(kept):
    # The published file holds OpenCLIP's whole tower (kept + 1 layers, text_projection, logit_scale); diffusers'
    # model keeps the first `kept` layers. 23 is SD2's own depth, which diffusers' converter hard-codes.
    tower = _clip(kept + 1, projection=True, hidden=8, seed=1)
    file = kf.diffusers_to_openclip_text({**tower.state_dict(), "logit_scale": torch.tensor(4.6)}, SD2_PREFIX)
    assert {SD2_PREFIX + f"transformer.resblocks.{kept}.ln_1.weight", SD2_PREFIX + "text_projection",
            SD2_PREFIX + "logit_scale"} <= set(file)
    model = CLIPTextModel(CLIPTextConfig(**{**tower.config.to_dict(), "num_hidden_layers": kept}))
    expected = {k.removeprefix("text_model."): v for k, v in tower.state_dict().items()
                if k.startswith("text_model.") and f"layers.{kept}." not in k}
    got = kf.openclip_to_diffusers_text(file, SD2_PREFIX, kept, projection=False)
    _assert_equal(got, expected)
    model.load_state_dict(got, strict=True)
    if kept == 23:
        _assert_equal(got, _flat(convert_open_clip_checkpoint(model, file, prefix=SD2_PREFIX)))
    ignored = kf.ignored_openclip_tensors(file, SD2_PREFIX, kept, projection=False)
    assert len(ignored) == 12 + 2 and ignored[SD2_PREFIX + "logit_scale"] is file[SD2_PREFIX + "logit_scale"]


def test_sdxl_encoder_2_round_trips_with_its_projection_as_a_matrix():
    model = _clip(3, projection=True, seed=2)
    sd = model.state_dict()
    written = kf.diffusers_to_openclip_text(sd, XL2_PREFIX)
    proj = written[XL2_PREFIX + "text_projection"]  # (hidden, projection_dim), used as x @ proj
    assert proj.shape == (32, 16)
    x = torch.randn(5, 32)
    torch.testing.assert_close(x @ proj, model.text_projection(x), rtol=0, atol=0)
    _assert_equal(convert_open_clip_checkpoint(model, written, prefix=XL2_PREFIX), sd)
    file = {**written, XL2_PREFIX + "logit_scale": torch.tensor(4.6055)}  # as published; not the encoder's
    _assert_equal(kf.openclip_to_diffusers_text(file, XL2_PREFIX, 3, projection=True), sd)


def test_sdxl_text_encoders_round_trip():
    enc1, enc2 = _clip(2, act="quick_gelu", seed=3), _clip(3, projection=True, seed=4)
    written = kf.write_text_encoders("sdxl", [enc1.state_dict(), enc2.state_dict()], max_positions=16)
    pos_ids = written[XL1_PREFIX + "text_model.embeddings.position_ids"]  # published SDXL files carry it
    assert pos_ids.dtype == torch.int64 and pos_ids.tolist() == [list(range(16))]
    assert {k.split(".")[2] for k in written} == {"0", "1"}  # conditioner.embedders.{0,1}
    from_diffusers = _flat(convert_ldm_clip_checkpoint({k: v for k, v in written.items() if k.startswith(XL1_PREFIX)}))
    from_diffusers.pop(keymap.CLIP_POSITION_IDS)
    _assert_equal(from_diffusers, enc1.state_dict())
    read = kf.read_text_encoders("sdxl", written, [2, 3])
    _assert_equal(read[0], enc1.state_dict())
    _assert_equal(read[1], enc2.state_dict())


def test_sd15_text_encoder_through_the_family_helpers():
    enc = _clip(2, act="quick_gelu", seed=5)
    written = kf.write_text_encoders("sd15", [enc.state_dict()], max_positions=16)
    assert written.keys() == keymap.diffusers_to_ldm_clip(enc.state_dict(), 16).keys()
    _assert_equal(kf.read_text_encoders("sd15", written, [2])[0], enc.state_dict())


def test_openclip_inverse_map_round_trips_a_whole_clip_model():
    arch = OpenClipArch("tiny", embed_dim=12, image_size=28, patch_size=14, vision_width=16, vision_layers=2,
                        vision_heads=2, vision_mlp=32, text_width=8, text_layers=2, text_heads=2, text_mlp=16)
    g = torch.Generator().manual_seed(6)
    sd = {k: torch.randn(s, generator=g) for k, s in openclip_state_shapes(arch).items()}
    _assert_equal(transformers_to_openclip(openclip_to_transformers(sd)), sd)


# ---------------------------------------------------------------------------------------------------------
# Strictness: unknown names fail here, mappable extras and missing keys at the strict load
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2_file():
    return kf.diffusers_to_openclip_text(_clip(6, projection=True, hidden=8, seed=7).state_dict(), SD2_PREFIX)


def test_reader_names_every_unknown_key(sd2_file):
    bad = {**sd2_file, SD2_PREFIX + "transformer.resblocks.0.attn.bogus": torch.zeros(1),
           SD2_PREFIX + "visual.proj": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys under 'cond_stage_model.model.'.*: 2 "
                                         r"\('cond_stage_model.model.transformer.resblocks.0.attn.bogus', "
                                         r"'cond_stage_model.model.visual.proj'\)"):
        kf.openclip_to_diffusers_text(bad, SD2_PREFIX, 5, projection=False)
    # SDXL's encoder 2 uses every layer and its projection: only logit_scale is ignored there.
    assert kf.ignored_openclip_tensors(sd2_file, XL2_PREFIX, 5, projection=True) == {}
    assert set(kf.ignored_openclip_tensors(sd2_file, SD2_PREFIX, 5, projection=False)) == {
        SD2_PREFIX + "text_projection", *(k for k in sd2_file if ".resblocks.5." in k)}


def test_extra_and_missing_layers_fail_the_strict_load(sd2_file):
    config = CLIPTextConfig(vocab_size=64, max_position_embeddings=16, hidden_size=8, intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu")
    model = CLIPTextModel(config)
    # Six layers read as three: layer 3 is the ignored 'last', layers 4 and 5 are a depth mismatch.
    deep = kf.openclip_to_diffusers_text(sd2_file, SD2_PREFIX, 3, projection=False)
    assert "encoder.layers.3.mlp.fc1.weight" not in deep and "encoder.layers.4.mlp.fc1.weight" in deep
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*encoder\.layers\.4\."):
        model.load_state_dict(deep, strict=True)
    short = {k: v for k, v in sd2_file.items() if not k.endswith("ln_final.weight")}
    got = kf.openclip_to_diffusers_text(short, SD2_PREFIX, 5, projection=False)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*final_layer_norm\.weight"):
        CLIPTextModel(CLIPTextConfig(**{**config.to_dict(), "num_hidden_layers": 5})).load_state_dict(got, strict=True)


def test_writer_refuses_what_it_cannot_name():
    sd = _clip(1, hidden=8).state_dict()
    with pytest.raises(KeyError, match="encoder.layers.0.self_attn.rope"):
        kf.diffusers_to_openclip_text({**sd, "encoder.layers.0.self_attn.rope.weight": torch.zeros(1)}, SD2_PREFIX)
    with pytest.raises(KeyError, match=r"stacks q, k and v; the state dict has only \['k', 'v'\]"):
        kf.diffusers_to_openclip_text({k: v for k, v in sd.items() if "q_proj.weight" not in k}, SD2_PREFIX)
    with pytest.raises(ValueError, match=r"a sdxl file has 2 text encoder\(s\), got 1 state dicts"):
        kf.write_text_encoders("sdxl", [sd])


# ---------------------------------------------------------------------------------------------------------
# SDXL UNet writer (keymap.diffusers_to_ldm_unet) and the full architectures
# ---------------------------------------------------------------------------------------------------------

TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4), cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
)


def test_sdxl_unet_writer_round_trips_through_diffusers_converter():
    unet = _randomize(UNet2DConditionModel(**TINY_SDXL_UNET), seed=8)
    sd = unet.state_dict()
    ldm = keymap.diffusers_to_ldm_unet(sd, unet.config.layers_per_block)
    p = keymap.UNET_PREFIX
    assert torch.equal(ldm[p + "label_emb.0.0.weight"], sd["add_embedding.linear_1.weight"])
    assert torch.equal(ldm[p + "label_emb.0.2.bias"], sd["add_embedding.linear_2.bias"])
    assert not any(k.startswith(p + "input_blocks.1.1.") for k in ldm)  # level 0 has no attention
    assert p + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in ldm  # 2 transformer layers at level 1
    assert p + "output_blocks.2.2.conv.weight" in ldm  # the upsampler after an attention level
    assert not any(k.startswith(p + "output_blocks.8.2.") for k in ldm)  # the last level has no upsampler
    _assert_equal(keymap.ldm_to_diffusers_unet(ldm, unet.config), sd)


def test_diffusers_from_single_file_reads_our_sdxl_unet(tmp_path):
    from safetensors.torch import save_file

    unet = _randomize(UNet2DConditionModel(**TINY_SDXL_UNET), seed=9)
    unet.save_config(tmp_path / "unet")
    save_file(keymap.diffusers_to_ldm_unet(unet.state_dict(), 2), tmp_path / "model.safetensors")
    loaded = UNet2DConditionModel.from_single_file(str(tmp_path / "model.safetensors"), config=str(tmp_path),
                                                   subfolder="unet", local_files_only=True)
    _assert_equal(loaded.state_dict(), unet.state_dict())


def _published_on_meta(family: str):
    """The published architecture's UNet, VAE and text encoders from the shipped configs, on meta."""
    folder = MODELS / family
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
        texts = [(CLIPTextModelWithProjection if index[name][1].endswith("WithProjection") else CLIPTextModel)(
            CLIPTextConfig.from_pretrained(str(folder / name))) for name in ("text_encoder", "text_encoder_2")
            if name in index]
    return unet, vae, texts


@pytest.fixture(scope="module")
def published():
    """{family: (models, single-file dict)} for the three published architectures, on meta."""
    out = {}
    for family in ("sd15", "sd2", "sdxl"):
        unet, vae, texts = _published_on_meta(family)
        ldm = keymap.diffusers_to_ldm_unet(unet.state_dict(), unet.config.layers_per_block)
        ldm.update(keymap.diffusers_to_ldm_vae(vae.state_dict(), len(vae.config.up_block_types)))
        ldm.update(kf.write_text_encoders(family, [t.state_dict() for t in texts]))
        out[family] = ((unet, vae, texts), ldm)
    return out


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


_PUBLISHED_KEYS = {
    "sd2": ["output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",  # upsamplers after resnet / attention
            "input_blocks.1.1.proj_in.weight"],
    "sdxl": ["output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "label_emb.0.2.weight",
             "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
             "middle_block.1.transformer_blocks.9.ff.net.2.weight"],
}


@pytest.mark.parametrize("family, n_keys, diffusers_type", [
    ("sd2", 686 + 248 + 23 * 12 + 4, "v2"),
    # sd_xl_base_1.0.safetensors holds 2515 tensors: these and conditioner.embedders.1.model.logit_scale.
    ("sdxl", 1680 + 248 + 197 + 389, "xl_base"),
])
def test_published_architectures_round_trip(published, family, n_keys, diffusers_type):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    (unet, vae, texts), ldm = published[family]
    assert len(ldm) == n_keys
    assert {keymap.UNET_PREFIX + k for k in _PUBLISHED_KEYS[family]} <= set(ldm)
    assert infer_diffusers_model_type(ldm) == diffusers_type  # what stock from_single_file takes the file for
    assert _shapes(keymap.ldm_to_diffusers_unet(ldm, unet.config)) == _shapes(unet.state_dict())
    assert _shapes(keymap.ldm_to_diffusers_vae(ldm, vae.config)) == _shapes(vae.state_dict())
    read = kf.read_text_encoders(family, ldm, [t.config.num_hidden_layers for t in texts])
    assert [_shapes(sd) for sd in read] == [_shapes(t.state_dict()) for t in texts]


# ---------------------------------------------------------------------------------------------------------
# detect_family
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_detect_family(published, family):
    keys = list(published[family][1]) + ["model_ema.decay"]  # other top-level entries of real files are ignored
    assert kf.detect_family(keys, "m.safetensors") == family


def test_detect_family_refuses_mixed_and_partial_files(published):
    sd15, sdxl = list(published["sd15"][1]), list(published["sdxl"][1])
    unet_only = [k for k in sd15 if k.startswith(keymap.UNET_PREFIX)]
    cases = {
        # a SD1.5 file with SDXL's conditioner merged in
        r"'/x/mixed.ckpt': cannot tell .* prefixes \['cond_stage_model.transformer.', "
        r"'conditioner.embedders.0.transformer.', 'conditioner.embedders.1.model.'\]": sd15 + sdxl,
        r"'/x/mixed.ckpt': cannot tell .* prefixes none": unet_only,
        # SDXL refiner: the OpenCLIP encoder alone, as embedder 0
        r"prefixes \['conditioner.embedders.0.model.'\]": unet_only + [
            "model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"],
        r"its text encoders are sdxl's .* but its UNet lacks 'model.diffusion_model.label_emb.\*'": [
            k for k in sdxl if "label_emb" not in k],
        r"its text encoders are sd2's .* but its UNet has": list(published["sd2"][1]) + [
            "model.diffusion_model.label_emb.0.0.weight"],  # SD2 unCLIP
        r"'/x/mixed.ckpt' holds no UNet .* \['cond_stage_model', 'first_stage_model'\]": [
            k for k in sd15 if not k.startswith(keymap.UNET_PREFIX)],
    }
    for message, keys in cases.items():
        with pytest.raises(ValueError, match=message):
            kf.detect_family(keys, Path("/x/mixed.ckpt"))
