"""TensorBoard logging (output.report_to = "tensorboard"): every logged metric as a scalar, picture grids at
evaluations. metrics.jsonl is written by the engine in every mode but 'none' (resume reads it back)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)


def tile(images: Tensor, rows: int) -> Tensor:
    """(rows * n, C, H, W) -> (C, rows * H, n * W): row r holds images r*n ... r*n + n - 1."""
    count, c, h, w = images.shape
    if count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows")
    n = count // rows
    return images.reshape(rows, n, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, n * w).clamp(0, 1)


def scalar_tags(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line under their logged tags: 'loss' -> 'train/loss', 'eval/reward' kept."""
    return {key if "/" in key else f"train/{key}": value for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


class TensorBoardWriter:
    """Scalars and images under `log_dir`; `purge_step` (a resumed run's step) drops events logged past it by the
    run that stopped, so a resumed curve has no doubled tail."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("output.report_to = 'tensorboard' needs the tensorboard package: pip install "
                              "'textcraftor-fast[tensorboard]' (or set output.report_to = 'jsonl')") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        logger.info("TensorBoard event files in %s (tensorboard --logdir %s)", log_dir, log_dir)

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        for tag, value in scalar_tags(metrics).items():
            self.writer.add_scalar(tag, value, step)

    def image_grid(self, tag: str, images: Tensor, step: int, rows: int) -> None:
        """images (rows * n, 3, H, W) in [0, 1] as one picture with `rows` rows."""
        self.writer.add_image(tag, tile(images, rows), step, dataformats="CHW")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
