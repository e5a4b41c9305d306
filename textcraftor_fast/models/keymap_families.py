"""Single-file key maps for SD2.x and SDXL text encoders, and which family a single file holds.

What the original (LDM / SGM) files hold besides the UNet (``model.diffusion_model.*``) and VAE
(``first_stage_model.*``), both mapped by ``keymap.py`` for every family:

    sd15  cond_stage_model.transformer.text_model.*     CLIP ViT-L, transformers layout (keymap.py)
    sd2   cond_stage_model.model.*                      OpenCLIP ViT-H text tower, open_clip layout, 24 resblocks
    sdxl  conditioner.embedders.0.transformer.text_model.*  CLIP ViT-L, transformers layout
          conditioner.embedders.1.model.*               OpenCLIP ViT-bigG text tower, open_clip layout, 32 resblocks

The open_clip <-> transformers renaming (q/k/v stacked in ``attn.in_proj_*``; ``text_projection`` stored as the
matrix of ``x @ proj``, the transpose of an nn.Linear weight) is ``rewards/openclip_convert.py``'s, reused here.
It is tested to read exactly what diffusers' ``convert_open_clip_checkpoint`` reads; that converter is not called
directly because it is lenient where we must be strict: it drops keys it cannot place (``logit_scale``, anything
outside ``transformer.``), mangles unknown block names into garbage keys, and skips SD2's last layer only when it
is literally number 23 under ``cond_stage_model.model.``. Here a name no map knows raises; names that map but that
the model lacks (a layer too many) and keys the file lacks are left to the caller's strict load.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from torch import Tensor

from ..config import ConfigError
from ..rewards.openclip_convert import openclip_to_transformers, transformers_to_openclip
from . import keymap
from .keymap import CLIP_POSITION_IDS, UNET_PREFIX, StateDict

Family = Literal["sd15", "sd2", "sdxl"]

SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
TEXT_PREFIXES: dict[Family, tuple[str, ...]] = {
    "sd15": (keymap.CLIP_PREFIX,),
    "sd2": (SD2_OPENCLIP_PREFIX,),
    "sdxl": (SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX),
}
"""Each family's text-encoder prefixes in a single file, in encoder order (text_encoder, text_encoder_2)."""

# Keys of the projecting CLIP classes that live outside `text_model.` (CLIPTextModelWithProjection, CLIPModel).
_OUTSIDE_TEXT_MODEL = ("text_projection.weight", "logit_scale")


# ---------------------------------------------------------------------------------------------------------
# OpenCLIP text tower <-> transformers CLIPTextModel / CLIPTextModelWithProjection
# ---------------------------------------------------------------------------------------------------------

def _ignored_openclip_keys(keys: Iterable[str], num_layers: int, projection: bool) -> set[str]:
    """Keys of a published file that the diffusers model has no place for, by design.

    `logit_scale` belongs to CLIP's contrastive loss, never to a text encoder. SD2 (projection=False) conditions
    on OpenCLIP's penultimate layer, so diffusers' CLIPTextModel keeps layers 0..n-1 of the file's n+1 and no
    `text_projection`; SDXL's encoder 2 keeps every layer and the projection (its pooled output)."""
    ignored = {"logit_scale"}
    if not projection:
        last = f"transformer.resblocks.{num_layers}."
        ignored |= {"text_projection"} | {k for k in keys if k.startswith(last)}
    return ignored & set(keys)


def ignored_openclip_tensors(checkpoint: Mapping[str, Tensor], prefix: str, num_layers: int,
                             projection: bool) -> StateDict:
    """The entries under `prefix` that `openclip_to_diffusers_text` ignores, full keys and tensors: what an export
    merges back in to give a tool that wants OpenCLIP's whole tower the source file's own tensors."""
    sub = {k[len(prefix):] for k in checkpoint if k.startswith(prefix)}
    return {prefix + k: checkpoint[prefix + k] for k in sorted(_ignored_openclip_keys(sub, num_layers, projection))}


