"""Tiny random Stable Diffusion of each family: the real classes and wiring at a size a CPU test runs in milliseconds.

Same classes, same key layout rules, same tokenizers (vocab 49408, 77 positions) and schedulers as the family's
published model (models/families.py), so every code path (sampler, CFG, VAE decode, single-file export) is
exercised; only widths and depths shrink. SD2.x: gelu encoder, linear-projection attention, v-prediction, the "!"
padding tokenizer. SDXL: two encoders (the second with a projection) feeding a `text_time` UNet through
`SDXLConditioner`, down block 0 without attention, two transformer layers in the lower level.
The VAE has 2 levels (scale factor 2, not 8) so 32x32 images give 16x16 latents and the 2-level
UNet still sees 8x8 at its bottom: at factor 8 a 32x32 image would leave a 4x4 latent and a 2x2 bottom.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .components import SDComponents
from .families import CONFIG_DIRS
from .loading import family_tokenizer, load_scheduler, sdxl_conditioner

logger = logging.getLogger(__name__)

TINY_TEXT: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu",
    # SD1.5's ids: eos_token_id=2 selects transformers' legacy "argmax id = <|endoftext|>" pooling.
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
TINY_UNET: dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TINY_TEXT["hidden_size"], attention_head_dim=4, norm_num_groups=8,
    flip_sin_to_cos=True, freq_shift=0,
)
TINY_VAE: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, scaling_factor=0.18215,
)

# SD2.x: OpenCLIP's gelu in the encoder, linear projections in the UNet's transformers (SD2.1's config).
TINY_SD2_TEXT: dict[str, Any] = {**TINY_TEXT, "hidden_act": "gelu"}
TINY_SD2_UNET: dict[str, Any] = {**TINY_UNET, "use_linear_projection": True}
# SDXL: the context is both encoders' widths side by side; the UNet's added embedding reads the pooled embedding
# (encoder 2's projection_dim) and 6 time ids of addition_time_embed_dim each.
# Encoder 2 wider than encoder 1, as in SDXL (1280 vs 768): diffusers' single-file reader tells them apart by width.
TINY_SDXL_TEXT_2: dict[str, Any] = {**TINY_TEXT, "hidden_act": "gelu", "hidden_size": 48, "intermediate_size": 96,
                                    "projection_dim": 32}
TINY_SDXL_UNET: dict[str, Any] = dict(
    TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TINY_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 6 * 8,
)
TINY_SDXL_VAE: dict[str, Any] = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
_TINY = {"sd15": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd2": (TINY_SD2_UNET, TINY_VAE, TINY_SD2_TEXT),
         "sdxl": (TINY_SDXL_UNET, TINY_SDXL_VAE, TINY_TEXT)}


def build_tiny_random(seed: int = 0, family: str = "sd15") -> SDComponents:
    """Tiny random-initialised components of `family`'s architecture ('sd15', 'sd2', 'sdxl'), identical for the same
    `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in _TINY:
        raise ValueError(f"model.family must be one of {', '.join(_TINY)} (or 'auto') for tiny_random, got {family!r}")
    unet_config, vae_config, text_config = _TINY[family]
    # fork_rng: module init draws from the global generator; this keeps the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
        if family == "sdxl":
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2)).eval()
    encoder = sdxl_conditioner(text_encoder, text_encoder_2, unet, vae) if family == "sdxl" else text_encoder
    logger.info("Built tiny random %s components (seed %d)", family, seed)
    return SDComponents(unet=unet.eval(), vae=vae.eval(), text_encoder=encoder.eval(),
                        tokenizer=family_tokenizer(CONFIG_DIRS[family]),
                        scheduler=load_scheduler(CONFIG_DIRS[family] / "scheduler"), family=family)


def build_tiny_random_kind(cfg, seed: int = 0) -> SDComponents:
    """model.kind = 'tiny_random' (registry.MODEL_KINDS): `build_tiny_random(seed, cfg.family)` ('auto': sd15)."""
    return build_tiny_random(seed, "sd15" if cfg.family == "auto" else cfg.family)
