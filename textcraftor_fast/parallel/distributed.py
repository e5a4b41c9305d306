"""torchrun integration: rank discovery, the process group with a timeout, DDP around the trained module, metric
averaging and barriers.

Gradients are averaged by DDP (`wrap_ddp`), the library's all-reduce, bucketed and overlapped with backward.
It fits both stages: the text encoder runs once per micro-batch (cond and uncond in one call), and the UNet
stage's UNet, called K times with a graph (each call checkpointed, non-reentrant) before one backward,
still gets one gradient per parameter per backward, because autograd sums a leaf's uses before its
accumulation hook fires (tests/test_distributed.py trains both stages on two ranks). Under
distributed.backend='deepspeed' its engine averages instead (deepspeed_engine.py).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import DistributedConfig

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


def device_type(name: str) -> str:
    """'cuda' or 'cpu' for train.device ('auto': CUDA when visible); a RuntimeError for 'cuda' without a GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is visible; use train.device='cpu' or 'auto'")
    return name


def init_distributed(cfg: DistributedConfig, device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.backend == "deepspeed":  # DeepSpeed needs a process group even on one rank
        from .deepspeed_engine import init_process_group

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


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module | None:
    """`module` in DDP when launched on several ranks (None on one): calls through the wrapper average the
    gradients of `module`'s trained parameters over the ranks in backward. Buffers are not broadcast at each call
    (they are constants here: position ids, the frozen parts' statistics)."""
    if not info.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    logger.info("Applied DDP to the %s: gradients averaged over %d ranks", type(module).__name__, info.world_size)
    return wrapped


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
