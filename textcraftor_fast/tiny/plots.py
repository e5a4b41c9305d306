"""Figures of the tiny-world demo: the interpolation grid, the reward curves and the target attribute's accuracy per
held-out pair (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..reporting.figures import pyplot as _plt
from ..reporting.figures import save_grid  # noqa: F401 (the demo's grid)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def save_reward_curve(histories: dict[str, list[dict[str, Any]]], path: str | Path,
                      reward_key: str = "reward") -> Path:
    """Training reward (raw and 10-step mean) and the collapse monitor (emb_cos, drift) per run."""
    plt = _plt()
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (name, hist), colour in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        steps = [h["step"] for h in hist]
        reward = [h[reward_key] for h in hist]
        ax_r.plot(steps, reward, color=colour, alpha=0.25, lw=0.8)
        ax_r.plot(steps, _smooth(reward), color=colour, lw=1.8, label=f"{name} (10-step mean)")
        if hist and "emb_cos" in hist[0]:
            ax_c.plot(steps, [h["emb_cos"] for h in hist], color=colour, lw=1.5, label=f"{name}: emb cos")
            ax_c.plot(steps, [h["drift"] for h in hist], color=colour, lw=1.2, ls="--", label=f"{name}: weight drift")
    ax_r.set_xlabel("optimizer step")
    ax_r.set_ylabel("training reward (batch mean)")
    ax_r.set_title("reward on training prompts")
    ax_r.legend(fontsize=8)
    ax_c.set_xlabel("optimizer step")
    ax_c.set_title("collapse monitor: mean pairwise cosine / ||dθ||/||θ||")
    ax_c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_pair_chart(pairs_by_arm: dict[str, dict[str, dict]], path: str | Path, what: str = "held-out",
                    attribute: str = "shape") -> Path:
    """`attribute` accuracy per colour-shape pair, the original encoder beside each tuned one, with 95% Wilson
    intervals on the per-pair counts. `pairs_by_arm[arm]` is evaluate.pair_breakdown's result for that arm (every
    arm's 'before' is the same original encoder). The pairs are listed in the PNG's 'Description' text."""
    from .data import ATTRIBUTES
    from .evaluate import wilson_interval

    plt = _plt()
    first = next(iter(pairs_by_arm.values()))
    names = list(first)
    series = {"original": [first[p]["before"] for p in names]}
    series.update({arm: [pairs[p]["after"] for p in names] for arm, pairs in pairs_by_arm.items()})
    counts = [first[p]["n"] for p in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 3.8))
    width = 0.8 / len(series)
    colours = ("tab:gray", "tab:blue", "tab:orange", "tab:green")
    for j, ((label, values), colour) in enumerate(zip(series.items(), colours)):
        # Counts are exact: a pair's accuracy is k / n of 0/1 samples.
        ci = [wilson_interval(round(v * n), n) for v, n in zip(values, counts)]
        x = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        yerr = [[v - lo for v, (lo, _) in zip(values, ci)], [hi - v for v, (_, hi) in zip(values, ci)]]
        ax.errorbar(x, values, yerr=yerr, fmt="o", ms=5, capsize=3, lw=1.5, color=colour, label=label)
    chance = 1 / len(ATTRIBUTES[attribute])
    ax.axhline(chance, color="black", lw=0.8, ls=":", label=f"chance ({chance:.2f})")
    ax.set_xticks(range(len(names)), [f"{p}\n(n = {n})" for p, n in zip(names, counts)], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"{attribute} accuracy (judge)")
    ax.set_title(f"{attribute.capitalize()} per {what} pair, before and after tuning (95% Wilson intervals)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Description": "pairs: " + "; ".join(names)})
    plt.close(fig)
    return Path(path)


def pick_grid_rows(prompts: list[str], n: int = 6) -> list[int]:
    """Indices of the first sample of up to n distinct prompts (evenly spread over the distinct ones)."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    idx = list(first.values())
    step = max(1, len(idx) // n)
    return idx[::step][:n]


def stack_rows(images: Tensor, rows: list[int]) -> Tensor:
    return torch.stack([images[i] for i in rows])
