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

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

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


# ------------------------------------------------------------------------------------ hung and lost ranks
# A collective that a rank never joins (stuck in compute, blocked outside any collective) or a rank that is gone (its
# process or node died) fails on the other ranks after distributed.timeout_s (gloo and NCCL) or at once when the
# connection closes. The library's error is many lines and names no culprit, so each rank also tells the launcher's
# key-value store where it is (`Whereabouts.mark`, a few bytes per step), and the error says which ranks were
# elsewhere when this one gave up.
_KEY = "textcraftor/where/{}"
_COMM_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "connection refused",
                 "socket closed", "peer", "gloo", "nccl")


class CollectiveFailure(RuntimeError):
    """A collective failed because another rank hung or left; the message is one line for the user."""


class Whereabouts:
    """Each rank's last reported place in the loop ('step 3: forward', 'checkpoint at step 2') and how many places it
    has reported, in the launcher's store: the rank with the fewest is the one the others wait for."""

    def __init__(self, info: DistInfo) -> None:
        self.info, self.store, self.last, self.count, self.since = info, None, "start-up", 0, time.monotonic()
        if info.enabled and dist.is_initialized():
            with contextlib.suppress(Exception):  # a private API: without it the errors just name no rank
                self.store = dist.distributed_c10d._get_default_store()

    def mark(self, where: str) -> None:
        self.last, self.count, self.since = where, self.count + 1, time.monotonic()
        if self.store is not None:
            self.store.set(_KEY.format(self.info.rank), f"{self.count}|{where}")

    def others(self) -> dict[int, tuple[int, str]]:
        """(count, place) of every other rank that has reported."""
        found: dict[int, tuple[int, str]] = {}
        if self.store is None:
            return found
        with contextlib.suppress(Exception):  # a dead store host must not turn the error into a hang
            self.store.set_timeout(datetime.timedelta(seconds=5))
        for rank in range(self.info.world_size):
            key = _KEY.format(rank)
            with contextlib.suppress(Exception):
                if rank != self.info.rank and self.store.check([key]):
                    count, _, place = self.store.get(key).decode().partition("|")
                    found[rank] = (int(count), place)
        return found


class Watchdog:
    """Ends this rank with one line when it has made no progress (no `Whereabouts.mark`) for longer than
    distributed.timeout_s: the process group's own timeout does not cover every wait (DeepSpeed's shared-memory
    all-reduce on CPU spins with none). A rank that is ahead of another (waiting for it) goes first; one that is
    behind or level (possibly the stuck one) waits `STUCK_GRACE_S` more, so the error comes from the ranks that
    waited and names the one they waited for."""

    STUCK_GRACE_S = 30.0

    def __init__(self, where: Whereabouts, timeout_s: int) -> None:
        self.where, self.timeout_s = where, timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="textcraftor-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.where.store is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            idle = time.monotonic() - self.where.since
            if idle <= self.timeout_s:
                continue
            others = self.where.others()
            ahead = any(count < self.where.count for count, _ in others.values())
            if not ahead and idle <= self.timeout_s + self.STUCK_GRACE_S:
                continue
            message = _failure_message(self.where.info, self.timeout_s, self.where, "no progress", others)
            sys.stderr.write(f"textcraftor-fast: error: {message}\n")
            sys.stderr.flush()
            os._exit(1)  # a thread cannot interrupt a collective; the launcher ends the other ranks


def _is_comm_failure(error: BaseException) -> bool:
    if isinstance(error, CollectiveFailure):
        return False
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(error, backend_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in _COMM_FAILURE)


@contextlib.contextmanager
def collectives_guarded(info: DistInfo, timeout_s: int, where: Whereabouts) -> Iterator[None]:
    """Turn a collective's failure (a hung or lost rank) into a one-line `CollectiveFailure` naming
    distributed.timeout_s and the ranks that were behind; everything else passes through unchanged. A `Watchdog`
    covers the waits that have no timeout of their own."""
    try:
        with Watchdog(where, timeout_s):
            yield
    except RuntimeError as e:
        if not info.enabled or not _is_comm_failure(e):
            raise
        raise CollectiveFailure(_failure_message(info, timeout_s, where, e, where.others())) from e


def _failure_message(info: DistInfo, timeout_s: int, where: Whereabouts, error: BaseException | str,
                     others: dict[int, tuple[int, str]]) -> str:
    text = str(error).strip()
    if error == "no progress":
        what = f"made no progress for longer than distributed.timeout_s={timeout_s} s"
    elif "timed out" in text.lower() or "timeout" in text.lower():
        what = f"waited longer than distributed.timeout_s={timeout_s} s for the other ranks"
    else:
        what = ("lost its connection to another rank (its process ended or its node went down; a hung rank is "
                f"given distributed.timeout_s={timeout_s} s)")
    behind = {rank: place for rank, (count, place) in others.items() if count < where.count}
    level = {rank: place for rank, (count, place) in others.items() if count >= where.count}
    silent = [rank for rank in range(info.world_size) if rank != info.rank and rank not in others]
    if behind:
        culprits = "; ".join(f"rank {rank} was still at '{place}'" for rank, place in sorted(behind.items()))
    elif silent:
        culprits = f"rank(s) {', '.join(map(str, silent))} never reported"
    else:
        culprits = "; ".join(f"rank {rank} was at '{place}'" for rank, place in sorted(level.items()))
    detail = f" [{text.splitlines()[0][:160]}]" if text and error != "no progress" else ""
    return (f"rank {info.rank}: at '{where.last}' this rank {what}; {culprits}{detail}. The newest complete "
            "checkpoint is intact: fix the rank or raise distributed.timeout_s, then run again with --resume latest")
