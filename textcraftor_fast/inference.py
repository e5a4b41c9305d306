"""Generation with a tuned text encoder: switch step, embedding interpolation and style mixing.

The tuned encoder is a drop-in replacement. Following the paper, the ORIGINAL encoder conditions the
first `switch_step` steps (layout) and the tuned one the rest (style/detail); its embedding can be
interpolated with the original, e = w * e_tuned + (1 - w) * e_original, or several tuned encoders mixed
with weights (style mixing).

Sample i starts from its own noise, `torch.Generator().manual_seed(seed + i)` on the CPU: an image depends on
its seed only (not on the batch size, its batch or the device), and stock diffusers reproduces it given
`generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]` (tests/models/test_export_stock_diffusers.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .models.text import encode_prompts
from .sampler import DDIMSchedule, Embeddings, make_schedule, sample_images

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOptions:
    num_steps: int = 25
    guidance_scale: float = 7.5
    switch_step: int = 10
    """Steps before this use the original encoder (paper: 10 of 25); 0 uses the tuned encoder throughout."""
    weight: float = 1.0
    """Interpolation w: e = w * e_tuned + (1 - w) * e_original."""
    seed: int = 0
    """Sample i's noise seed is seed + i."""
    batch_size: int = 4
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    """DDIM timesteps, as sampler.timestep_spacing: the spacing the encoder was tuned with."""


