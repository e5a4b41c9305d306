"""Tiny random Stable Diffusion: the SD1.5 classes and wiring at a size a CPU test runs in milliseconds.

Same classes, same key layout rules, same tokenizer (vocab 49408, 77 positions) and scheduler as SD1.5,
so every code path (sampler, CFG, VAE decode, single-file export) is exercised; only widths and depths
shrink. The VAE has 2 levels (scale factor 2, not 8) so 32x32 images give 16x16 latents and the 2-level
UNet still sees 8x8 at its bottom: at factor 8 a 32x32 image would leave a 4x4 latent and a 2x2 bottom.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .components import SDComponents
from .loading import load_scheduler, load_tokenizer

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


def build_tiny_random(seed: int = 0) -> SDComponents:
    """Tiny random-initialised SD1.5-architecture components, identical for the same `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # fork_rng: module init draws from the global generator; this keeps the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    logger.info("Built tiny random SD components (seed %d)", seed)
    return SDComponents(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                        tokenizer=load_tokenizer(), scheduler=load_scheduler())


def build_tiny_random_kind(cfg, seed: int = 0) -> SDComponents:
    """model.kind = 'tiny_random' (registry.MODEL_KINDS): `build_tiny_random(seed)`."""
    return build_tiny_random(seed)
