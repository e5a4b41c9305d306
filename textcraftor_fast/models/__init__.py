"""Stable Diffusion components: load (diffusers folder, original single file, tiny builders) and export.

    comp = load_diffusers_folder("path/to/sd15")   # SDComponents(unet, vae, text_encoder, tokenizer, scheduler)
    export_text_encoder(comp.text_encoder, "out/text_encoder", layout="diffusers")

Everything works offline: the SD1.5, SD2.1 and SDXL configs and tokenizers ship in `models/sd15/`, `models/sd2/`
and `models/sdxl/` (models/families.py; SDXL's two encoders are one `SDXLConditioner`, models/conditioner.py).
`load_components`
dispatches over `model.kind` through `registry.MODEL_KINDS` (a plugin's kinds, the tiny world's among them).
"""
from __future__ import annotations

from .components import SD15_CONFIG_DIR, SDComponents
from .export import LAYOUTS, export_text_encoder, export_tuned, save_components, save_single_file
from .loading import (load_components, load_diffusers_folder, load_scheduler, load_single_file, load_text_encoder,
                      load_tokenizer, load_tuned_encoder)
from .tiny_random import build_tiny_random

__all__ = [
    "LAYOUTS", "SD15_CONFIG_DIR", "SDComponents", "build_tiny_random", "export_text_encoder", "export_tuned",
    "load_components",
    "load_diffusers_folder", "load_scheduler", "load_single_file", "load_text_encoder", "load_tokenizer",
    "load_tuned_encoder",
    "save_components", "save_single_file",
]
