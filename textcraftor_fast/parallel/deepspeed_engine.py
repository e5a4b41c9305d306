"""DeepSpeed for the trainable text encoder only (distributed.backend='deepspeed'): the config dict, made
from our config tree in one function, the process group, and a small engine wrapper.

What DeepSpeed owns: gradient averaging over ranks, gradient accumulation, clipping and the optimizer step
of the text encoder, with the optimizer state (ZeRO-1) and gradients (ZeRO-2) sharded over ranks. What it
does not: the frozen UNet, VAE, original encoder and reward towers stay plain replicated modules.

Design choices and their reasons:
- the optimizer is ours (torch AdamW or bitsandbytes), passed as DeepSpeed's client optimizer: an
  "optimizer" section in the DeepSpeed config would JIT-compile DeepSpeed's CPU Adam (~65 s) and change
  the update rule;
- the encoder keeps fp32 weights and runs under our autocast, as without DeepSpeed, so `bf16` stays off in
  the DeepSpeed config (its bf16 mode stores bf16 weights) and ZeRO-2 results equal a single process's;
- checkpoints hold the optimizer state in torch's per-parameter format, gathered from the shards
  (`full_optimizer_state`): the same file a single process writes, so a run resumes on any rank count,
  with or without DeepSpeed.
DeepSpeed is imported lazily: the package and single-process training work without it.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DistributedConfig, TrainConfig
from ..memory.saved_bytes import optimizer_state_bytes

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'textcraftor-fast[deepspeed]'"


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ImportError(f"distributed.backend='deepspeed' needs DeepSpeed: {_INSTALL_HINT} (or use "
                          "distributed.backend='ddp' under torchrun)") from None
    return deepspeed


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for `cfg` on `world_size` ranks: the only place one is written."""
    loop, o, d = cfg.train, cfg.optim, cfg.distributed
    return {
        "train_micro_batch_size_per_gpu": loop.batch_size,
        "gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "train_batch_size": loop.batch_size * loop.gradient_accumulation_steps * world_size,
        "gradient_clipping": o.max_grad_norm or 0.0,  # 0 = off in DeepSpeed, as None is in ours
        # fp32 master weights in the engine; mixed precision is our autocast around the forward.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # Gradients are averaged in fp32 so results match a single process (and the 'ddp' backend).
        "communication_data_type": "fp32",
        "zero_optimization": {"stage": d.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        # bitsandbytes optimizers are outside ZeRO's tested list; torch AdamW is on it.
        "zero_allow_untested_optimizer": o.name != "adamw",
        "steps_per_print": 2**31 - 1,  # our log says what matters; DeepSpeed's own line per N steps is noise
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(cfg: DistributedConfig, device_type: str, world_size: int) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU) with the configured timeout.

    One process without a launcher gets a private single-rank group, so `backend='deepspeed'` also runs
    (and resumes multi-rank checkpoints) on one device."""
    deepspeed = import_deepspeed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if "MASTER_ADDR" not in os.environ:
        # No launcher: DeepSpeed still reads the launcher's variables (LOCAL_RANK is asserted in
        # deepspeed.initialize), so give it those of a one-rank job on a free local port.
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port())}
        for key, value in env.items():
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    logger.info("Initialised process group through DeepSpeed: backend=%s world_size=%d timeout=%ds", backend,
                world_size, cfg.timeout_s)


class DeepSpeedEncoder:
    """The trainable text encoder and its optimizer behind a DeepSpeed engine.

    `encoder` stays the plain module (ZeRO <= 2 keeps full weights on every rank), so the evaluator,
    the collapse monitor and exports read it directly; training calls `engine` (the forward), then
    `backward_and_step` once per micro-batch (DeepSpeed steps at the accumulation boundary)."""

    def __init__(self, encoder: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 world_size: int) -> None:
        deepspeed = import_deepspeed()
        self.encoder, self.optimizer = encoder, optimizer
        self.zero_stage = cfg.distributed.zero_stage
        # ZeRO-1/2 replace the optimizer's param groups by flat partitions: keep the per-parameter order
        # (torch's state-dict indices) to gather and scatter state by parameter.
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        self.config = deepspeed_config(cfg, world_size)
        self.engine, *_ = deepspeed.initialize(model=encoder, optimizer=optimizer, config=self.config)
        self._grad_norm = float("nan")
        logger.info("Applied DeepSpeed to the text encoder: ZeRO stage %d, %d ranks, client optimizer %s",
                    self.zero_stage, world_size, type(optimizer).__name__)

    # -------------------------------------------------------------------------------------------- training
    def backward_and_step(self, loss: Tensor) -> None:
        """Backward one micro-batch's (unscaled) loss; DeepSpeed divides by the accumulation steps, and at the
        boundary averages gradients over ranks, clips and steps the optimizer."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if boundary and self.zero_stage == 0:
            # Stage 0 reports no norm when clipping is off; its gradients are whole and averaged here.
            grads = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
            self._grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        self.engine.step()
        if boundary and self.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else float("nan")

    @property
    def grad_norm(self) -> float:
        """The global gradient norm (before clipping) of the last optimizer step."""
        return self._grad_norm

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (ZeRO-1/2: its partition only)."""
        return optimizer_state_bytes(self.optimizer)

    # ------------------------------------------------------------------------------------- state (collective)
    def full_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state in torch's per-parameter state-dict format, whole on every rank.

        A collective under ZeRO-1/2 (every rank must call it): each parameter's state is all-reduced from
        the shards that hold its pieces. Stage 0 holds it whole already."""
        if self.zero_stage == 0:
            return self.optimizer.state_dict()
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_state()
        base_state = next(iter(self.optimizer.state.values()), None)
        keys = [k for k, v in (base_state or {}).items() if torch.is_tensor(v) and v.dim() > 0]
        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self.params):
            if base_state is None:
                break  # before the first step: no state yet, as torch's own state dict
            entry = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
            state[i] = {"step": base_state["step"].detach().cpu().clone(), **entry}
        return {"state": state, "param_groups": self._param_groups()}

    def _link_state(self) -> None:
        """Point every parameter's ZeRO fragment at its slice of the optimizer state. DeepSpeed 0.19.8 links
        once, right after stepping the FIRST param group (stage_1_and_2.py `_optimizer_step`), before the
        other groups have state, so our no-decay group's parameters would have no state to gather."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.engine.optimizer
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            if flat in self.optimizer.state:
                lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, self.optimizer.state)

    def _param_groups(self) -> list[dict[str, Any]]:
        groups, start = [], 0
        for group, n in zip(self.optimizer.param_groups, self.group_sizes):
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return groups

    def load_full_optimizer_state(self, state_dict: dict[str, Any]) -> None:
        """Load a per-parameter optimizer state (from any rank count, or a run without DeepSpeed), after
        the encoder's weights were loaded into the module. Every rank calls it with the same state."""
        if self.zero_stage == 0:
            self.optimizer.load_state_dict(state_dict)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.engine.optimizer
        # ZeRO keeps its own fp32 copy of this rank's weight partition: refresh it from the loaded module.
        for p in self.params:
            safe_set_full_fp32_param(p, p.detach())
        saved = state_dict["state"]
        if saved:
            steps = {float(s["step"]) for s in saved.values()}
            if len(steps) != 1:
                raise ValueError(f"optimizer state has per-parameter step counts {sorted(steps)}; ZeRO keeps one "
                                 "per partition and cannot load it")
            step = steps.pop()
            keys = [k for k, v in next(iter(saved.values())).items() if k != "step" and torch.is_tensor(v)]
            # Torch creates AdamW state lazily at the first step; create it now so it can be filled.
            for flat in zero.single_partition_of_fp32_groups:
                self.optimizer.state[flat] = {"step": torch.tensor(step, dtype=torch.float32, device=flat.device),
                                              **{k: torch.zeros_like(flat) for k in keys}}
            self._link_state()
            for i, p in enumerate(self.params):
                for k in keys:
                    safe_set_full_optimizer_state(p, saved[i][k].to(p.device, torch.float32), k)
        for group, saved_group in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

