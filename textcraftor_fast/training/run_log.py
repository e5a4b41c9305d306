"""What a run returns (`TrainResult`) and reports: the run-summary block at start, metrics.jsonl (one line per
logged step; a resume reads it back and drops the lines past its step), TensorBoard and W&B scalars and grids
(output.report_to = "tensorboard", "wandb" or a list of them), and summary.json with the session's steps, samples/s,
peak memory and best evaluation. Only rank 0 writes."""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, OutputConfig, TrainConfig

logger = logging.getLogger(__name__)


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


def check_reporters(output: OutputConfig) -> None:
    """Every reporter's package is importable (checked on every rank before any model loads), or a ConfigError
    naming output.report_to and the extra that installs it."""
    for name in output.reporters:
        if name in ("tensorboard", "wandb") and importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'output.report_to': {name!r} needs the {name} package, which is not "
                              f"installed: pip install 'textcraftor-fast[{name}]' (or leave {name!r} out of "
                              "output.report_to)")


class RunLog:
    def __init__(self, output_dir: Path, cfg: TrainConfig, writes: bool) -> None:
        self.output_dir, self.cfg, self.writes = output_dir, cfg, writes
        self.reporters = cfg.output.reporters
        self.jsonl = writes and "none" not in self.reporters
        self.history: list[dict[str, Any]] = []
        self.writers: list[Any] = []  # TensorBoardWriter, WandbWriter: scalars, image_grid, close

    @staticmethod
    def setup(cfg, world_size: int, stage: str, trained: int, timesteps: list[int], num_prompts: int,
              device: torch.device) -> None:
        """The run-summary block at start, in the diffusers training scripts' words."""
        s, loop = cfg.sampler, cfg.train
        logger.info("***** Running TextCraftor *****")
        logger.info("  Num prompts = %d", num_prompts)
        logger.info("  Instantaneous batch size per device = %d", loop.batch_size)
        logger.info("  Total train batch size (w. parallel, distributed & accumulation) = %d",
                    loop.batch_size * world_size * loop.gradient_accumulation_steps)
        logger.info("  Gradient accumulation steps = %d", loop.gradient_accumulation_steps)
        logger.info("  Total optimization steps = %d", loop.steps)
        logger.info("  Trainable (%s) parameters = %s", stage, f"{trained:,}")
        logger.info("  Sampler: DDIM %d steps %s (t=%s..%s), CFG %.2f, K=%d%s, switch step %d, checkpoint=%s",
                    s.num_steps, s.timestep_spacing, timesteps[0], timesteps[-1], s.guidance_scale, s.grad_steps,
                    " (random)" if s.random_grad_steps else "", s.effective_switch_step, s.checkpoint)
        logger.info("  Device = %s, mixed precision = %s", device, loop.mixed_precision)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def open(self, resumed_at: int | None, history_len: int | None) -> None:
        """Start this session's log: the history of a resumed run up to its checkpoint (`history_len` lines, or
        `resumed_at` steps), metrics.jsonl rewritten to match, TensorBoard and W&B opened when asked for."""
        if resumed_at is not None:
            self.history = self.read()[: history_len if history_len is not None else resumed_at]
        if self.jsonl:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(m) + "\n" for m in self.history))
            tmp.replace(self.metrics_path)
        if self.writes and "tensorboard" in self.reporters:
            from ..reporting.tensorboard import TensorBoardWriter

            self.writers.append(TensorBoardWriter(self.output_dir / "tensorboard",
                                                  purge_step=resumed_at + 1 if resumed_at is not None else None))
        if self.writes and "wandb" in self.reporters:
            from ..reporting.wandb import WandbWriter

            self.writers.append(WandbWriter(self.output_dir, self.cfg.to_dict(), self.cfg.output.wandb_project))

    def read(self) -> list[dict[str, Any]]:
        p = self.metrics_path
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []

    def append(self, metrics: dict[str, Any], step: int) -> None:
        # One appended line per logged step: rewriting the file every step would be quadratic over a run.
        self.history.append(metrics)
        if self.jsonl:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        for writer in self.writers:
            writer.scalars(metrics, step)

    def image_grid(self, tag: str, grid, step: int, rows: int) -> None:
        for writer in self.writers:
            writer.image_grid(tag, grid, step, rows=rows)

    def summary(self, steps: int, first_step: int, samples: int, seconds: float,
                device: torch.device) -> dict[str, Any]:
        """What this session did, logged and written to output_dir/summary.json."""
        if device.type == "cuda":
            peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            import resource

            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
        evals = [h for h in self.history if "eval/reward" in h]
        best = max(evals, key=lambda h: h["eval/reward"]) if evals else None
        summary = {"steps": steps, "steps_this_session": steps - first_step, "seconds": round(seconds, 2),
                   "samples_per_second": samples / seconds if seconds > 0 else None,
                   "peak_memory_gb": round(peak_gb, 3),
                   "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process max RSS",
                   "best_eval": {"step": best["step"], "eval/reward": best["eval/reward"],
                                 "eval/reward_diff": best["eval/reward_diff"]} if best else None}
        logger.info("***** Run summary *****")
        logger.info("  Steps = %d (%d this session) in %.1f s, %.3f samples/s", steps, steps - first_step, seconds,
                    summary["samples_per_second"] or 0.0)
        logger.info("  Peak memory = %.2f GB (%s)", peak_gb, summary["peak_memory_kind"])
        if best:
            logger.info("  Best evaluation: step %d, eval/reward %.4f (%+.4f vs the original)", best["step"],
                        best["eval/reward"], best["eval/reward_diff"])
        if self.writes:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        while self.writers:
            self.writers.pop().close()
