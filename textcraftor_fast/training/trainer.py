"""The TextCraftor training loop: build, train_step, train, state_dict/load_state_dict, close.

One optimizer step, per micro-batch of prompts (`train_step` and `forward` read in this order):
  1. embed the prompts with the frozen ORIGINAL encoder (no grad) and with the trained one;
  2. DDIM with CFG from x_T: the early steps with no graph on the original embeddings, the last K with a graph on
     the trained ones, each graph-carrying UNet call checkpointed as the memory plan says (sampler.py);
  3. decode with the VAE (differentiable), score with the rewards: loss = -sum_i w_i R_i;
  4. backward reaches only what the stage trains (training/stages.py); the optimizer step is taken (steppers.py).

`_build` sets everything up once, as a fixed sequence of transforms of the loaded models, each announced in the
log (torchtitan's style): load -> stage (what trains; the rest frozen and cast) -> ops (kernel swaps) -> memory
plan (checkpointing, host-heap trims) -> speed options -> optimizer -> parallelism (DDP or DeepSpeed) -> the
optimizer step's strategy. No transform reaches into the loop, and the loop does not know which ones ran.
"""
from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, TrainConfig, to_toml
from ..data import PromptStream, open_prompts, warn_long_prompts
from ..memory.host_heap import attach_host_heap_trims, trims_pay_off
from ..memory.layers import checkpoint_each_layer
from ..memory.policy import MemoryPlan, StepProbe, apply_memory_policy, training_state_bytes
from ..models.components import drop_vae_encoder
from ..models.loading import load_components
from ..models.conditioner import sub_encoders, zeroes_empty_prompt
from ..models.text import encode, encode_empty, tokenize
from ..ops.backend import apply_ops, resolve_backend
from ..ops.speed import apply_speed_options
from ..parallel.distributed import (Whereabouts, all_mean, barrier, collectives_guarded, device_type,
                                    init_distributed, shutdown, wrap_ddp)