def openclip_to_diffusers_text(checkpoint: Mapping[str, Tensor], prefix: str, num_layers: int,
                               projection: bool) -> StateDict:
    """The OpenCLIP text tower under `prefix` -> the state dict of a `num_layers`-layer diffusers text encoder.

    projection=False (SD2, `SD2_OPENCLIP_PREFIX`): flattened CLIPTextModel keys (no `text_model.`, as
    `keymap.ldm_to_diffusers_clip`); the file's layer `num_layers`, `text_projection` and `logit_scale` are known
    and ignored. projection=True (SDXL encoder 2, `SDXL_OPENCLIP_PREFIX`): CLIPTextModelWithProjection keys
    (`text_model.*` and `text_projection.weight`, transposed); `logit_scale` ignored.
    Raises ValueError listing every key under `prefix` that is no part of an OpenCLIP text tower; returns {} when
    the file has nothing under `prefix`. Missing keys, and layers beyond the model's, are for the strict load."""
    sub = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    ignored = _ignored_openclip_keys(sub, num_layers, projection)
    out: StateDict = {}
    unexpected = []
    for key, value in sub.items():
        if key in ignored:
            continue
        if key.startswith("visual."):  # an image tower is a CLIP model's, not a text encoder's
            unexpected.append(prefix + key)
            continue
        try:
            out.update(openclip_to_transformers({key: value}))  # key by key, so every unknown name is reported
        except ConfigError:
            unexpected.append(prefix + key)
    if unexpected:
        shown = ", ".join(f"'{k}'" for k in sorted(unexpected)[:5])
        raise ValueError(f"unexpected keys under '{prefix}' (not an OpenCLIP text tower): {len(unexpected)} "
                         f"({shown}{', ...' if len(unexpected) > 5 else ''})")
    if not projection:
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def diffusers_to_openclip_text(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """A CLIPTextModel(/WithProjection) state dict (flattened or `text_model.` keys) -> open_clip names under
    `prefix`; the inverse of `openclip_to_diffusers_text`, raising KeyError on a key it does not know.

    Writes what the model has: for SD2 the diffusers encoder's 23 layers, without OpenCLIP's last layer,
    `text_projection` or `logit_scale`. That is all a reader of the penultimate layer needs: stock
    `StableDiffusionPipeline.from_single_file` finds the OpenCLIP encoder by `cond_stage_model.model.
    token_embedding.weight`, builds the 23-layer encoder from `config=` (a diffusers folder such as models/sd2;
    without it, from the hub's stable-diffusion-2-1, chosen by the UNet's 1024-wide `attn2.to_k`) and loads the
    keys present; the original SD2 code loads with strict=False and stops before the last layer. Tools that build
    the whole 24-layer tower (ComfyUI) warn "clip missing" for layer 23 (Nerogar/OneTrainer#915) though they do
    not use it either; to silence them, merge in the source file's `ignored_openclip_tensors`. A `logit_scale` in
    `state_dict` is written through (published SDXL files carry `conditioner.embedders.1.model.logit_scale`,
    4.6055, which some tools check for)."""
    sd = {}
    for key, value in state_dict.items():
        if key.endswith(CLIP_POSITION_IDS):  # a buffer; open_clip has no position ids
            continue
        sd[key if key.startswith("text_model.") or key in _OUTSIDE_TEXT_MODEL else "text_model." + key] = value
    try:
        return {prefix + k: v for k, v in transformers_to_openclip(sd).items()}
    except ConfigError as e:
        raise KeyError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# All text encoders of a family
# ---------------------------------------------------------------------------------------------------------

def read_text_encoders(family: Family, checkpoint: Mapping[str, Tensor], num_layers: Sequence[int]) -> list[StateDict]:
    """A single file's text encoders as diffusers state dicts, in `TEXT_PREFIXES[family]` order; `num_layers` are
    the diffusers encoders' depths (config.num_hidden_layers), one per encoder."""
    if len(num_layers) != len(TEXT_PREFIXES[family]):
        raise ValueError(f"a {family} file has {len(TEXT_PREFIXES[family])} text encoder(s), got num_layers="
                         f"{list(num_layers)}")
    if family == "sd15":
        return [keymap.ldm_to_diffusers_clip(checkpoint)]
    if family == "sd2":
        return [openclip_to_diffusers_text(checkpoint, SD2_OPENCLIP_PREFIX, num_layers[0], projection=False)]
    return [keymap.ldm_to_diffusers_clip(checkpoint, SDXL_CLIP_PREFIX),
            openclip_to_diffusers_text(checkpoint, SDXL_OPENCLIP_PREFIX, num_layers[1], projection=True)]


def write_text_encoders(family: Family, state_dicts: Sequence[Mapping[str, Tensor]],
                        max_positions: int = 77) -> StateDict:
    """The inverse of `read_text_encoders`: diffusers text-encoder state dicts -> one original-layout dict."""
    if len(state_dicts) != len(TEXT_PREFIXES[family]):
        raise ValueError(f"a {family} file has {len(TEXT_PREFIXES[family])} text encoder(s), got "
                         f"{len(state_dicts)} state dicts")
    if family == "sd15":
        return keymap.diffusers_to_ldm_clip(state_dicts[0], max_positions)
    if family == "sd2":
        return diffusers_to_openclip_text(state_dicts[0], SD2_OPENCLIP_PREFIX)
    return {**keymap.diffusers_to_ldm_clip(state_dicts[0], max_positions, SDXL_CLIP_PREFIX),
            **diffusers_to_openclip_text(state_dicts[1], SDXL_OPENCLIP_PREFIX)}


# ---------------------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------------------

# cond_stage_model.<module>. (LDM) or conditioner.embedders.<i>.<module>. (SGM)
_TEXT_PREFIX = re.compile(r"^(cond_stage_model\.[^.]+\.|conditioner\.embedders\.\d+\.[^.]+\.)")
# The UNet's added embedding: SDXL's pooled text + time ids. SD1.x/SD2.x text-to-image UNets have none.
_LABEL_EMB = UNET_PREFIX + "label_emb."


def detect_family(keys: Iterable[str], source: object) -> Family:
    """'sd15', 'sd2' or 'sdxl' from a single file's keys (already unwrapped from any `state_dict` entry), by its
    text-encoder prefixes (`TEXT_PREFIXES`, all of one family and nothing else), checked against the UNet's
    `label_emb` (SDXL's only). ValueError naming `source` and what was found otherwise, or with no UNet."""
    keys = list(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        tops = sorted({k.split(".")[0] for k in keys})
        raise ValueError(f"'{source}' holds no UNet (no key starts with '{UNET_PREFIX}'; top-level names found: "
                         f"{tops[:10]}): not a Stable Diffusion single file")
    found = tuple(sorted({m.group(1) for k in keys if (m := _TEXT_PREFIX.match(k))}))
    expected = "; ".join(f"{f}: {', '.join(p)}" for f, p in TEXT_PREFIXES.items())
    matches = [f for f, prefixes in TEXT_PREFIXES.items() if found == tuple(sorted(prefixes))]
    if not matches:
        raise ValueError(f"'{source}': cannot tell the model family from its text-encoder prefixes "
                         f"{list(found) or 'none'}; a single file holds exactly one family's set ({expected})")
    family = matches[0]
    has_label_emb = any(k.startswith(_LABEL_EMB) for k in keys)
    if has_label_emb != (family == "sdxl"):
        raise ValueError(f"'{source}': its text encoders are {family}'s ({', '.join(found)}) but its UNet "
                         f"{'has' if has_label_emb else 'lacks'} '{_LABEL_EMB}*', which only SDXL's has: a mixed "
                         "or unsupported model (SD2 unCLIP / upscaler, SDXL refiner)")
    return family
