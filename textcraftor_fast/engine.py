"""The TextCraftor training loop: build, train_step, train, state_dict/load_state_dict, close.

Per optimizer step and micro-batch of prompts:
  1. tokenize; embed with the frozen ORIGINAL encoder (no grad) and with the trainable encoder;
  2. DDIM with CFG from x_T: early steps with no graph on the original embeddings, the last K with a
     graph on the trainable ones, each UNet call checkpointed (sampler.py);
  3. decode with the VAE (differentiable, checkpointed), score with the rewards;
  4. loss = -sum_i w_i R_i; backward reaches only what the stage trains (stages.py): the text encoder
     (train.stage = 'text_encoder'), or the UNet's LoRA adapters / weights (train.stage = 'unet', where the
     encoder is frozen and the two embeddings coincide); every other tower is frozen.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import checkpointing
from .backward_step import StepInBackward
from .config import ConfigError, TrainConfig, to_toml
from .data import PromptStream, open_prompts
from .deepspeed_backend import DeepSpeedEncoder
from .distributed import all_mean, average_gradients, barrier, init_distributed, shutdown
from .host_memory import trim_host_heap, trims_pay_off
from .layer_checkpointing import checkpoint_each_layer
from .memory_policy import MemoryPlan, StepProbe, apply_memory_policy, training_state_bytes
from .models.components import drop_vae_encoder
from .ops import apply_ops, resolve_backend
from .optim import build_optimizer, grads_finite, lr_factor, set_lr
from .rewards import build_rewards, freeze
from .rewards.shared_text import share_text_transformers
from .sampler import Embeddings, decode_latents, draft_lv_latents, make_schedule, sample_latents, unet_blocks
from .signals import DeliveredSignals
from .speed import apply_speed_options, reward_vision_towers
from .stages import build_stage, checkpoint_files

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run produced: the last resumable checkpoint, the final encoder and/or UNet, and the metrics."""

    checkpoint: Path
    text_encoder: Path | None
    """output_dir/text_encoder: the tuned encoder (text-encoder stage), or the frozen one the UNet was tuned under
    (UNet stage with model.text_encoder_path set); None for a UNet stage on the base encoder."""
    output_dir: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    """Steps, samples/s, peak memory and the best evaluation of this session (also in output_dir/summary.json)."""
    unet: Path | None = None
    """UNet stage: output_dir/unet_lora (diffusers LoRA: pipe.load_lora_weights) or output_dir/unet (full)."""


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is visible; use train.device='cpu' or 'auto'")
    return name


class _SpikeMonitor:
    """Logs a loss more than `sigmas` running standard deviations from its running mean (after `warmup`
    steps): a line to find the prompts that blew up, not an intervention."""

    def __init__(self, decay: float = 0.95, sigmas: float = 6.0, warmup: int = 10) -> None:
        self.decay, self.sigmas, self.warmup = decay, sigmas, warmup
        self.mean, self.var, self.seen = 0.0, 0.0, 0

    def check(self, step: int, loss: float, prompts: list[str]) -> bool:
        spiked = False
        if self.seen >= self.warmup:
            std = math.sqrt(self.var)
            if std > 0 and abs(loss - self.mean) > self.sigmas * std:
                logger.warning("Step %d: loss spike %.4g (running mean %.4g, std %.3g); prompts: %s", step, loss,
                               self.mean, std, prompts)
                spiked = True
        if self.seen == 0:
            self.mean = loss
        delta = loss - self.mean
        self.mean += (1 - self.decay) * delta
        self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        self.seen += 1
        return spiked


def _trim_host_heap_hook(grad: Tensor) -> None:
    trim_host_heap()


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output.dir '{folder}' cannot be created or written ({e.strerror or e}); choose another "
                      "output.dir") from None


