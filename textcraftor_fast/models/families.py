"""Model families: SD1.5, SD2.x and SDXL, what tells them apart, and where their shipped configs live.

    sd15  one CLIP ViT-L encoder (768-d, last hidden state), epsilon, 512 px
    sd2   one OpenCLIP ViT-H encoder as a 23-layer CLIPTextModel (1024-d), v-prediction at 768 px (SD2.1;
          SD2.1-base: epsilon at 512 px, the same keys)
    sdxl  CLIP ViT-L + OpenCLIP ViT-bigG (models/conditioner.py), pooled embedding and time ids, 1024 px

A diffusers folder says its family in model_index.json (the pipeline class, text_encoder_2) and its text encoder's
activation; a single file in its key prefixes (models/keymap_families.py: `detect_family`).
"""
from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("sd15", "sd2", "sdxl")
CONFIG_DIRS = {family: Path(__file__).parent / family for family in FAMILIES}
"""Hand-written configs of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0, with their tokenizers: loading needs no hub."""
# OpenAI's CLIP (SD1.x) uses quick_gelu, OpenCLIP (SD2.x) gelu: true of the published and the tiny models alike,
# where widths tell nothing.
_SD_ACTIVATIONS = {"quick_gelu": "sd15", "gelu": "sd2"}


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder, from its model_index.json (and text_encoder/config.json's hidden_act)."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"'{index_path}' is not a readable model_index.json ({e})") from None
    cls = index.get("_class_name", "")
    if cls.startswith("StableDiffusionXL") or "text_encoder_2" in index:
        return "sdxl"
    if cls.startswith("StableDiffusion") and "text_encoder" in index:
        try:
            act = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_act"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"'{folder}': cannot read text_encoder/config.json's hidden_act to tell SD1.x from "
                             f"SD2.x ({e})") from None
        if act in _SD_ACTIVATIONS:
            return _SD_ACTIVATIONS[act]
        raise ValueError(f"'{folder}': a {cls} whose text encoder's activation is {act!r}; expected 'quick_gelu' "
                         "(SD1.x, OpenAI CLIP) or 'gelu' (SD2.x, OpenCLIP)")
    raise ValueError(f"'{folder}': model_index.json names pipeline class {cls!r}; expected StableDiffusionPipeline "
                     "(SD1.x, SD2.x) or StableDiffusionXLPipeline (SDXL)")


def check_family(wanted: str, found: str, source: object) -> str:
    """`found`, when model.family is 'auto' or names it; otherwise a ValueError naming both."""
    if wanted not in ("auto", found):
        raise ValueError(f"model.family is {wanted!r} but '{source}' holds a {found} model: set model.family="
                         f"'{found}' (or 'auto')")
    return found
