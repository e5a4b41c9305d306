"""Architectures of the tiny world: the SD1.5 classes (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
DDIMScheduler) at toy widths, and the judge CNN that scores colour / shape / size / background.

Sizes were chosen from measurements on 2 CPU cores (see docs/tiny_world.md): a (32, 32) VAE without
mid-block attention reconstructs these images almost perfectly in a few minutes; a (32, 64) UNet with
cross-attention only at 8x8 costs about half of one with cross-attention at 16x16 too.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import ATTRIBUTES, IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 2  # the VAE downsamples once: 32x32x3 -> 16x16x4
TEXT_WIDTH = 64


def vae_config(scaling_factor: float = 1.0) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False, scaling_factor=scaling_factor,
    )


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
    )


def text_config(vocab_size: int, bos_id: int, eos_id: int, max_length: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
        hidden_act="quick_gelu", bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        projection_dim=TEXT_WIDTH,
    )


def scheduler_config() -> dict:
    """SD1.5's noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="trailing",
    )


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(scaling_factor))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                       tokenizer.model_max_length))
    return CLIPTextModel(cfg)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config())


class Judge(nn.Module):
    """A small CNN with one classification head per attribute; input: images in [0, 1], (B, 3, 32, 32).

    Four conv blocks down to 4x4, then mean AND max pooling (max keeps corners and tips, which global
    averaging washes out: a mean-pooled 3-block version stayed at chance on shape). Trained on clean
    drawings and on the tiny VAE's reconstructions of them, so it reads decoded images.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(
            block(3, w), nn.AvgPool2d(2),              # (B, w, 16, 16)
            block(w, 2 * w), nn.AvgPool2d(2),          # (B, 2w, 8, 8)
            block(2 * w, 4 * w), nn.AvgPool2d(2),      # (B, 4w, 4, 4)
            block(4 * w, 4 * w),                       # (B, 4w, 4, 4)
        )
        self.heads = nn.ModuleDict({a: nn.Linear(8 * w, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """attribute -> logits (B, n_classes)."""
        h = self.features(images * 2.0 - 1.0)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)  # (B, 8w)
        return {a: head(h) for a, head in self.heads.items()}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def latent_stats(vae, images: Tensor) -> float:
    """Std of the VAE's latent means over `images`: SD's scaling_factor is 1 / this."""
    return vae.encode(images * 2 - 1).latent_dist.mean.std().item()


def read_judge(folder: Path) -> Judge:
    """The judge saved in `folder` (config.json + model.safetensors), frozen."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    judge = Judge(width=cfg["width"])
    judge.load_state_dict(load_file(str(folder / "model.safetensors")))
    return judge.eval().requires_grad_(False)
