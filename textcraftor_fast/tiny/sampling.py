"""No-grad CFG DDIM sampling for the tiny world's evaluation, with paired seeds, through the engine's sampler.

Sample i's initial noise comes from `torch.Generator().manual_seed(seeds[i])`, so two encoders sampled
with the same seeds start from identical latents: their per-sample difference is a paired comparison.
The chain is `textcraftor_fast.sampler.sample_latents`, the same code the training step runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..sampler import Embeddings, decode_latents, make_schedule, sample_latents, seeded_noise, switch_sampling_config
from .models import LATENT_SIZE


def initial_latents(seeds: list[int], channels: int = 4, size: int = LATENT_SIZE) -> Tensor:
    """(B, 4, 16, 16) standard-normal latents, one generator per seed (independent of the batch size)."""
    return seeded_noise(seeds, (channels, size, size))


def _rows(emb: Embeddings, sl: slice) -> Embeddings:
    uncond = emb.uncond if emb.uncond.shape[0] == 1 else emb.uncond[sl]
    return Embeddings(emb.cond[sl], uncond)


@torch.no_grad()
def generate(unet, vae, scheduler_config, seeds: list[int], frozen: Embeddings, tuned: Embeddings | None = None,
             switch_step: int = 0, num_steps: int = 10, guidance_scale: float = 5.0,
             timestep_spacing: str = "trailing", batch_size: int = 128, progress: str | None = None) -> Tensor:
    """Images in [0, 1] (N, 3, 32, 32): steps before `switch_step` use `frozen` embeddings, the rest `tuned`
    (None: `frozen` throughout). cond rows are per sample (N, L, D); uncond is (1, L, D) or (N, L, D).
    `progress`: a progress bar's label (None: no bar)."""
    from tqdm.auto import tqdm

    schedule = make_schedule(scheduler_config, num_steps, 0.0, timestep_spacing)
    cfg = switch_sampling_config(num_steps, guidance_scale, switch_step)
    out = []
    starts = range(0, len(seeds), batch_size)
    for i in tqdm(starts, desc=progress, unit="batch", disable=progress is None or len(starts) < 2, leave=False):
        sl = slice(i, i + batch_size)
        x_t = initial_latents(seeds[sl]).to(frozen.cond.device, frozen.cond.dtype)
        lat = sample_latents(unet, schedule, x_t, _rows(frozen, sl), _rows(tuned, sl) if tuned else None,
                             cfg, grad_steps=0)
        out.append(decode_latents(vae, lat, use_checkpoint=False))
    return torch.cat(out)
