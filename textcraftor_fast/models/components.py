"""The bundle of Stable Diffusion parts the engine trains with, and where the shipped SD1.5 configs live."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..memory.host_heap import release_freed_host_memory
from .families import CONFIG_DIRS

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

SD15_CONFIG_DIR = CONFIG_DIRS["sd15"]
"""Hand-written runwayml/stable-diffusion-v1-5 configs + the converted OpenAI CLIP tokenizer (no hub needed)."""

COMPONENT_NAMES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The sub-folders of an SD1.x / SD2.x diffusers folder; SDXL's add text_encoder_2/ and tokenizer_2/."""


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    """The module the UNet's conditioning comes from: a CLIPTextModel (SD1.x, SD2.x), or SDXL's two encoders as one
    `SDXLConditioner` (models/conditioner.py; .text_encoder and .text_encoder_2)."""
    tokenizer: PreTrainedTokenizerBase
    """A CLIP tokenizer (any transformers tokenizer with `model_max_length`); SDXL: a `PairTokenizer` of both."""
    scheduler: DDIMScheduler
    """Built from the model's scheduler config (SD1.5: scaled_linear betas 0.00085..0.012, 1000 steps)."""
    base_text_encoder: CLIPTextModel | None = None
    """The model's own text encoder when model.text_encoder_path replaced `text_encoder` (loaders.load_components);
    the UNet stage conditions its unconditional and early-step embeddings on it, as evaluation and generate do."""
    family: str = "sd15"
    """'sd15', 'sd2' or 'sdxl' (models/families.py)."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side: 8 for SD1.5, smaller for the tiny models (same rule as diffusers)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def drop_vae_encoder(vae: AutoencoderKL) -> int:
    """Free the VAE's encoder half (encoder + quant_conv) in place; returns the parameter bytes freed.

    Why: reward fine-tuning only ever decodes (no paired images), and the SD1.5 encoder is 34M parameters,
    0.13 GiB in fp32 held for nothing. `vae.encode` raises afterwards; `vae.decode` is unchanged."""
    freed = 0
    for name in ("encoder", "quant_conv"):
        part = getattr(vae, name, None)
        if part is not None:
            freed += sum(p.numel() * p.element_size() for p in part.parameters())
            setattr(vae, name, None)
    release_freed_host_memory()
    return freed
