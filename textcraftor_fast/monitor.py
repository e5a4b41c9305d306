"""Collapse monitor: reward fine-tuning of a text encoder can map every prompt to one embedding
(reward goes up, prompt adherence goes away). Two cheap numbers catch it early:
  emb_cos  mean pairwise cosine of the probe prompts' pooled embeddings (rises towards 1 on collapse),
  drift    ||theta - theta_0|| / ||theta_0|| over all encoder weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


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
                      prompts: list[str]) -> dict[str, float]:
    ids = tokenize(prompts)
    was_training = encoder.training
    encoder.eval()
    tuned = encoder(ids)[0]
    encoder.train(was_training)
    return {"emb_cos": mean_pairwise_cosine(tuned), "emb_cos_orig": mean_pairwise_cosine(original(ids)[0]),
            "drift": weight_drift(encoder, original)}
