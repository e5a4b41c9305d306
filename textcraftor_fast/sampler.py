"""Differentiable DDIM with classifier-free guidance, truncated backpropagation and checkpointing.

TextCraftor's step: the early steps run with no graph at all on the ORIGINAL (frozen) encoder's
embeddings; from the switch step on, the trainable encoder's embeddings are used; only the last K steps
keep a graph. Each graph-carrying UNet call is checkpointed (non-reentrant) so memory stays flat in K:
a step keeps only its input latent and the embeddings, and one UNet recompute is alive at a time during
backward (with `checkpoint_unet_blocks`, one UNet block's). cond and uncond go through the UNet in ONE
batched call.

Timesteps and coefficients come from diffusers' own `DDIMScheduler` (built from the model's scheduler
config with our spacing), so the no-grad trajectory equals diffusers' loop; the step arithmetic is
re-written here with Python-float coefficients, which keeps it differentiable and saves no tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import SamplerConfig
from .memory.layers import checkpoint_modules
from .models.conditioner import unet_inputs


@dataclass(frozen=True)
class DDIMStep:
    """One DDIM update t -> prev_t (eta may be > 0; then std > 0 and noise is added)."""

    timestep: int
    sqrt_alpha: float  # sqrt(alpha_bar_t)
    sqrt_one_minus_alpha: float  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prev: float  # sqrt(alpha_bar_prev)
    direction: float  # sqrt(1 - alpha_bar_prev - std^2)
    std: float  # eta * sigma_t


@dataclass(frozen=True)
class DDIMSchedule:
    steps: tuple[DDIMStep, ...]
    prediction_type: str
    init_noise_sigma: float

    @property
    def timesteps(self) -> list[int]:
        return [s.timestep for s in self.steps]


def make_schedule(scheduler_config: Mapping[str, Any], num_steps: int, eta: float = 0.0,
                  timestep_spacing: str = "trailing") -> DDIMSchedule:
    """Read timesteps and coefficients off diffusers' DDIMScheduler for this config and spacing."""
    from diffusers import DDIMScheduler

    config = dict(scheduler_config)
    config["timestep_spacing"] = timestep_spacing
    for key in [k for k in config if k.startswith("_")]:
        config.pop(key)
    sched = DDIMScheduler.from_config(config)
    if sched.config.thresholding or sched.config.clip_sample:
        # SD1.5 uses neither; keeping the step a pure affine map is what makes it cheap to differentiate.
        raise ValueError("scheduler config sets clip_sample/thresholding, which the differentiable sampler does not "
                         "support; set clip_sample=false and thresholding=false in the scheduler config")
    sched.set_timesteps(num_steps)
    acp = sched.alphas_cumprod  # float32, as diffusers computes with it
    stride = sched.config.num_train_timesteps // num_steps
    steps = []
    for t in sched.timesteps.tolist():
        prev = t - stride
        # Coefficients are computed in float32 exactly as DDIMScheduler.step does, then held as Python floats:
        # a float32-exact scalar multiplies a float32 tensor bit-identically, so trajectories match diffusers.
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else sched.final_alpha_cumprod
        variance = sched._get_variance(t, prev)
        std = eta * variance ** 0.5
        steps.append(DDIMStep(int(t), float(a_t ** 0.5), float((1 - a_t) ** 0.5), float(a_prev ** 0.5),
                              float((1 - a_prev - std ** 2).clamp(min=0) ** 0.5), float(std)))
    return DDIMSchedule(tuple(steps), sched.config.prediction_type, float(sched.init_noise_sigma))


def ddim_update(step: DDIMStep, x: Tensor, model_output: Tensor, prediction_type: str,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x_t -> (x_prev, predicted x0), diffusers' DDIMScheduler.step arithmetic with scalar coefficients."""
    if prediction_type == "epsilon":
        x0 = (x - step.sqrt_one_minus_alpha * model_output) / step.sqrt_alpha
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = step.sqrt_alpha * x - step.sqrt_one_minus_alpha * model_output
        eps = step.sqrt_alpha * model_output + step.sqrt_one_minus_alpha * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - step.sqrt_alpha * x0) / step.sqrt_one_minus_alpha
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    x_prev = step.sqrt_alpha_prev * x0 + step.direction * eps
    return _add_noise(step, x_prev, noise), x0


