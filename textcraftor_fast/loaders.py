"""`load_components`: the one dispatch over `model.kind`, a layer above `models/` (SD loading) and `tiny/`
(the embedded demo world), so that neither imports the other's dispatch and the import graph has no circle:
`loaders -> models`, `loaders -> tiny.world -> models`.

    comp = load_components(cfg.model, seed=cfg.seed)   # SDComponents(unet, vae, text_encoder, tokenizer, scheduler)
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .models import SDComponents, build_tiny_random, load_text_encoder

if TYPE_CHECKING:
    from .config import ModelConfig

logger = logging.getLogger(__name__)


def load_components(cfg: ModelConfig, seed: int = 0) -> SDComponents:
    """The SD components `cfg` names, with `cfg.text_encoder_path` (if set) replacing the text encoder.

    kind="pretrained": `cfg.path` is a diffusers folder or one original-layout .safetensors/.ckpt (SD1.5
    architecture); kind="tiny_random": `build_tiny_random(seed)`; kind="tiny_world": the shipped tiny world.
    """
    if cfg.kind == "pretrained":
        from .models.loading import load_pretrained

        if not cfg.path:
            raise ValueError("model.path is empty: set it to a diffusers folder or a .safetensors/.ckpt file "
                             "when model.kind='pretrained'")
        comp = load_pretrained(cfg.path)
    elif cfg.kind == "tiny_random":
        comp = build_tiny_random(seed)
    elif cfg.kind == "tiny_world":
        from .tiny.world import load_tiny_world  # lazy: the demo world's weights load only when asked for

        comp = load_tiny_world()
    else:
        raise ValueError(f"model.kind must be one of 'pretrained', 'tiny_random', 'tiny_world'; got {cfg.kind!r}")
    if cfg.text_encoder_path:
        # The override must fit the base model's architecture, so its config is the base encoder's.
        comp.base_text_encoder = comp.text_encoder
        comp.text_encoder = load_text_encoder(cfg.text_encoder_path, config=comp.text_encoder.config)
        logger.info("Replaced the text encoder with %s", cfg.text_encoder_path)
    return comp
