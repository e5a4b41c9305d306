"""Optimizers for the text encoder: torch AdamW (fused where the device supports it) or bitsandbytes 8-bit AdamW
(plain or paged)."""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch import nn

from ..config import OptimConfig

logger = logging.getLogger(__name__)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm gains: the usual AdamW practice (the official code decays everything;
    # at lr 1e-6 the difference is negligible, but decaying LayerNorm gains is never what one wants).
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # fused AdamW is one kernel per step on CUDA and ~28x faster than the for-loop version on CPU.
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        logger.info("Optimizer: torch AdamW (fused), lr=%g, weight_decay=%g", cfg.lr, cfg.weight_decay)
        return opt
    if cfg.name in _BNB_OPTIMIZERS:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(f"optim.name={cfg.name!r} needs bitsandbytes >= 0.50 (8-bit optimizers on CPU too): "
                              "pip install 'textcraftor-fast[bnb]'") from None
        cls = getattr(bnb.optim, _BNB_OPTIMIZERS[cfg.name])
        logger.info("Optimizer: bitsandbytes %s, lr=%g, weight_decay=%g", cls.__name__, cfg.lr, cfg.weight_decay)
        return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    raise ValueError(f"optim.name={cfg.name!r} is not one of 'adamw', {', '.join(map(repr, _BNB_OPTIMIZERS))}")


# optim.name -> bitsandbytes.optim class: both keep blockwise 8-bit moments (state1/state2 uint8 + absmax per
# block of 256), saved by state_dict() as plain tensors, so checkpoints load with weights_only=True.
_BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based): linear warm-up over `warmup_steps`,
    then 1 ('constant') or a half cosine from 1 at the end of warm-up to 0 at `total_steps` ('cosine')."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"optim.lr_schedule={schedule!r} is not one of 'constant', 'cosine'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().float().abs().max() for g in grads])).all())