def _add_noise(step: DDIMStep, x_prev: Tensor, noise: Tensor | None) -> Tensor:
    if step.std > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor for every step")
        x_prev = x_prev + step.std * noise
    return x_prev


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """(len(seeds), *shape) standard-normal tensors on the CPU, row i from its own generator seeded seeds[i]:
    a sample's noise does not depend on its batch or device, and equals what diffusers' `randn_tensor`
    draws for a list of CPU generators (what makes paired comparisons and stock-pipeline equality hold)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@dataclass
class Embeddings:
    """Text conditioning for one batch: cond (B, L, D) and uncond (1 or B, L, D) (SDXL: packed with the pooled
    embedding and time ids, models/conditioner.py)."""

    cond: Tensor
    uncond: Tensor


def cfg_model_outputs(unet: nn.Module, x: Tensor, t: int, cond: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor]:
    """(uncond, cond) UNet predictions, batched into one UNet call."""
    b = x.shape[0]
    emb = torch.cat([uncond.expand(b, -1, -1), cond])  # (2B, L, D)
    out = unet(torch.cat([x, x]), t, **unet_inputs(unet, emb)).sample  # (2B, C, h, w)
    out_uncond, out_cond = out.chunk(2)
    return out_uncond, out_cond


def guided_model_output(unet: nn.Module, x: Tensor, t: int, cond: Tensor, uncond: Tensor,
                        guidance_scale: float) -> Tensor:
    """UNet prediction with CFG; cond and uncond batched into one UNet call."""
    if guidance_scale == 1.0:
        return unet(x, t, **unet_inputs(unet, cond)).sample
    out_uncond, out_cond = cfg_model_outputs(unet, x, t, cond, uncond)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The down blocks, mid block and up blocks of a diffusers UNet2DConditionModel-style UNet: what
    `checkpoint_unet_blocks` checkpoints one by one."""
    if isinstance(unet, nn.parallel.DistributedDataParallel):
        unet = unet.module
    parts = ("down_blocks", "mid_block", "up_blocks")
    missing = [p for p in parts if getattr(unet, p, None) is None]
    if missing:
        raise ValueError(f"sampler.checkpoint_unet_blocks needs a diffusers UNet2DConditionModel-style UNet with "
                         f"{', '.join(parts)}; {type(unet).__name__} lacks {', '.join(missing)}: set "
                         "sampler.checkpoint_unet_blocks=false (each call checkpointed as one piece)")
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


@contextlib.contextmanager
def blocks_checkpointed(unet: nn.Module) -> Iterator[None]:
    """Inside the block, a UNet call with grad keeps only its blocks' inputs (and the few small layers between
    them); backward recomputes one block's graph at a time: the same recompute as checkpointing the whole call,
    at the largest block's memory instead of the whole call's (docs/performance.md)."""
    blocks = unet_blocks(unet)
    checkpoint_modules(blocks, enabled=True)
    try:
        yield
    finally:
        checkpoint_modules(blocks, enabled=False)


def _checkpointed_call(fn: Callable[..., Any], use_checkpoint: bool | str, unet: nn.Module, *args: Tensor) -> Any:
    """fn(*args) plain (False), checkpointed as one piece (True) or with `unet`'s blocks checkpointed ('blocks')."""
    if use_checkpoint == "blocks":
        with blocks_checkpointed(unet):
            return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args)


