"""Figures (matplotlib, Agg backend, imported only when a picture is drawn): labelled image grids and
metric curves with 95% intervals."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import Tensor


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(columns: Sequence[Tensor], column_titles: Sequence[str], row_titles: Sequence[str],
              path: str | Path) -> Path:
    """columns[j] (R, 3, H, W) in [0, 1] -> an R x C image grid with titles, saved as PNG."""
    plt = pyplot()
    rows, cols = len(row_titles), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols + 2.2, 1.5 * rows), squeeze=False)
    for j, (col, title) in enumerate(zip(columns, column_titles)):
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(col[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(row_titles[i], fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_curves(panels: dict[str, dict[str, tuple[list[float], list[float], list[float]]]], xlabel: str,
                path: str | Path, title: str = "") -> Path:
    """One panel per metric; in it one line per series with 95% error bars:
    panels[metric][series] = (x, mean, half_width)."""
    plt = pyplot()
    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (metric, series) in zip(axes.flat, panels.items()):
        for label, (x, mean, hw) in series.items():
            ax.errorbar(x, mean, yerr=hw, marker="o", ms=4, capsize=3, lw=1.5, label=label)
        ax.set_xlabel(xlabel)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
