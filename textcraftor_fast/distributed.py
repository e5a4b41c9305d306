"""torchrun/DeepSpeed integration: rank discovery, process group with a timeout, gradient averaging, rank-0 I/O.

Gradients are averaged by hand (one all-reduce per step over a flat buffer) rather than by wrapping the
encoder in DDP: TextCraftor calls the encoder several times per step (cond, uncond, collapse probe),
which DDP's one-forward-one-backward contract does not allow without extra flags. Under
distributed.backend='deepspeed' the DeepSpeed engine averages instead (deepspeed_backend.py).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from .config import DistributedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistributedConfig, device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.backend == "deepspeed":  # DeepSpeed needs a process group even on one rank
        from .deepspeed_backend import init_process_group

        if not dist.is_initialized():
            init_process_group(cfg, device_type, world)
        return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if cfg.backend == "none" or world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        logger.info("Initialised process group: backend=%s world_size=%d timeout=%ds", backend, world, cfg.timeout_s)
    return info


def average_gradients(params: Iterable[torch.Tensor], info: DistInfo) -> None:
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