def _warn_long_prompts(tokenizer, prompts: Sequence[str], max_checked: int = 100_000) -> None:
    """Warn when prompts exceed the tokenizer's length. Up to `max_checked` of them, evenly spaced, in chunks:
    tokenizing 10M prompts at start-up would take minutes and hold every id list at once."""
    limit, stride = tokenizer.model_max_length, max(1, len(prompts) // max_checked)
    n_long = n_checked = longest = 0
    indices = range(0, len(prompts), stride)
    for start in range(0, len(indices), 4096):
        chunk = [prompts[i] for i in indices[start:start + 4096]]
        lengths = [len(ids) for ids in tokenizer(chunk, truncation=False, verbose=False).input_ids]
        n_long += sum(n > limit for n in lengths)
        n_checked += len(lengths)
        longest = max(longest, *lengths)
    if n_long:
        sample = "" if n_checked == len(prompts) else f" (checked {n_checked} evenly spaced ones)"
        logger.warning("%d of %d prompts%s are longer than %d tokens and are truncated to them (as SD's pipeline "
                       "does); the longest has %d", n_long, n_checked, sample, limit, longest)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None
        self._delivered = DeliveredSignals()  # counts Ctrl-C presses inside train() (signals.py)
        self.tensorboard = None  # output.report_to = "tensorboard": opened by train(), closed by close()
        self.output_dir = Path(cfg.output.dir)
        _check_writable(self.output_dir)  # before any model loads: a bad output.dir fails in milliseconds
        # Resolve the resume target before building anything: a wrong path fails in milliseconds.
        spec = cfg.train.resume_from_checkpoint
        self._resume_from = (checkpointing.resolve_checkpoint(spec, self.output_dir, checkpoint_files(cfg))
                             if spec else None)
        existing = checkpointing.list_checkpoints(self.output_dir)
        if self._resume_from is None and existing and not cfg.output.overwrite:
            raise FileExistsError(f"output.dir '{self.output_dir}' already holds a run (latest checkpoint "
                                  f"{existing[-1].name}); resume it with --resume latest, pick another output.dir, "
                                  "or set output.overwrite=true to start over (deletes its checkpoints)")
        self._build()

    # ------------------------------------------------------------------------------------------------ build
    def _build(self) -> None:
        from .loaders import load_components

        cfg = self.cfg
        device_type = _device_type(cfg.train.device)
        self.dist = init_distributed(cfg.distributed, device_type)
        self.device = torch.device("cuda", self.dist.local_rank) if device_type == "cuda" else torch.device("cpu")
        self.amp_dtype = _DTYPES[cfg.train.mixed_precision]
        # The same seed on every rank: whatever a stage initialises at random (LoRA's down projections) must be
        # identical on all of them, or each rank trains its own adapters (the two-rank UNet-stage test caught it).
        torch.manual_seed(cfg.seed)

        comp = load_components(cfg.model, seed=cfg.seed)
        self.tokenizer = comp.tokenizer
        # Frozen towers are stored in the autocast dtype: they never update, so fp32 copies would only
        # cost memory and a cast per call. What the stage trains keeps fp32 master weights.
        cast = {"dtype": self.amp_dtype} if cfg.train.mixed_precision != "no" else {}
        self.stage = build_stage(cfg, comp, self.device, cast)
        self.unet, self.text_encoder = self.stage.unet, self.stage.text_encoder
        if cfg.sampler.checkpoint_unet_blocks:  # a UNet without diffusers' blocks fails here, not in step 1
            try:
                unet_blocks(self.unet)
            except ValueError as e:
                raise ConfigError(str(e)) from None  # the message names the key and the way out
        self.original_encoder = self.stage.original_encoder
        # Training only decodes: the VAE's encoder half is freed before anything is cast or moved.
        vae_encoder_bytes = drop_vae_encoder(comp.vae)
        logger.info("Freed the VAE encoder (%.0f MiB): training only decodes", vae_encoder_bytes / 2**20)
        self.vae = freeze(comp.vae).to(self.device, **cast)
        # Kernel swaps come after freeze/cast: swapped modules share the frozen, cast parameters.
        unets = self.stage.unets()
        self.ops_counts = apply_ops({**unets, "vae": self.vae}, cfg.ops.backend, self.device, cfg.ops.attention,
                                    cfg.ops.gemm_conv_max_pixels)
        self.fused_step = resolve_backend(cfg.ops.backend, self.device) == "cpp"  # native CFG-DDIM step
        self.schedule = make_schedule(comp.scheduler.config, cfg.sampler.num_steps, cfg.sampler.eta,
                                      cfg.sampler.timestep_spacing)
        self.latent_channels = self.unet.config.in_channels
        self.latent_size = cfg.model.resolution // comp.vae_scale_factor
        self.rewards = build_rewards(cfg.rewards, self.device, **cast)
        # On the host, each piece's freed activations stay in RSS under glibc and raise the next one's peak (at
        # SD1.5 size ~0.15 GiB of a step's peak, docs/performance.md): with models of that size the heap is trimmed
        # as a step starts, before the decoder's and the towers' forward, before backward and at each of
        # backward's boundaries (forward's hooks).
        self._trim_host = trims_pay_off(self.device, self.unet, self.vae, self.text_encoder)
        # A reward tower whose text transformer is the original encoder's (SD1.5's is CLIP ViT-L/14's) uses it.
        share_text_transformers(self.original_encoder, self.rewards)
        # What sampler.checkpoint_towers covers: the towers' image sides and the encoder, when it trains.
        trained = [self.text_encoder] if any(p.requires_grad for p in self.text_encoder.parameters()) else []
        self.tower_modules = [*reward_vision_towers(self.rewards), *trained]
        if cfg.sampler.checkpoint_towers is True:
            self._checkpoint_towers()
        self.speed = apply_speed_options(cfg.ops, self.device, unets, self.vae, self.rewards,
                                         vae_blocks=cfg.sampler.checkpoint_vae == "blocks")
        self.evaluator = None
        if cfg.train.eval_every > 0:
            from .evaluation.during_training import TrainingEvaluator

            # eta 0 whatever training uses: an evaluation must be deterministic to be compared across steps.
            eval_schedule = make_schedule(comp.scheduler.config, cfg.sampler.num_steps, 0.0,
                                          cfg.sampler.timestep_spacing)
            self.evaluator = TrainingEvaluator(cfg, self.stage.base_unet, self.vae, self.tokenizer,
                                               self.original_encoder, eval_schedule,
                                               (self.latent_channels, self.latent_size, self.latent_size),
                                               self.rewards)

        # A .parquet source is memory-mapped from a de-duplicated Arrow table under the run folder: every rank
        # on a node shares its pages (issue 11: 10M prompts as Python strings on every rank is ~15 GB a node).
        prompts = open_prompts(cfg.data.path, cfg.data.field, cfg.data.max_prompts, cfg.data.on_bad_line,
                               cache_dir=self.output_dir / "prompt_cache")
        _warn_long_prompts(self.tokenizer, prompts)
        self.probe_prompts = prompts[:16]
        self.stream = PromptStream(prompts, cfg.train.batch_size, cfg.seed, cfg.data.shuffle,
                                   self.dist.rank, self.dist.world_size)
        self.params = [p for p in self.stage.trainable.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.stage.trainable, cfg.optim, self.device)
        # [deepspeed] distributed.backend='deepspeed': DeepSpeed averages, clips and steps the encoder (the
        # text-encoder stage only: config validation refuses the UNet stage on it).
        self.ds = (DeepSpeedEncoder(self.stage.trainable, self.optimizer, cfg, self.dist.world_size)
                   if cfg.distributed.backend == "deepspeed" else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.mixed_precision == "fp16")
        self.backward_step = None
        if cfg.optim.step_in_backward:
            if self.dist.world_size > 1:  # each rank would step on its own gradient: the ranks drift apart
                raise ConfigError(f"config key 'optim.step_in_backward': expected false when launched on "
                                  f"{self.dist.world_size} processes (gradients must be averaged before any step)")
            self.backward_step = StepInBackward(self.optimizer, self.params, cfg.train.nan_guard)
        # The same generators on every rank: each rank draws the noise of the whole global batch and keeps
        # its own rows (forward), and K is the same everywhere, so results do not depend on the rank count.
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 7919)
        self.py_random = random.Random(cfg.seed)
        self.uncond_ids = self._tokenize([""])
        with torch.no_grad():
            self.frozen_uncond = self._encode(self.original_encoder, self.uncond_ids)
        self.memory_plan = self._memory_plan()
        self._log_summary(len(prompts))

    def _log_summary(self, num_prompts: int) -> None:
        cfg, n_train = self.cfg, sum(p.numel() for p in self.params)
        total_batch = cfg.train.batch_size * self.dist.world_size * cfg.train.gradient_accumulation_steps
        logger.info("***** Running TextCraftor *****")
        logger.info("  Num prompts = %d", num_prompts)
        logger.info("  Instantaneous batch size per device = %d", cfg.train.batch_size)
        logger.info("  Total train batch size (w. parallel, distributed & accumulation) = %d", total_batch)
        logger.info("  Gradient accumulation steps = %d", cfg.train.gradient_accumulation_steps)
        logger.info("  Total optimization steps = %d", cfg.train.steps)
        logger.info("  Trainable (%s) parameters = %s", self.stage.name, f"{n_train:,}")
        logger.info("  Sampler: DDIM %d steps %s (t=%s..%s), CFG %.2f, K=%d%s, switch step %d, checkpoint=%s",
                    cfg.sampler.num_steps, cfg.sampler.timestep_spacing, self.schedule.timesteps[0],
                    self.schedule.timesteps[-1], cfg.sampler.guidance_scale, cfg.sampler.grad_steps,
                    " (random)" if cfg.sampler.random_grad_steps else "", cfg.sampler.effective_switch_step,
                    cfg.sampler.checkpoint)
        logger.info("  Device = %s, mixed precision = %s", self.device, cfg.train.mixed_precision)

    def _memory_plan(self) -> MemoryPlan:
        """Which UNet calls / VAE stages to checkpoint: as configured, or fitted to the budget ('auto')."""
        cfg, b = self.cfg, self.cfg.train.batch_size
        probe = StepProbe(self.text_encoder, self._tokenize([""] * (b + 1)), self.unet, self.vae, self.rewards,
                          self.schedule, cfg.sampler, (b, self.latent_channels, self.latent_size, self.latent_size),
                          self._autocast, self.fused_step,
                          tuple(self.tower_modules) if cfg.sampler.checkpoint_towers == "auto" else ())
        plan = apply_memory_policy(cfg.sampler, cfg.train.memory_budget_gb, self.device, probe,
                                   training_state_bytes(self.params, cfg.optim.name, cfg.optim.step_in_backward))
        if cfg.sampler.checkpoint_towers == "auto" and plan.towers:
            self._checkpoint_towers()
        return plan

    def _checkpoint_towers(self) -> None:
        n = checkpoint_each_layer(*self.tower_modules)
        logger.info("Checkpointing %d CLIP transformer layers (the reward towers' image sides%s)", n,
                    " and the text encoder" if self.text_encoder in self.tower_modules else "")

    # ------------------------------------------------------------------------------------------- step parts
    def _tokenize(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return tok.input_ids.to(self.device)

    @staticmethod
    def _encode(encoder: torch.nn.Module, ids: Tensor) -> Tensor:
        return encoder(ids)[0]  # (B, 77, D) last hidden state, what SD conditions on

    def _autocast(self):
        if self.cfg.train.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _grad_steps(self) -> int:
        s = self.cfg.sampler
        if s.draft_lv_samples > 0:
            return 0  # DRaFT-LV: the whole chain runs without a graph, then one differentiable step per sample
        return self.py_random.randint(1, s.grad_steps) if s.random_grad_steps else s.grad_steps

    def forward(self, prompts: list[str], k: int) -> tuple[Tensor, dict[str, float]]:
        """Build the step's graph: embeddings -> sampler (last k steps with grad) -> VAE -> rewards -> loss."""
        s = self.cfg.sampler
        ids = self._tokenize(prompts)
        with torch.no_grad():
            frozen = Embeddings(self._encode(self.original_encoder, ids), self.frozen_uncond)
        with self._autocast():
            trainable = self._trainable_embeddings(ids)
            cond = trainable.cond
            # With SD-size models on CPU, freed pages go back to the OS at each boundary of backward: before the
            # decoder's and each UNet call's recompute (hooks on their outputs' gradients) and before the encoder's
            # backward (cond's); glibc would keep each piece's activations resident into the next one's peak.
            trim = _trim_host_heap_hook if self._trim_host else None
            if trim is not None and cond.requires_grad:
                cond.register_hook(trim)
            x_T = self._rank_rows(lambda n: torch.randn((n, self.latent_channels, self.latent_size,
                                                         self.latent_size), generator=self.generator,
                                                        device=self.device), len(prompts))  # (B, 4, h, w)
            noise_fn = lambda x: self._rank_rows(lambda n: torch.randn(
                (n, *x.shape[1:]), generator=self.generator, device=x.device, dtype=x.dtype), x.shape[0])
            plain_calls = self.memory_plan.plain_unet_calls
            latents = sample_latents(self.unet, self.schedule, x_T, frozen, trainable, s, k, noise_fn,
                                     self.fused_step, plain_calls, trim)
            if s.draft_lv_samples > 0:
                latents = draft_lv_latents(self.unet, self.schedule, latents, trainable, s, self.generator,
                                           self.fused_step, plain_calls, trim)
                prompts = prompts * s.draft_lv_samples
            if trim is not None:  # the sampler's freed pages, before the decoder's and then the towers' forward
                trim_host_heap()
            images = decode_latents(self.vae, latents.to(self.vae.dtype), self.memory_plan.vae)  # (B, 3, H, W)
            if trim is not None:
                trim_host_heap()
                if images.requires_grad:
                    images.register_hook(trim)
            total, parts = self.rewards(images, prompts)
        loss = -total.mean()
        extra: dict[str, float] = {}
        if self.cfg.train.embedding_anchor > 0 and cond.requires_grad:  # a frozen encoder's anchor is a constant
            anchor = (cond.float() - frozen.cond.float()).pow(2).mean()
            loss = loss + self.cfg.train.embedding_anchor * anchor
            extra["anchor"] = float(anchor.detach())
        return loss, {"loss": float(loss.detach()), "reward": float(total.detach().mean()),
                      **self.rewards.metrics(total, parts), **extra}

    def _trainable_embeddings(self, ids: Tensor) -> Embeddings:
        """cond (and uncond when trained) from ONE call of the trainable encoder: DeepSpeed's ZeRO-2 hooks,
        like DDP's, expect one forward and one backward per micro-batch (diffusers#3342)."""
        encode = self.ds.forward if self.ds is not None else lambda x: self._encode(self.text_encoder, x)
        if not self.cfg.sampler.train_uncond:
            return Embeddings(encode(ids), self.frozen_uncond)
        both = encode(torch.cat([ids, self.uncond_ids]))  # (B + 1, 77, D)
        return Embeddings(both[: len(ids)], both[len(ids):])

    def _rank_rows(self, draw, n: int) -> Tensor:
        """Rows of this rank from `draw(n * world_size)`, the global micro-batch's draw: rank r's i-th prompt
        is the global batch's (i * world + r)-th (PromptStream's sharding), so it gets the same noise as in a
        one-rank run with the same global batch."""
        world = self.dist.world_size
        return draw(n * world)[self.dist.rank::world] if world > 1 else draw(n)

    def _micro_step(self, prompts: list[str], k: int, scale: float) -> dict[str, float]:
        loss, metrics = self.forward(prompts, k)
        if self.ds is not None:  # [deepspeed] it scales by 1/accumulation itself and steps at the boundary
            self.ds.backward_and_step(loss)
            return metrics
        if self.backward_step is not None and self.cfg.train.nan_guard and not math.isfinite(metrics["loss"]):
            return metrics  # backward would step on non-finite gradients: nothing moves, the step is skipped
        if self._trim_host:  # the forward's freed activations, before backward's recomputes need pages
            trim_host_heap()
        self.scaler.scale(loss * scale).backward()
        return metrics

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (with gradient accumulation); returns its metrics."""
        cfg = self.cfg.train
        t0 = time.perf_counter()
        k = self._grad_steps()
        self.optimizer.zero_grad(set_to_none=True)
        if self._trim_host:
            trim_host_heap()
        if self.backward_step is not None:
            self.backward_step.begin()
        o = self.cfg.optim
        set_lr(self.optimizer, o.lr * lr_factor(self.step, o.warmup_steps, cfg.steps, o.lr_schedule))
        accum: dict[str, float] = {}
        self.last_prompts: list[str] = []  # named in the log when this step is skipped or spikes
        for _ in range(cfg.gradient_accumulation_steps):
            batch = self.stream.next_batch()
            self.last_prompts += batch
            m = self._micro_step(batch, k, 1.0 / cfg.gradient_accumulation_steps)
            for key, v in m.items():
                accum[key] = accum.get(key, 0.0) + v / cfg.gradient_accumulation_steps
        if self.ds is not None:  # [deepspeed] the engine has stepped at the last micro-batch
            metrics = self._step_metrics(accum, k, self.ds.grad_norm, False, t0)
            if cfg.nan_guard and not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                # The step cannot be skipped: DeepSpeed took it inside the last backward. Stop before saving.
                raise RuntimeError(f"step {self.step + 1}: non-finite loss or gradients under DeepSpeed (loss "
                                   f"{metrics['loss']}, grad norm {metrics['grad_norm']}); prompts: "
                                   f"{self.last_prompts}; resume from the last checkpoint with a lower optim.lr")
            return metrics
        if self.backward_step is not None:  # every tensor has stepped inside backward
            stepped = self.backward_step
            skipped = cfg.nan_guard and (stepped.skipped > 0 or not math.isfinite(accum["loss"]))
            if stepped.skipped:
                logger.warning("Step %d: %d of %d tensors had non-finite gradients and were not updated "
                               "(optim.step_in_backward: the other %d were)", self.step + 1, stepped.skipped,
                               stepped.skipped + stepped.stepped, stepped.stepped)
            return self._step_metrics(accum, k, stepped.grad_norm if not skipped else float("nan"), skipped, t0)
        average_gradients(self.params, self.dist)
        self.scaler.unscale_(self.optimizer)
        finite = math.isfinite(accum["loss"]) and grads_finite(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.params, self.cfg.optim.max_grad_norm or float("inf"))) if finite else float("nan")
        skipped = cfg.nan_guard and not finite
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return self._step_metrics(accum, k, grad_norm, skipped, t0)

    def _step_metrics(self, accum: dict[str, float], k: int, grad_norm: float, skipped: bool,
                      t0: float) -> dict[str, Any]:
        metrics = {key: all_mean(v, self.dist, self.device) for key, v in accum.items()}
        metrics.update(step=self.step + 1, k=k, grad_norm=grad_norm, skipped=int(skipped),
                       lr=self.optimizer.param_groups[0]["lr"], s_per_step=time.perf_counter() - t0)
        return metrics

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        # The grad scaler's state (fp16) is a few floats and counters: JSON, so fp16 resumes are exact too.
        return {"data": self.stream.state_dict(), "history_len": len(self.history),
                "scaler": self.scaler.state_dict()}

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                 "python": self.py_random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any], rng: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if rng:
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["generator"])
            self.py_random.setstate(rng["python"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self) -> Path:
        path = checkpointing.checkpoints_dir(self.output_dir) / f"step-{self.step:06d}"
        # [deepspeed] gathered from the ZeRO shards on every rank (a collective) into torch's per-parameter
        # format, the file a single process writes: it resumes on any number of ranks.
        optimizer = self.ds.full_optimizer_state() if self.ds is not None else self.optimizer
        if self.dist.is_main:
            path = checkpointing.save_checkpoint(
                self.output_dir, self.step, self.stage.weights, optimizer, self.rng_state(),
                self.state_dict(), to_toml(self.cfg), self.cfg.train.checkpoints_total_limit)
        barrier(self.dist)
        return path

    def resume(self, path: Path) -> Path:
        checkpointing.check_optimizer_name(path, self.cfg.optim.name)
        optimizer = self.optimizer if self.ds is None else None
        state, rng = checkpointing.load_checkpoint(path, self.stage.weights, optimizer)
        if self.ds is not None:  # [deepspeed] scatter the whole per-parameter state into this rank's shard
            self.ds.load_full_optimizer_state(checkpointing.load_optimizer_state(path))
        self.load_state_dict(state, rng)
        self.history = self._read_history()[: state.get("history_len", self.step)]
        logger.info("Resumed from %s at step %d", path, self.step)
        return path

    def _metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _read_history(self) -> list[dict[str, Any]]:
        p = self._metrics_path()
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []

    def _write_history(self) -> None:
        """Rewrite metrics.jsonl from self.history (once per run: it drops lines past a resumed step)."""
        if self.dist.is_main and self.cfg.output.report_to != "none":
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._metrics_path().with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(m) + "\n" for m in self.history))
            tmp.replace(self._metrics_path())

    def _append_history(self, metrics: dict[str, Any]) -> None:
        # One appended line per logged step: rewriting the file every step would be quadratic over a run.
        self.history.append(metrics)
        if self.dist.is_main and self.cfg.output.report_to != "none":
            with self._metrics_path().open("a") as f:
                f.write(json.dumps(metrics) + "\n")

    def _evaluate(self, metrics: dict[str, Any]) -> bool:
        """At every train.eval_every steps and the last: evaluate on rank 0 into `metrics`; True if it ran."""
        every = self.cfg.train.eval_every
        if self.evaluator is None or not (self.step % every == 0 or self.step == self.cfg.train.steps):
            return False
        if self.dist.is_main:
            found, grid = self.evaluator(*self.stage.evaluated())
            metrics.update(found)
            if self.tensorboard is not None:
                self.tensorboard.image_grid("eval/original_vs_tuned", grid, self.step, rows=2)
            logger.info("Step %d evaluation: %s", self.step, ", ".join(
                f"{k} {v:+.4f}" for k, v in found.items() if k.endswith("_diff")))
        barrier(self.dist)
        return True

    def _log(self, metrics: dict[str, Any]) -> None:
        self._append_history(metrics)
        if self.tensorboard is not None:
            self.tensorboard.scalars(metrics, self.step)

    def _run_summary(self, first_step: int, seconds: float) -> dict[str, Any]:
        """What this session did, logged and written to output_dir/summary.json."""
        cfg = self.cfg.train
        steps = self.step - first_step
        samples = steps * cfg.batch_size * cfg.gradient_accumulation_steps * self.dist.world_size
        if self.device.type == "cuda":
            peak_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
        evals = [h for h in self.history if "eval/reward" in h]
        best = max(evals, key=lambda h: h["eval/reward"]) if evals else None
        summary = {"steps": self.step, "steps_this_session": steps, "seconds": round(seconds, 2),
                   "samples_per_second": samples / seconds if seconds > 0 else None,
                   "peak_memory_gb": round(peak_gb, 3), "peak_memory_kind": "cuda allocated" if
                   self.device.type == "cuda" else "process max RSS",
                   "best_eval": {"step": best["step"], "eval/reward": best["eval/reward"],
                                 "eval/reward_diff": best["eval/reward_diff"]} if best else None}
        logger.info("***** Run summary *****")
        logger.info("  Steps = %d (%d this session) in %.1f s, %.3f samples/s", self.step, steps, seconds,
                    summary["samples_per_second"] or 0.0)
        logger.info("  Peak memory = %.2f GB (%s)", peak_gb, summary["peak_memory_kind"])
        if best:
            logger.info("  Best evaluation: step %d, eval/reward %.4f (%+.4f vs the original)", best["step"],
                        best["eval/reward"], best["eval/reward_diff"])
        if self.dist.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ----------------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and (self._stop_signal is not None or self._delivered.take(signum) >= 2):
            # A second Ctrl-C (maybe during the same long C call as the first: one handler run for both,
            # signals.py): stop now. A save in progress is abandoned in its temporary folder; the last complete
            # checkpoint is untouched (checkpointing.py).
            logger.warning("Ctrl-C again: stopping at once, without saving (the last complete checkpoint is kept)")
            raise KeyboardInterrupt
        # Set before logging: a second signal arriving meanwhile runs this handler again inside the first.
        self._stop_signal = signum
        logger.warning("Received signal %d: finishing this step, saving a checkpoint, then stopping (resume with "
                       "--resume latest; press Ctrl-C again to stop at once without saving)", signum)

    @contextlib.contextmanager
    def _signal_handlers(self):
        previous = {}
        with DeliveredSignals() as self._delivered:
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        if self._resume_from is not None:
            self.resume(self._resume_from)
        if self._resume_from is None and self.cfg.output.overwrite and self.dist.is_main:
            shutil.rmtree(checkpointing.checkpoints_dir(self.output_dir), ignore_errors=True)
        (self.output_dir / "config.toml").write_text(to_toml(self.cfg))
        self._write_history()
        if self.cfg.output.report_to == "tensorboard" and self.dist.is_main:
            from .reporting import TensorBoardWriter

            self.tensorboard = TensorBoardWriter(self.output_dir / "tensorboard",
                                                 purge_step=self.step + 1 if self._resume_from else None)
        first_step, t_start = self.step, time.perf_counter()
        last_ckpt: Path | None = None
        nan_run = 0
        spike = _SpikeMonitor()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="textcraftor", unit="step",
                   disable=not (cfg.progress_bar and self.dist.is_main), dynamic_ncols=True)
        with self._signal_handlers():
            while self.step < cfg.steps and self._stop_signal is None:
                metrics = self.train_step()
                self.step += 1
                nan_run = nan_run + 1 if metrics["skipped"] else 0
                if metrics["skipped"]:
                    logger.warning("Step %d: non-finite loss or gradients (loss %s), optimizer step skipped "
                                   "(%d in a row); prompts: %s", self.step, metrics["loss"], nan_run,
                                   self.last_prompts)
                else:
                    spike.check(self.step, metrics["loss"], self.last_prompts)
                evaluated = self._evaluate(metrics)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or evaluated:
                    metrics.update(self.stage.monitor(self._tokenize, self.probe_prompts))
                    self._log(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.4f}", s_step=f"{metrics['s_per_step']:.2f}")
                if nan_run >= cfg.max_nan_skips:
                    last_ckpt = self.save()
                    raise RuntimeError(f"{nan_run} consecutive non-finite steps: stopping (last good weights saved "
                                       f"at {last_ckpt}); lower optim.lr or use train.mixed_precision='bf16'")
                if self.step % cfg.checkpointing_steps == 0:
                    last_ckpt = self.save()
        bar.close()
        if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:06d}"):
            last_ckpt = self.save()
        final = self.stage.export(self.output_dir, write=self.dist.is_main)
        summary = self._run_summary(first_step, time.perf_counter() - t_start)
        return TrainResult(last_ckpt, final.get("text_encoder"), self.output_dir, self.step, list(self.history),
                           summary, unet=final.get("unet"))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        shutdown(self.dist)


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune the text encoder (or the UNet: train.stage) as `config` says; returns the checkpoint, the final
    encoder and/or UNet, and the metrics."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