def guided_ddim_step(unet: nn.Module, step: DDIMStep, x: Tensor, cond: Tensor, uncond: Tensor,
                     guidance_scale: float, prediction_type: str, noise: Tensor | None = None,
                     use_checkpoint: bool | str = False, fused: bool = False) -> Tensor:
    """x_t -> x_prev: the guided UNet call (checkpointed when asked: True = as one piece, 'blocks' = block by
    block, see `blocks_checkpointed`), then the DDIM update.

    ``fused`` (ops.backend = cpp) runs guidance + update as the native ``cfg_ddim_step`` op, one pass instead
    of ~6 elementwise kernels, equal to this torch path to float rounding (tests/test_native_ops.py); it
    applies with CFG (scale != 1) and epsilon / v-prediction, the torch path runs everything else.
    """
    if fused and guidance_scale != 1.0 and prediction_type in ("epsilon", "v_prediction"):
        from .ops.native import cfg_ddim_step

        fn = lambda x_, c_, u_: cfg_model_outputs(unet, x_, step.timestep, c_, u_)
        out_uncond, out_cond = _checkpointed_call(fn, use_checkpoint, unet, x, cond, uncond)
        x_prev, _ = cfg_ddim_step(x, out_uncond, out_cond, guidance_scale, step.sqrt_alpha,
                                  step.sqrt_one_minus_alpha, step.sqrt_alpha_prev, step.direction, prediction_type)
        return _add_noise(step, x_prev, noise)
    fn = lambda x_, c_, u_: guided_model_output(unet, x_, step.timestep, c_, u_, guidance_scale)
    out = _checkpointed_call(fn, use_checkpoint, unet, x, cond, uncond)
    return ddim_update(step, x, out, prediction_type, noise)[0]


def switch_sampling_config(num_steps: int, guidance_scale: float, switch_step: int) -> SamplerConfig:
    """Config for no-grad sampling (use with grad_steps=0) that switches embeddings at `switch_step`."""
    return SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, grad_steps=1,
                         switch_step=min(switch_step, num_steps - 1))


def _checkpoint_mode(cfg: SamplerConfig, checkpointed: bool) -> bool | str:
    """guided_ddim_step's use_checkpoint for a call that is (or is not) checkpointed: whole, or block by block."""
    return "blocks" if checkpointed and cfg.checkpoint_unet_blocks else checkpointed


def _should_checkpoint(policy: str, every: int, grad_index: int, calls: int, plain_calls: int | None) -> bool:
    """Whether graph-carrying call `grad_index` of `calls` is checkpointed. 'auto' checkpoints the earliest
    calls and leaves the last `plain_calls` plain (the memory plan's count, textcraftor_fast/memory/policy.py):
    backward reaches the checkpointed calls after the plain calls' graphs are freed, so a recompute never lives
    beside them; with random K the count stays a bound on the plain calls."""
    if policy == "none":
        return False
    if policy == "step":
        return True
    if policy == "every_n":
        return grad_index % every == 0
    if policy == "auto":
        if plain_calls is None:
            raise ValueError("checkpoint='auto' needs plain_calls, the memory plan's number of UNet calls left "
                             "uncheckpointed (Trainer builds it from train.memory_budget_gb)")
        return grad_index < calls - plain_calls
    raise ValueError(f"checkpoint policy must be none, step, every_n or auto, got {policy!r}")


