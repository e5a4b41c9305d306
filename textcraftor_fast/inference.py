"""Generation with a tuned text encoder: switch step, embedding interpolation and style mixing.

The tuned encoder is a drop-in replacement: by default (switch step 0) it conditions every step, as in a pipeline
`export` wrote. The paper's inference option is a late switch: the ORIGINAL encoder conditions the first
`switch_step` steps (layout) and the tuned one the rest (style/detail), given as a step or as a fraction of the steps
(`resolve_switch_step`). The tuned embedding can be interpolated with the original, e = w * e_tuned + (1 - w) *
e_original, or several tuned encoders mixed with weights (style mixing).

`generate` and `evaluate` share that default; the config's `sampler.switch_step` is the training chain's (where the
trainable embeddings enter it, num_steps - K when unset) and is not read here.

Sample i starts from its own noise, `torch.Generator().manual_seed(seed + i)` on the CPU: an image depends on
its seed only (not on the batch size, its batch or the device), and stock diffusers reproduces it given
`generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]` (tests/models/test_export_stock_diffusers.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .models.text import encode_empty_prompt, encode_prompts
from .sampler import DDIMSchedule, Embeddings, make_schedule, sample_images

logger = logging.getLogger(__name__)


DEFAULT_SWITCH_STEP = 0
"""generate's and evaluate's switch step: the tuned encoder at every step, as an exported pipeline uses it."""


def resolve_switch_step(switch_step: int | float, num_steps: int) -> int:
    """The step from which the tuned encoder conditions, in 0..num_steps - 1 (steps before it use the original).

    An integer is that step. A float in [0, 1) is a fraction of the steps, rounded down: step floor(f * num_steps),
    so the original encoder conditions at most the fraction f of the steps (0.4 of 25 is step 10, the paper's; 0.4
    of 10 is step 4; 0.25 of 10 is step 2). The float's decimal form is used, so 0.29 of 100 is 29, not 28.
    Anything else, and an integer outside 0..num_steps - 1, is a ValueError naming the valid range."""
    steps = f"0..{num_steps - 1}" if num_steps > 1 else "0"
    fix = (f"give a step in {steps} (0: the tuned encoder at every step) or a fraction of the steps in [0, 1) "
           "such as 0.4")
    if isinstance(switch_step, numbers.Integral) and not isinstance(switch_step, bool):
        if not 0 <= switch_step < num_steps:
            raise ValueError(f"switch step {switch_step} is outside {steps} for {num_steps} DDIM steps: {fix}")
        return int(switch_step)
    if isinstance(switch_step, numbers.Real) and not isinstance(switch_step, bool):
        if not 0.0 <= switch_step < 1.0:  # NaN fails too
            raise ValueError(f"switch step {switch_step!r} is a fraction of the steps outside [0, 1): {fix}")
        return math.floor(Fraction(repr(float(switch_step))) * num_steps)
    raise ValueError(f"switch step {switch_step!r} is neither a step nor a fraction: {fix}")


def describe_switch(switch_step: int, num_steps: int) -> str:
    """Which encoder conditions which steps, for logs: 'the tuned encoder at every step of 10 (switch step 0)'."""
    if switch_step == 0:
        return f"the tuned encoder at every step of {num_steps} (switch step 0)"
    return (f"the original encoder for steps 0..{switch_step - 1} and the tuned one for steps {switch_step}.."
            f"{num_steps - 1} of {num_steps} (switch step {switch_step})")


@dataclass(frozen=True)
class GenerateOptions:
    num_steps: int = 25
    guidance_scale: float = 7.5
    switch_step: int | float = DEFAULT_SWITCH_STEP
    """The tuned encoder conditions steps from this one on, the original the steps before (`resolve_switch_step`):
    0 (default) is a drop-in replacement, the tuned encoder at every step; the paper's late switch is step 10 of
    25, or 0.4 as a fraction of the steps (rounded down). An integer >= num_steps is an error."""
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
    frozen = Embeddings(encode_prompts(original, tokenizer, prompts), encode_empty_prompt(original, tokenizer))
    if not tuned:
        return frozen, None
    cond = mix_embeddings(frozen.cond, [encode_prompts(e, tokenizer, prompts) for e in tuned], weights)
    uncond = (mix_embeddings(frozen.uncond, [encode_empty_prompt(e, tokenizer) for e in tuned], weights)
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

    switch = resolve_switch_step(opts.switch_step, opts.num_steps)
    images = []
    # disable=None: a bar on a terminal, silent in logs and under pytest.
    for start in tqdm(range(0, len(prompts), opts.batch_size), desc="generate", unit="batch", disable=None,
                      leave=False):
        batch = prompts[start:start + opts.batch_size]
        frozen, mixed = conditioning(original, tuned, weights, tokenizer, batch)
        seeds = range(opts.seed + start, opts.seed + start + len(batch))
        images.append(sample_images(unet, vae, schedule, seeds, latent_shape, frozen, mixed, opts.guidance_scale,
                                    switch).cpu())
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
    from .models import load_tuned_encoder
    from .models.lora import load_unet

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    # In steps from here on: the PNGs and the log state the step actually used, whatever form it was given in.
    opts = dataclasses.replace(opts, switch_step=resolve_switch_step(opts.switch_step, opts.num_steps))
    comp = load_components(model, seed=0)
    original = comp.text_encoder.to(dev).eval()
    tuned = [load_tuned_encoder(p, original).to(dev).eval() for p in text_encoders]
    if weights is None:
        weights = [opts.weight / max(len(tuned), 1)] * len(tuned)
    if len(weights) != len(tuned):
        raise ValueError(f"{len(tuned)} tuned encoders but {len(weights)} weights; give one weight per encoder")
    schedule = make_schedule(comp.scheduler.config, opts.num_steps, timestep_spacing=opts.timestep_spacing)
    side = model.resolution // comp.vae_scale_factor
    shape = (comp.unet.config.in_channels, side, side)
    sampler_unet = load_unet(unet, comp.unet) if unet else comp.unet
    logger.info("Generating %d images: %s", len(prompts), describe_switch(opts.switch_step, opts.num_steps)
                if tuned else f"the original encoder at every step of {opts.num_steps} (no tuned encoder)")
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
        "switch_step": resolve_switch_step(opts.switch_step, opts.num_steps),  # in steps, as used
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


__all__ = ["DEFAULT_SWITCH_STEP", "GRID_NAME", "GenerateOptions", "conditioning", "describe_switch", "generate",
           "generate_images", "image_settings", "mix_embeddings", "resolve_switch_step"]
