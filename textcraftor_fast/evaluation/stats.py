"""Paired statistics: means with normal-approximation 95% intervals and paired before/after differences.

Every evaluation here is paired: sample k of two encoders shares its prompt and initial noise, so the
interval of the per-sample difference is far tighter than the difference of two independent means.
"""
from __future__ import annotations

import math

from torch import Tensor

Z95 = 1.96  # two-sided 95% normal quantile


def mean_ci(x: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval (0 for one sample)."""
    x = x.double()
    n = x.numel()
    sd = x.std().item() if n > 1 else 0.0
    return x.mean().item(), Z95 * sd / math.sqrt(max(n, 1))


def paired_diff(after: Tensor, before: Tensor) -> dict[str, float]:
    """Paired difference after - before: mean, 95% half-width, and the interval's ends."""
    m, h = mean_ci(after.double() - before.double())
    return {"diff": m, "half_width": h, "lo": m - h, "hi": m + h}


def compare_paired(before: dict[str, Tensor], after: dict[str, Tensor],
                   metrics: list[str]) -> dict[str, dict[str, float]]:
    """metric -> before/after means with 95% half-widths and the PAIRED difference with its interval."""
    if any(before[m].shape != after[m].shape for m in metrics):
        raise ValueError("paired comparison needs the same samples on both sides (shapes differ)")
    table = {}
    for name in metrics:
        b_m, b_h = mean_ci(before[name])
        a_m, a_h = mean_ci(after[name])
        table[name] = {"before": b_m, "before_hw": b_h, "after": a_m, "after_hw": a_h, "n": before[name].numel(),
                       **paired_diff(after[name], before[name])}
    return table


def is_monotone(values: list[float], tol: float = 0.0) -> bool:
    """Non-decreasing or non-increasing within `tol` (the interpolation curve's shape)."""
    steps = [b - a for a, b in zip(values, values[1:])]
    return all(s >= -tol for s in steps) or all(s <= tol for s in steps)
