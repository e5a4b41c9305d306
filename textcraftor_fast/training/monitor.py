"""What the run log watches. Collapse: reward fine-tuning of a text encoder can map every prompt to one
embedding (reward goes up, prompt adherence goes away); two cheap numbers catch it early:
  emb_cos  mean pairwise cosine of the probe prompts' pooled embeddings (rises towards 1 on collapse),
  drift    ||theta - theta_0|| / ||theta_0|| over all encoder weights (encoder LoRA: ||sum of the adapters'
           updates|| / ||adapted base weights||, models.adapters.lora_drift).
Spikes: a loss far from its running statistics, named with the prompts that caused it (`SpikeMonitor`).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..models.text import encode

logger = logging.getLogger(__name__)


def mean_pairwise_cosine(emb: Tensor) -> float:
    """emb (N, L, D) -> mean cosine over distinct pairs of the token-mean embeddings."""
    pooled = nn.functional.normalize(emb.float().mean(1), dim=-1)  # (N, D)
    n = pooled.shape[0]
    if n < 2:
        return float("nan")
    sim = pooled @ pooled.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def weight_drift(model: nn.Module, reference: nn.Module) -> float:
    num = den = 0.0
    for p, p0 in zip(model.parameters(), reference.parameters()):
        num += float((p.float() - p0.float()).pow(2).sum())
        den += float(p0.float().pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


@torch.no_grad()
def embedding_monitor(encoder: nn.Module, original: nn.Module, tokenize: Callable[[list[str]], Tensor],
                      prompts: list[str], drift: float) -> dict[str, float]:
    """emb_cos of the tuned and the original encoder on `prompts`, and the stage's weight `drift`."""
    ids = tokenize(prompts)
    was_training = encoder.training
    encoder.eval()
    tuned = encode(encoder, ids)
    encoder.train(was_training)
    return {"emb_cos": mean_pairwise_cosine(tuned), "emb_cos_orig": mean_pairwise_cosine(encode(original, ids)),
            "drift": drift}


class SpikeMonitor:
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