def mix_embeddings(base: Tensor, tuned: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """base + sum_i w_i (tuned_i - base): w=1 for one encoder is the tuned embedding, w in (0,1) interpolates,
    several encoders with weights summing to 1 is the paper's style mixing.

    Computed as (1 - sum w) base + sum w_i tuned_i so that the endpoints are exact: w = 1 gives the tuned
    embedding bit for bit (base + (tuned - base) is off by a rounding, 6e-6 in the tiny world's images
    against stock diffusers run on the tuned encoder), w = 0 the base.
    """
    out = (1.0 - sum(weights)) * base
    for e, w in zip(tuned, weights):
        out = out + w * e
    return out


@torch.no_grad()
def conditioning(original: nn.Module, tuned: Sequence[nn.Module], weights: Sequence[float], tokenizer,
                 prompts: list[str], mix_uncond: bool = True) -> tuple[Embeddings, Embeddings | None]:
    """(frozen, mixed): the original encoder's embeddings of `prompts` (and of ""), and the tuned encoders' mixed
    into them, `mix_embeddings(original, tuned, weights)` (None without tuned encoders). The unconditional embedding
    is mixed when `mix_uncond` (evaluation mixes it only where training tuned it: sampler.train_uncond)."""
    frozen = Embeddings(encode_prompts(original, tokenizer, prompts), encode_prompts(original, tokenizer, [""]))
    if not tuned:
        return frozen, None
    cond = mix_embeddings(frozen.cond, [encode_prompts(e, tokenizer, prompts) for e in tuned], weights)
    uncond = (mix_embeddings(frozen.uncond, [encode_prompts(e, tokenizer, [""]) for e in tuned], weights)
              if mix_uncond else frozen.uncond)
    return frozen, Embeddings(cond, uncond)


def generate_images(unet: nn.Module, vae: nn.Module, tokenizer, schedule: DDIMSchedule, original: nn.Module,
                    tuned: Sequence[nn.Module], weights: Sequence[float], prompts: list[str],
                    opts: GenerateOptions, latent_shape: tuple[int, int, int],
                    device: torch.device) -> Tensor:
    """Images in [0, 1] (N, 3, H, W) on the CPU; image i starts from seed + i's noise whatever the encoders and
    batching. The noise is drawn on the CPU, one generator per image, as diffusers' `randn_tensor` does for a list
    of CPU generators: the stock pipeline draws the same numbers, on any device."""
    from tqdm.auto import tqdm

    images = []
    # disable=None: a bar on a terminal, silent in logs and under pytest.
    for start in tqdm(range(0, len(prompts), opts.batch_size), desc="generate", unit="batch", disable=None,
                      leave=False):
        batch = prompts[start:start + opts.batch_size]
        frozen, mixed = conditioning(original, tuned, weights, tokenizer, batch)
        seeds = range(opts.seed + start, opts.seed + start + len(batch))
        images.append(sample_images(unet, vae, schedule, seeds, latent_shape, frozen, mixed, opts.guidance_scale,
                                    opts.switch_step).cpu())
    return torch.cat(images)


GRID_NAME = "grid.png"


def generate(model: ModelConfig, prompts: list[str], out_dir: str | Path, text_encoders: Sequence[str] = (),
             weights: Sequence[float] | None = None, opts: GenerateOptions = GenerateOptions(),
             device: str = "auto", grid: bool = False, unet: str | None = None) -> list[Path]:
    """Generate one PNG per prompt with the tuned encoder(s) mixed into the original; returns the paths.

    `unet`: a tuned UNet (UNet stage: a LoRA folder, a UNet folder or a run holding unet_lora/ or unet/) in place
    of the model's, for every step. Each PNG carries its settings as text chunks (`image_settings`); `grid` also writes all images on one
    labelled contact sheet, `out_dir / GRID_NAME`.
    """
    from .models.loading import load_components
    from .models import load_text_encoder
    from .models.lora import load_unet

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    comp = load_components(model, seed=0)
    original = comp.text_encoder.to(dev).eval()
    tuned = [load_text_encoder(p, config=original.config, base=original).to(dev).eval() for p in text_encoders]
    if weights is None:
        weights = [opts.weight / max(len(tuned), 1)] * len(tuned)
    if len(weights) != len(tuned):
        raise ValueError(f"{len(tuned)} tuned encoders but {len(weights)} weights; give one weight per encoder")
    schedule = make_schedule(comp.scheduler.config, opts.num_steps, timestep_spacing=opts.timestep_spacing)
    side = model.resolution // comp.vae_scale_factor
    shape = (comp.unet.config.in_channels, side, side)
    sampler_unet = load_unet(unet, comp.unet) if unet else comp.unet
    images = generate_images(sampler_unet.to(dev).eval(), comp.vae.to(dev).eval(), comp.tokenizer, schedule, original,
                             tuned, weights, prompts, opts, shape, dev)
    settings = [image_settings(model, prompt, i, opts, text_encoders, weights, unet) for i, prompt in enumerate(prompts)]
    return _write_images(images, settings, Path(out_dir), grid)


def image_settings(model: ModelConfig, prompt: str, index: int, opts: GenerateOptions,
                   text_encoders: Sequence[str], weights: Sequence[float], unet: str | None = None) -> dict[str, Any]:
    """What a PNG records: enough to regenerate it alone (`--seed <seed>` with this one prompt)."""
    from ._version import __version__
    from .models.encoder_lora import resolved_spec

    tuned_unet = {"unet": str(Path(unet).resolve())} if unet else {}  # only when given: older PNGs read the same
    return {
        "prompt": prompt,
        "seed": opts.seed + index,
        "steps": opts.num_steps,
        "guidance_scale": opts.guidance_scale,
        "switch_step": opts.switch_step,
        "timestep_spacing": opts.timestep_spacing,
        "weights": [float(w) for w in weights],
        "text_encoders": [resolved_spec(str(p)) for p in text_encoders],  # a LoRA stack keeps its scales
        "model": str(Path(model.path).resolve()) if model.kind == "pretrained" else model.kind,
        # The "original" encoder is this one when model.text_encoder_path replaced the model's own.
        "original_text_encoder": str(Path(model.text_encoder_path).resolve()) if model.text_encoder_path else "",
        "resolution": model.resolution,
        **tuned_unet,
        "software": f"textcraftor_fast {__version__}",
    }


def _write_images(images: Tensor, settings: list[dict[str, Any]], out: Path, grid: bool) -> list[Path]:
    from .reporting.images import contact_sheet, save_png, to_pil

    out.mkdir(parents=True, exist_ok=True)
    pils = [to_pil(img) for img in images]
    paths = []
    for i, (pil, meta) in enumerate(zip(pils, settings)):
        slug = "".join(c if c.isalnum() else "_" for c in meta["prompt"])[:40]
        paths.append(save_png(pil, out / f"{i:04d}_{slug}.png", meta))
    logger.info("Wrote %d images to %s", len(paths), out)
    if grid:
        contact_sheet(pils, [meta["prompt"] for meta in settings]).save(out / GRID_NAME)
        logger.info("Wrote the contact sheet %s", out / GRID_NAME)
    return paths


__all__ = ["GRID_NAME", "GenerateOptions", "conditioning", "generate", "generate_images", "image_settings",
           "mix_embeddings"]
