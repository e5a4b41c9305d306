"""The paired statistics of an evaluation table, computed here in plain Python from the per-sample scores, so the
tests do not check evaluation/stats.py against itself.

For n paired samples with d_k = after_k - before_k:
  diff = sum(d) / n,  sd = sqrt(sum((d_k - diff)^2) / (n - 1)),  half_width = 1.96 * sd / sqrt(n)
(the normal-approximation 95% interval, 1.96 the two-sided 95% quantile), lo/hi = diff -/+ half_width; the same
mean and half-width of `before` and of `after` alone give before/before_hw and after/after_hw.
"""
from __future__ import annotations

import math


def mean_and_half_width(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(n)


def paired_row(after, before) -> dict[str, float]:
    """One table row, from two sequences (or 1-d tensors) of per-sample scores in the same sample order."""
    a, b = [float(x) for x in after], [float(x) for x in before]
    assert len(a) == len(b) > 0
    diff, hw = mean_and_half_width([x - y for x, y in zip(a, b)])
    before_mean, before_hw = mean_and_half_width(b)
    after_mean, after_hw = mean_and_half_width(a)
    return {"n": len(a), "before": before_mean, "before_hw": before_hw, "after": after_mean, "after_hw": after_hw,
            "diff": diff, "half_width": hw, "lo": diff - hw, "hi": diff + hw}