def sample_latents(unet: nn.Module, schedule: DDIMSchedule, latents: Tensor, frozen: Embeddings,
                   trainable: Embeddings | None, cfg: SamplerConfig, grad_steps: int | None = None,
                   noise_fn: Callable[[Tensor], Tensor] | None = None, fused_step: bool = False,
                   plain_calls: int | None = None) -> Tensor:
    """Run the whole DDIM chain from `latents` (x_T) and return the final latents (what SD decodes).

    Steps [0, switch) use `frozen` embeddings with no graph; steps [switch, n - K) use `trainable` with no
    graph; the last K steps use `trainable` with a graph (checkpointed per `cfg.checkpoint`; with 'auto', all
    but `plain_calls` of them). With `trainable=None` the whole chain is a plain no-grad sample on `frozen`
    (evaluation, base model). `noise_fn(shape_like)` gives the per-step noise when eta > 0. `fused_step`: see
    `guided_ddim_step`.
    """
    n = len(schedule.steps)
    k = cfg.grad_steps if grad_steps is None else grad_steps
    if trainable is None:
        k, switch = 0, n
    else:
        switch = min(cfg.effective_switch_step, n - k)
    x = latents * schedule.init_noise_sigma
    for i, step in enumerate(schedule.steps):
        emb = frozen if i < switch else trainable
        assert emb is not None
        noise = noise_fn(x) if step.std > 0 and noise_fn is not None else None
        if i < n - k:
            with torch.no_grad():
                x = guided_ddim_step(unet, step, x, emb.cond.detach(), emb.uncond.detach(), cfg.guidance_scale,
                                     schedule.prediction_type, noise, fused=fused_step)
            continue
        x = guided_ddim_step(unet, step, x, emb.cond, emb.uncond, cfg.guidance_scale, schedule.prediction_type,
                             noise, _checkpoint_mode(cfg, _should_checkpoint(cfg.checkpoint, cfg.checkpoint_every,
                                                                             i - (n - k), k, plain_calls)), fused_step)
    return x


def draft_lv_latents(unet: nn.Module, schedule: DDIMSchedule, final_latents: Tensor, trainable: Embeddings,
                     cfg: SamplerConfig, generator: torch.Generator | None = None, fused_step: bool = False,
                     plain_calls: int | None = None) -> Tensor:
    """DRaFT-LV (Clark et al.): re-noise the no-grad sample to the last timestep n times and take one
    differentiable step each; returns (n*B, C, h, w), sample j of every prompt in rows [j*B, (j+1)*B).
    Every call is checkpointed unless checkpoint is 'none', or 'auto' with `plain_calls` left plain."""
    last = schedule.steps[-1]
    x0 = final_latents.detach()
    outs = []
    n = cfg.draft_lv_samples
    for j in range(n):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = last.sqrt_alpha * x0 + last.sqrt_one_minus_alpha * noise
        ckpt = (_should_checkpoint("auto", cfg.checkpoint_every, j, n, plain_calls) if cfg.checkpoint == "auto"
                else cfg.checkpoint != "none")
        outs.append(guided_ddim_step(unet, last, x_t, trainable.cond, trainable.uncond, cfg.guidance_scale,
                                     schedule.prediction_type, None, _checkpoint_mode(cfg, ckpt), fused_step))
    return torch.cat(outs)


def vae_decoder_stages(vae: nn.Module) -> list[Callable[[Tensor], Tensor]]:
    """AutoencoderKL.decode (without tiling or slicing) as its stages, in diffusers' Decoder.forward order:
    post_quant_conv + conv_in + mid block, each up block's resnets and upsampler, then the output head (norm,
    act, conv_out), which at full resolution keeps three activations of its own. Calling them in turn IS the
    decode (tests check it bit for bit); checkpointing each separately is `decode_latents(..., "blocks")`."""
    dec = getattr(vae, "decoder", None)
    parts = ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")
    missing = [p for p in parts if not hasattr(dec, p)]
    if missing:
        raise ValueError(f"checkpoint_vae='blocks' needs a diffusers AutoencoderKL-style vae.decoder with "
                         f"{', '.join(parts)}; {type(vae).__name__} lacks {', '.join(missing)}: use "
                         "sampler.checkpoint_vae=true (the whole decode as one piece)")
    if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
        raise ValueError("checkpoint_vae='blocks' decodes the batch in one piece: disable VAE tiling/slicing "
                         "or use sampler.checkpoint_vae=true")
    post_quant_conv = getattr(vae, "post_quant_conv", None)

    def first(z: Tensor) -> Tensor:
        z = post_quant_conv(z) if post_quant_conv is not None else z
        return dec.mid_block(dec.conv_in(z), None)

    def head(x: Tensor) -> Tensor:
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

    ups = [stage for block in dec.up_blocks for stage in _up_block_stages(block)]
    return [first, *ups, head]