from ..rewards import build_rewards, freeze
from ..rewards.clip_tower import reward_vision_towers
from ..rewards.shared_text import share_text_transformers
from ..sampler import Embeddings, decode_latents, draft_lv_latents, make_schedule, sample_latents, unet_blocks
from . import checkpoints
from .monitor import SpikeMonitor
from .optim import build_optimizer, lr_factor
from .run_log import RunLog, TrainResult, check_reporters
from .signals import StopOnSignals
from .stages import build_stage, checkpoint_files
from .steppers import build_optimizer_step

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.step = cfg, 0
        self.output_dir = Path(cfg.output.dir)
        # Before any model loads, so that a bad output.dir, resume target or reporter package fails in milliseconds.
        checkpoints.check_writable(self.output_dir)
        check_reporters(cfg.output)
        spec = cfg.train.resume_from_checkpoint
        self._resume_from = checkpoints.resolve_checkpoint(spec, self.output_dir, checkpoint_files(cfg)) if spec \
            else None
        existing = checkpoints.list_checkpoints(self.output_dir)
        if self._resume_from is None and existing and not cfg.output.overwrite:
            raise FileExistsError(f"output.dir '{self.output_dir}' already holds a run (latest checkpoint "
                                  f"{existing[-1].name}); resume it with --resume latest, pick another output.dir, "
                                  "or set output.overwrite=true to start over (deletes its checkpoints)")
        self.stop = StopOnSignals()
        self._build()

    # ------------------------------------------------------------------------------------------------ build
    def _build(self) -> None:
        cfg = self.cfg
        kind = device_type(cfg.train.device)
        self.dist = init_distributed(cfg.distributed, kind)
        self.where = Whereabouts(self.dist)  # named in the error when a collective fails on a hung or lost rank
        self.device = torch.device("cuda", self.dist.local_rank) if kind == "cuda" else torch.device("cpu")
        self.amp_dtype = _DTYPES[cfg.train.mixed_precision]
        # The same seed on every rank: what a stage initialises at random (LoRA's down projections) must be
        # identical on all of them, or each rank trains adapters of its own.
        torch.manual_seed(cfg.seed)
        comp = load_components(cfg.model, seed=cfg.seed)
        self._apply_stage(comp)
        self._apply_ops()
        self.memory_plan = self._plan_memory()
        self.speed = apply_speed_options(cfg.ops, self.device, self.stage.unets(), self.vae,
                                         reward_vision_towers(self.rewards), cfg.sampler.checkpoint_vae == "blocks")
        self.optimizer = build_optimizer(self.stage.trainable, cfg.optim, self.device)
        self._apply_parallelism()
        self.evaluator = self._build_evaluator(comp.scheduler.config)
        prompts = open_prompts(cfg.data.path, cfg.data.field, cfg.data.max_prompts, cfg.data.on_bad_line,
                               cache_dir=self.output_dir / "prompt_cache")  # .parquet: mapped, shared by ranks
        warn_long_prompts(self.tokenizer, prompts)
        self.probe_prompts = prompts[:16]
        self.stream = PromptStream(prompts, cfg.train.batch_size, cfg.seed, cfg.data.shuffle, self.dist.rank,
                                   self.dist.world_size)
        # The same generators on every rank: each rank draws the noise of the whole global batch and keeps its
        # own rows (`_noise`), and K is the same everywhere, so results do not depend on the rank count.
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 7919)
        self.py_random = random.Random(cfg.seed)
        self.log = RunLog(self.output_dir, cfg, self.dist.is_main)
        self.log.setup(cfg, self.dist.world_size, self.stage.name, sum(p.numel() for p in self.params),
                       self.schedule.timesteps, len(prompts), self.device)

    def _apply_stage(self, comp) -> None:
        """What trains (fp32 master weights) and what is frozen, stored in the autocast dtype: frozen towers never
        update, so fp32 copies would only cost memory and a cast per call."""
        cast = {"dtype": self.amp_dtype} if self.cfg.train.mixed_precision != "no" else {}
        self.stage = build_stage(self.cfg, comp, self.device, cast)
        self.unet, self.text_encoder = self.stage.unet, self.stage.text_encoder
        self.original_encoder, self.tokenizer = self.stage.original_encoder, comp.tokenizer
        if self.cfg.sampler.checkpoint_unet_blocks:  # a UNet without diffusers' blocks fails here, not in step 1
            try:
                unet_blocks(self.unet)
            except ValueError as e:
                raise ConfigError(str(e)) from None  # the message names the key and the way out
        logger.info("Freed the VAE encoder (%.0f MiB): training only decodes", drop_vae_encoder(comp.vae) / 2**20)
        self.vae = freeze(comp.vae).to(self.device, **cast)
        self.rewards = build_rewards(self.cfg.rewards, self.device, **cast)
        # A reward tower whose text transformer is the original encoder's (SD1.5's, and SDXL's encoder 1, is CLIP
        # ViT-L/14's) uses it.
        share_text_transformers(sub_encoders(self.original_encoder)["text_encoder"], self.rewards)
        self.params = [p for p in self.stage.trainable.parameters() if p.requires_grad]
        self.schedule = make_schedule(comp.scheduler.config, self.cfg.sampler.num_steps, self.cfg.sampler.eta,
                                      self.cfg.sampler.timestep_spacing)
        side = self.cfg.model.resolution // comp.vae_scale_factor
        self.latent_shape = (self.unet.config.in_channels, side, side)
        self.uncond_ids = tokenize(self.tokenizer, [""], self.device)
        with torch.no_grad():
            self.frozen_uncond = encode_empty(self.original_encoder, self.uncond_ids)
        # SDXL base's unconditional embedding is zeros (force_zeros_for_empty_prompt), in training as in every
        # pipeline that samples the tuned model: nothing produces it, so there is nothing to train.
        self.train_uncond = self.cfg.sampler.train_uncond and not zeroes_empty_prompt(self.text_encoder)
        if self.cfg.sampler.train_uncond and not self.train_uncond:
            logger.info("sampler.train_uncond has no effect here: the model zeroes the empty prompt's embedding "
                        "(force_zeros_for_empty_prompt), so the unconditional branch is zeros, as in its pipeline")

    def _apply_ops(self) -> None:
        """Kernel swaps, after freeze/cast: swapped modules share the frozen, cast parameters."""
        ops = self.cfg.ops
        self.ops_counts = apply_ops({**self.stage.unets(), "vae": self.vae}, ops.backend, self.device, ops.attention,
                                    ops.gemm_conv_max_pixels)
        self.fused_step = resolve_backend(ops.backend, self.device) == "cpp"  # the native CFG-DDIM step

    def _plan_memory(self) -> MemoryPlan:
        """Which UNet calls, VAE stages and CLIP layers are checkpointed (as configured, or fitted to the budget:
        'auto'), and host-heap trims where they pay off."""
        cfg, b = self.cfg, self.cfg.train.batch_size
        # What sampler.checkpoint_towers covers: the towers' image sides and the encoder, when it trains.
        trained = [self.text_encoder] if any(p.requires_grad for p in self.text_encoder.parameters()) else []
        towers = [*reward_vision_towers(self.rewards), *trained]
        if cfg.sampler.checkpoint_towers is True:
            self._checkpoint_towers(towers)
        probe = StepProbe(self.text_encoder, tokenize(self.tokenizer, [""] * (b + 1), self.device), self.unet,
                          self.vae, self.rewards, self.schedule, cfg.sampler, (b, *self.latent_shape),
                          self._autocast, self.fused_step, tuple(towers) if cfg.sampler.checkpoint_towers == "auto"
                          else ())
        plan = apply_memory_policy(cfg.sampler, cfg.train.memory_budget_gb, self.device, probe,
                                   training_state_bytes(self.params, cfg.optim.name, cfg.optim.step_in_backward))
        if cfg.sampler.checkpoint_towers == "auto" and plan.towers:
            self._checkpoint_towers(towers)
        if trims_pay_off(self.device, self.unet, self.vae, self.text_encoder):
            n = len(attach_host_heap_trims(self.original_encoder, self.text_encoder, self.unet, self.vae,
                                           self.rewards))
            logger.info("Host-heap trims at %d boundaries of each step (CPU, SD-size models)", n)
        return plan

    def _checkpoint_towers(self, towers: list[torch.nn.Module]) -> None:
        n = checkpoint_each_layer(*towers)
        logger.info("Checkpointing %d CLIP transformer layers (the reward towers' image sides%s)", n,
                    " and the text encoder" if self.text_encoder in towers else "")

    def _apply_parallelism(self) -> None:
        """DDP (or DeepSpeed's engine) around the trained module, and the optimizer step's strategy; `encoder` and
        `sampler_unet` are the modules the forward calls (a wrapper, or the module itself)."""
        cfg, trained = self.cfg, self.stage.trainable
        self.ds = self.ddp = None
        if cfg.distributed.backend == "deepspeed":  # the text-encoder stage only (config validation)
            from ..parallel.deepspeed_engine import DeepSpeedEncoder

            self.ds = DeepSpeedEncoder(trained, self.optimizer, cfg, self.dist.world_size)
        elif cfg.optim.step_in_backward and self.dist.world_size > 1:
            raise ConfigError(f"config key 'optim.step_in_backward': expected false when launched on "
                              f"{self.dist.world_size} processes (gradients must be averaged before any step)")
        elif any(p.requires_grad for p in trained.parameters()):
            self.ddp = wrap_ddp(trained, self.dist, self.device)
        wrapper = self.ds.engine if self.ds is not None else self.ddp
        self.encoder = wrapper if wrapper is not None and trained is self.text_encoder else self.text_encoder
        self.sampler_unet = wrapper if wrapper is not None and trained is self.unet else self.unet
        self.optimizer_step = build_optimizer_step(cfg, self.optimizer, self.params, self.device, self.ddp, self.ds)

    def _build_evaluator(self, scheduler_config):
        if self.cfg.train.eval_every <= 0:
            return None
        from ..evaluation.during_training import TrainingEvaluator

        s = self.cfg.sampler
        # eta 0 whatever training uses: an evaluation must be deterministic to be compared across steps.
        schedule = make_schedule(scheduler_config, s.num_steps, 0.0, s.timestep_spacing)
        return TrainingEvaluator(self.cfg, self.stage.base_unet, self.vae, self.tokenizer, self.original_encoder,
                                 schedule, self.latent_shape, self.rewards)

    # ------------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step (with gradient accumulation); returns its metrics."""
        cfg, o = self.cfg.train, self.cfg.optim
        t0, k, n = time.perf_counter(), self._grad_steps(), cfg.gradient_accumulation_steps
        self.optimizer_step.begin(o.lr * lr_factor(self.step, o.warmup_steps, cfg.steps, o.lr_schedule))
        accum: dict[str, float] = {}
        self.last_prompts: list[str] = []  # named in the log when this step is skipped or spikes
        for i in range(n):
            prompts = self.stream.next_batch()
            self.last_prompts += prompts
            with self.optimizer_step.micro_batch(last=i == n - 1):
                self.where.mark(f"step {self.step + 1}: forward")
                loss, metrics = self.forward(prompts, k)
                self.where.mark(f"step {self.step + 1}: backward (gradient all-reduce)")
                self.optimizer_step.backward(loss, 1.0 / n)
            for key, v in metrics.items():
                accum[key] = accum.get(key, 0.0) + v / n
        self.where.mark(f"step {self.step + 1}: optimizer step and metrics")
        metrics = {key: all_mean(v, self.dist, self.device) for key, v in accum.items()}
        outcome = self.optimizer_step.finish(metrics["loss"], f"step {self.step + 1} (prompts: {self.last_prompts})")
        metrics.update(step=self.step + 1, k=k, grad_norm=outcome.grad_norm, skipped=int(outcome.skipped),
                       lr=self.optimizer.param_groups[0]["lr"], s_per_step=time.perf_counter() - t0)
        return metrics

    def forward(self, prompts: list[str], k: int) -> tuple[Tensor, dict[str, float]]:
        """The step's graph: embeddings -> sampler (last k steps with grad) -> VAE -> rewards -> loss."""
        s = self.cfg.sampler
        ids = tokenize(self.tokenizer, prompts, self.device)
        with torch.no_grad():
            frozen = Embeddings(encode(self.original_encoder, ids), self.frozen_uncond)
        with self._autocast():
            trained = self._trained_embeddings(ids)
            x_T = self._noise((self._rows(len(prompts)), *self.latent_shape))  # (B, 4, h, w)
            noise_fn = lambda x: self._noise((self._rows(x.shape[0]), *x.shape[1:]), x.dtype)
            plain_calls = self.memory_plan.plain_unet_calls
            latents = sample_latents(self.sampler_unet, self.schedule, x_T, frozen, trained, s, k, noise_fn,
                                     self.fused_step, plain_calls)
            if s.draft_lv_samples > 0:
                latents = draft_lv_latents(self.sampler_unet, self.schedule, latents, trained, s, self.generator,
                                           self.fused_step, plain_calls)
                prompts = prompts * s.draft_lv_samples
            images = decode_latents(self.vae, latents.to(self.vae.dtype), self.memory_plan.vae)  # (B, 3, H, W)
            total, parts = self.rewards(images, prompts)
        loss = -total.mean()
        extra: dict[str, float] = {}
        if self.cfg.train.embedding_anchor > 0 and trained.cond.requires_grad:  # a frozen anchor is a constant
            anchor = (trained.cond.float() - frozen.cond.float()).pow(2).mean()
            loss = loss + self.cfg.train.embedding_anchor * anchor
            extra["anchor"] = float(anchor.detach())
        return loss, {"loss": float(loss.detach()), "reward": float(total.detach().mean()),
                      **self.rewards.metrics(total, parts), **extra}

    def _trained_embeddings(self, ids: Tensor) -> Embeddings:
        """cond (and uncond when trained) from ONE call of the trained encoder: DDP and DeepSpeed's ZeRO-2 hooks
        expect one forward and one backward per micro-batch (diffusers#3342)."""
        if not self.train_uncond:
            return Embeddings(encode(self.encoder, ids), self.frozen_uncond)
        both = encode(self.encoder, torch.cat([ids, self.uncond_ids]))  # (B + 1, L, D)
        return Embeddings(both[: len(ids)], both[len(ids):])

    def _rows(self, n: int) -> int:
        return n * self.dist.world_size

    def _noise(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
        """This rank's rows of the global micro-batch's noise (`shape` holds the global rows): rank r's i-th prompt
        is the global batch's (i * world + r)-th (PromptStream's sharding), so it gets the same noise as in a
        one-rank run with the same global batch."""
        world = self.dist.world_size
        draw = torch.randn(shape, generator=self.generator, device=self.device, dtype=dtype)
        return draw[self.dist.rank::world] if world > 1 else draw

    def _autocast(self):
        if self.cfg.train.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _grad_steps(self) -> int:
        s = self.cfg.sampler
        if s.draft_lv_samples > 0:
            return 0  # DRaFT-LV: the whole chain runs without a graph, then one differentiable step per sample
        return self.py_random.randint(1, s.grad_steps) if s.random_grad_steps else s.grad_steps

    # ------------------------------------------------------------------------------------------------ state
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.log.history

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "history_len": len(self.log.history),
                **self.optimizer_step.state_dict()}

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                 "python": self.py_random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any], rng: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.optimizer_step.load_state_dict(state)
        if rng:
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["generator"])
            self.py_random.setstate(rng["python"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self) -> Path:
        path = checkpoints.checkpoints_dir(self.output_dir) / f"step-{self.step:06d}"
        self.where.mark(f"checkpoint at step {self.step}")
        optimizer_state = self.optimizer_step.optimizer_state()  # a collective under DeepSpeed: every rank
        if self.dist.is_main:
            path = checkpoints.save_checkpoint(self.output_dir, self.step, self.stage.weights, optimizer_state,
                                               self.rng_state(), self.state_dict(), to_toml(self.cfg),
                                               self.cfg.train.checkpoints_total_limit)
        barrier(self.dist)
        return path

    def resume(self, path: Path) -> dict[str, Any]:
        checkpoints.check_optimizer_name(path, self.cfg.optim.name)
        state, rng = checkpoints.load_checkpoint(path, self.stage.weights, self.optimizer_step.load_optimizer_state)
        self.load_state_dict(state, rng)
        logger.info("Resumed from %s at step %d", path, self.step)
        return state

    # ------------------------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Train to train.steps (resuming first when asked); a collective that fails on a hung or lost rank ends the
        run with one line naming distributed.timeout_s and where the other ranks were."""
        self.where.mark("resume and start-up")  # the watchdog counts idle time from here, not from the build
        with collectives_guarded(self.dist, self.cfg.distributed.timeout_s, self.where):
            return self._train()

    def _train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        state = self.resume(self._resume_from) if self._resume_from is not None else None
        if state is None and self.cfg.output.overwrite and self.dist.is_main:
            shutil.rmtree(checkpoints.checkpoints_dir(self.output_dir), ignore_errors=True)
        (self.output_dir / "config.toml").write_text(to_toml(self.cfg))
        self.log.open(self.step if state is not None else None, state.get("history_len") if state else None)
        first_step, t_start, last_ckpt, nan_run, spikes = self.step, time.perf_counter(), None, 0, SpikeMonitor()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="textcraftor", unit="step",
                   disable=not (cfg.progress_bar and self.dist.is_main), dynamic_ncols=True)
        # The handlers stay through the final save and export: a second Ctrl-C there also stops at once.
        with self.stop.installed():
            while self.step < cfg.steps and not self.stop.requested:
                metrics = self.train_step()
                self.step += 1
                self.where.mark(f"after step {self.step} (logging, evaluation, checkpoint)")
                nan_run = nan_run + 1 if metrics["skipped"] else 0
                self._report(metrics, nan_run, spikes)
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
            try:
                final = self.stage.export(self.output_dir, write=self.dist.is_main)
            except OSError as e:  # e.g. disk full: say what is safe and how to finish
                raise OSError(e.errno, f"writing the run's final weights into '{self.output_dir}' failed "
                              f"({e.strerror or e}); the last checkpoint '{last_ckpt}' is intact and any earlier "
                              "export there is as it was: free space, then `textcraftor-fast export` that "
                              "checkpoint, or run again with --resume latest") from e
        samples = (self.step - first_step) * cfg.batch_size * cfg.gradient_accumulation_steps * self.dist.world_size
        summary = self.log.summary(self.step, first_step, samples, time.perf_counter() - t_start, self.device)
        return TrainResult(last_ckpt, final.get("text_encoder"), self.output_dir, self.step, list(self.log.history),
                           summary, unet=final.get("unet"))

    def _report(self, metrics: dict[str, Any], nan_run: int, spikes: SpikeMonitor) -> None:
        """Warn about a skipped step or a loss spike; evaluate and log at the configured steps."""
        if metrics["skipped"]:
            logger.warning("Step %d: non-finite loss or gradients (loss %s), optimizer step skipped (%d in a row); "
                           "prompts: %s", self.step, metrics["loss"], nan_run, self.last_prompts)
        else:
            spikes.check(self.step, metrics["loss"], self.last_prompts)
        evaluated = self._evaluate(metrics)
        if self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps or evaluated:
            metrics.update(self.stage.monitor(lambda p: tokenize(self.tokenizer, p, self.device), self.probe_prompts))
            self.log.append(metrics, self.step)

    def _evaluate(self, metrics: dict[str, Any]) -> bool:
        """At every train.eval_every steps and the last: evaluate on rank 0 into `metrics`; True if it ran."""
        every = self.cfg.train.eval_every
        if self.evaluator is None or not (self.step % every == 0 or self.step == self.cfg.train.steps):
            return False
        self.where.mark(f"evaluation at step {self.step}")
        if self.dist.is_main:
            found, grid = self.evaluator(*self.stage.evaluated())
            metrics.update(found)
            self.log.image_grid("eval/original_vs_tuned", grid, self.step, rows=2)
            logger.info("Step %d evaluation: %s", self.step, ", ".join(
                f"{k} {v:+.4f}" for k, v in found.items() if k.endswith("_diff")))
        barrier(self.dist)
        return True

    def close(self) -> None:
        self.log.close()
        shutdown(self.dist)


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune the text encoder (or the UNet: train.stage) as `config` says; returns the checkpoint, the final
    encoder and/or UNet, and the metrics."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
