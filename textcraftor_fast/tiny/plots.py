"""Figures of the tiny-world demo: the interpolation grid and the reward curves (matplotlib, Agg backend)."""
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
