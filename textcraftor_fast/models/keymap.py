"""State-dict key mapping between diffusers/transformers models and the original SD1.5 single-file layout.

The original (CompVis/LDM) checkpoint holds the whole model in one flat dict:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). SDXL files share the UNet and VAE layouts (its
UNet adds ``label_emb``) and hold the same CLIP layout under another prefix; SD2.x/SDXL's OpenCLIP encoders and
family detection are in ``keymap_families.py``.

Reading uses diffusers' own converters (``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``,
what ``from_single_file`` runs) so we read exactly what diffusers reads; they are called directly because
``from_single_file`` loads with ``strict=False`` and would silently keep random weights for missing keys.
Writing is the inverse, written here; it raises on any key it does not know rather than guessing, and the
tests check that diffusers' converters map its output back to the identical state dict.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
# transformers < 5.6 keys carry "text_model."; newer CLIPTextModel is flattened and does not.
CLIP_TEXT_PREFIX = CLIP_PREFIX + "text_model."
# A non-persistent buffer in transformers, but present in the original SD1.5 files.
CLIP_POSITION_IDS = "embeddings.position_ids"

StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------------
# original -> diffusers (reading)
# ---------------------------------------------------------------------------------------------------------


def ldm_to_diffusers_unet(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(k.startswith(UNET_PREFIX) for k in checkpoint):
        return {}
    out = convert_ldm_unet_checkpoint(dict(checkpoint), dict(config))
    # diffusers' converter uses dict.get, so a key absent from the file comes back as None: treat as missing.
    return {k: v for k, v in out.items() if v is not None}


def ldm_to_diffusers_vae(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # Only our prefix: diffusers would also accept "vae." and, with no prefix found, every key in the file.
    vae_only = {k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
    if not vae_only:
        return {}
    out = convert_ldm_vae_checkpoint(vae_only, dict(config))
    return {k: v for k, v in out.items() if v is not None}


def ldm_to_diffusers_clip(checkpoint: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> StateDict:
    """`<prefix>text_model.*` -> flattened CLIPTextModel keys (no `text_model.`); `prefix` is SD1.5's by default
    (SDXL's encoder 1: `keymap_families.SDXL_CLIP_PREFIX`)."""
    out = {}
    for key, value in checkpoint.items():
        if key.startswith(prefix):
            short = key[len(prefix):].removeprefix("text_model.")
            if short != CLIP_POSITION_IDS:
                out[short] = value
    return out


def clip_state_dict_any_layout(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A text-encoder state dict in the original layout, transformers < 5.6 (`text_model.*`) or >= 5.6 layout."""
    if any(k.startswith(CLIP_PREFIX) for k in state_dict):
        return ldm_to_diffusers_clip(state_dict)
    out = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out.pop(CLIP_POSITION_IDS, None)
    return out


# ---------------------------------------------------------------------------------------------------------
# diffusers -> original (writing)
# ---------------------------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # SDXL's pooled-text + time-ids embedding (addition_embed_type "text_time"): the original's `label_emb`
    # Sequential(Sequential(Linear, SiLU, Linear)), as diffusers' DIFFUSERS_TO_LDM_MAPPING names it.
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_TOP = {
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
    "encoder.conv_in.": "encoder.conv_in.",
    "encoder.conv_out.": "encoder.conv_out.",
    "decoder.conv_in.": "decoder.conv_in.",
    "decoder.conv_out.": "decoder.conv_out.",
    "quant_conv.": "quant_conv.",
    "post_quant_conv.": "post_quant_conv.",
}
_VAE_RESNET = {"norm1.": "norm1.", "conv1.": "conv1.", "norm2.": "norm2.", "conv2.": "conv2.",
               "conv_shortcut.": "nin_shortcut."}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}

_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_head(rest: str, table: Mapping[str, str], key: str) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(f"no original-layout name known for '{key}' (expected it to start with one of {list(table)})")


def _unet_key(key: str, per_block: int, up_with_attn: set[int]) -> str:
    """One diffusers UNet key -> its LDM name. `per_block` = layers_per_block + 1 LDM blocks per level."""
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := _UNET_BLOCK.fullmatch(key):
        side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            first = 1 + level * per_block  # input_blocks.0 is conv_in
            if kind == "resnets":
                return f"input_blocks.{first + j}.0." + _rename_head(rest, _UNET_RESNET, key)
            if kind == "attentions":
                return f"input_blocks.{first + j}.1.{rest}"
            if kind == "downsamplers":
                return f"input_blocks.{first + per_block - 1}.0.op." + rest.removeprefix("conv.")
        else:
            first = level * per_block
            if kind == "resnets":
                return f"output_blocks.{first + j}.0." + _rename_head(rest, _UNET_RESNET, key)
            if kind == "attentions":
                return f"output_blocks.{first + j}.1.{rest}"
            if kind == "upsamplers":
                # The upsampler follows the resnet (slot 1), or the attention when the level has one (slot 2).
                slot = 2 if level in up_with_attn else 1
                return f"output_blocks.{first + per_block - 1}.{slot}.{rest}"
    if m := _UNET_MID.fullmatch(key):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * j}." + _rename_head(rest, _UNET_RESNET, key)
        return f"middle_block.{2 * j + 1}.{rest}"
    raise KeyError(f"no original-layout name known for UNet key '{key}'")


def diffusers_to_ldm_unet(state_dict: Mapping[str, torch.Tensor], layers_per_block: int) -> StateDict:
    if not isinstance(layers_per_block, int):
        raise ValueError(f"the single-file layout needs one int layers_per_block, got {layers_per_block!r}")
    up_with_attn = {int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {UNET_PREFIX + _unet_key(k, layers_per_block + 1, up_with_attn): v for k, v in state_dict.items()}


def _vae_key(key: str, num_up: int) -> tuple[str, bool]:
    """One diffusers VAE key -> (LDM name, whether the weight is a 1x1 conv in the original)."""
    for old, new in _VAE_TOP.items():
        if key.startswith(old):
            return new + key[len(old):], False
    if m := _VAE_BLOCK.fullmatch(key):
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "encoder.down":
            if kind == "resnets":
                return f"encoder.down.{i}.block.{j}." + _rename_head(rest, _VAE_RESNET, key), False
            if kind == "downsamplers":
                return f"encoder.down.{i}.downsample.{rest}", False
        else:
            level = num_up - 1 - i  # the original numbers decoder levels from the lowest resolution up
            if kind == "resnets":
                return f"decoder.up.{level}.block.{j}." + _rename_head(rest, _VAE_RESNET, key), False
            if kind == "upsamplers":
                return f"decoder.up.{level}.upsample.{rest}", False
    if m := _VAE_MID.fullmatch(key):
        side, kind, j, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}." + _rename_head(rest, _VAE_RESNET, key), False
        if j == 0:
            name = _rename_head(rest, _VAE_ATTN, key)
            return f"{side}.mid.attn_1.{name}", name.endswith("weight") and not name.startswith("norm.")
    raise KeyError(f"no original-layout name known for VAE key '{key}'")


def diffusers_to_ldm_vae(state_dict: Mapping[str, torch.Tensor], num_up_blocks: int) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        name, is_conv1x1 = _vae_key(key, num_up_blocks)
        # The original attention projections are 1x1 convs: (C, C, 1, 1); diffusers uses Linear (C, C).
        out[VAE_PREFIX + name] = value[:, :, None, None] if is_conv1x1 and value.ndim == 2 else value
    return out


def diffusers_to_ldm_clip(state_dict: Mapping[str, torch.Tensor], max_positions: int,
                          prefix: str = CLIP_PREFIX) -> StateDict:
    text_prefix = prefix + "text_model."
    out = {text_prefix + k.removeprefix("text_model."): v for k, v in state_dict.items()}
    # Written for fidelity with the original files (older loaders expect it); readers here drop it.
    out[text_prefix + CLIP_POSITION_IDS] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out
