"""Stable Diffusion components: load (diffusers folder, original single file, tiny builders) and export.

    comp = load_components(cfg.model, seed=cfg.seed)   # SDComponents(unet, vae, text_encoder, tokenizer, scheduler)
    export_text_encoder(comp.text_encoder, "out/text_encoder", layout="diffusers")

Everything works offline: the SD1.5 configs and CLIP tokenizer ship in `models/sd15/`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .components import SD15_CONFIG_DIR, SDComponents
from .export import export_text_encoder, save_components, save_single_file
from .loading import load_diffusers_folder, load_scheduler, load_single_file, load_text_encoder, load_tokenizer
from .tiny import build_tiny_random

if TYPE_CHECKING:
    from ..config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "SD15_CONFIG_DIR", "SDComponents", "build_tiny_random", "export_text_encoder", "load_components",
    "load_diffusers_folder", "load_scheduler", "load_single_file", "load_text_encoder", "load_tokenizer",
    "save_components", "save_single_file",
]


def load_components(cfg: ModelConfig, seed: int = 0) -> SDComponents:
    """The SD components `cfg` names, with `cfg.text_encoder_path` (if set) replacing the text encoder.

    kind="pretrained": `cfg.path` is a diffusers folder or one original-layout .safetensors/.ckpt (SD1.5
    architecture); kind="tiny_random": `build_tiny_random(seed)`; kind="tiny_world": the shipped tiny world.
    """
    if cfg.kind == "pretrained":
        from .loading import load_pretrained

        if not cfg.path:
            raise ValueError("model.path is empty: set it to a diffusers folder or a .safetensors/.ckpt file "
                             "when model.kind='pretrained'")
        comp = load_pretrained(cfg.path)
    elif cfg.kind == "tiny_random":
        comp = build_tiny_random(seed)
    elif cfg.kind == "tiny_world":
        from ..tiny.world import load_tiny_world  # lazy: the tiny world is its own module with shipped weights

        comp = load_tiny_world()
    else:
        raise ValueError(f"model.kind must be one of 'pretrained', 'tiny_random', 'tiny_world'; got {cfg.kind!r}")
    if cfg.text_encoder_path:
        # The override must fit the base model's architecture, so its config is the base encoder's.
        comp.text_encoder = load_text_encoder(cfg.text_encoder_path, config=comp.text_encoder.config)
        logger.info("Replaced the text encoder with %s", cfg.text_encoder_path)
    return comp