def _up_block_stages(block: nn.Module) -> list[Callable[[Tensor], Tensor]]:
    """A diffusers UpDecoderBlock2D as its resnets and upsampler, in its forward's order (the full-resolution
    block is the decoder's largest: SD1.5's keeps 168 MiB at 128 px, one of its resnets ~50); any other block
    type whole."""
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    if type(block) is not UpDecoderBlock2D:  # a subclass may change forward: keep it one piece
        return [lambda x: block(x, None)]
    return [*(lambda x, r=r: r(x, temb=None) for r in block.resnets),
            *(lambda x, u=u: u(x) for u in (block.upsamplers or ()))]


def _decode_in_stages(vae: nn.Module, z: Tensor) -> Tensor:
    # Each stage keeps only its input for backward; backward recomputes one stage's graph at a time.
    for stage in vae_decoder_stages(vae):
        z = checkpoint(stage, z, use_reentrant=False)
    return z


def decode_latents(vae: nn.Module, latents: Tensor, use_checkpoint: bool | str = True) -> Tensor:
    """Latents -> images in [0, 1] (B, 3, H, W), differentiably. `use_checkpoint`: False = plain; True = the
    decode checkpointed as one piece (the decoder's full-resolution activations are the largest single memory
    cost of a step); 'blocks' = each decoder stage checkpointed separately (`vae_decoder_stages`)."""
    if use_checkpoint not in (True, False, "blocks"):
        raise ValueError(f"use_checkpoint must be True, False or 'blocks', got {use_checkpoint!r}")
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    shift = getattr(vae.config, "shift_factor", None)
    z = latents / scale + (float(shift) if shift else 0.0)
    fn = lambda z_: vae.decode(z_).sample
    if use_checkpoint and torch.is_grad_enabled() and z.requires_grad:
        image = _decode_in_stages(vae, z) if use_checkpoint == "blocks" else checkpoint(fn, z, use_reentrant=False)
    else:
        image = fn(z)
    return (image.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)


def _rows(emb: Embeddings, rows: slice) -> Embeddings:
    uncond = emb.uncond if emb.uncond.shape[0] == 1 else emb.uncond[rows]
    return Embeddings(emb.cond[rows], uncond)


@torch.no_grad()
def sample_images(unet: nn.Module, vae: nn.Module, schedule: DDIMSchedule, seeds: Sequence[int],
                  latent_shape: tuple[int, int, int], frozen: Embeddings, mixed: Embeddings | None,
                  guidance_scale: float, switch_step: int, batch_size: int | None = None,
                  progress: str | None = None) -> Tensor:
    """Images in [0, 1] (N, 3, H, W), float32, no graph: deterministic DDIM (eta of `schedule`) from each seed's
    noise (`seeded_noise`), conditioned on `frozen` before `switch_step` and on `mixed` from it (None: `frozen`
    throughout), then decoded. cond rows are per sample (N, L, D); uncond is (1, L, D) or (N, L, D). Sampled
    `batch_size` rows at a time (None: all at once); `progress` labels a progress bar (None: none).

    The one no-grad sample-and-decode: evaluation, evaluation during training, `generate` and the tiny world's
    demo all sample through it, with the training step's sampler."""
    from tqdm.auto import tqdm

    device, dtype = frozen.cond.device, next(unet.parameters()).dtype
    cfg = switch_sampling_config(len(schedule.steps), guidance_scale, switch_step)
    cast = lambda e: Embeddings(e.cond.to(dtype), e.uncond.to(dtype))
    step = batch_size or len(seeds)
    starts = range(0, len(seeds), step)
    out = []
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None or len(starts) < 2, leave=False):
        rows = slice(start, start + step)
        x_T = seeded_noise(seeds[rows], latent_shape).to(device, dtype)  # (B, C, h, w)
        latents = sample_latents(unet, schedule, x_T, cast(_rows(frozen, rows)),
                                 cast(_rows(mixed, rows)) if mixed is not None else None, cfg, grad_steps=0)
        out.append(decode_latents(vae, latents.to(vae.dtype), use_checkpoint=False).float())
    return torch.cat(out)
