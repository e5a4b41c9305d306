"""Weights & Biases logging (output.report_to = "wandb", alone or in a list): every logged metric under the
TensorBoard reporter's tags, the config, and the picture grid at each evaluation, in a run under output.dir/wandb
named after output.dir's folder. WANDB_MODE=offline keeps the run on disk and off the network (`wandb sync
output.dir/wandb/offline-run-*` uploads it later). A resumed session is a new W&B run that continues the step
count. Only rank 0 opens a run (training/run_log.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from .images import to_pil
from .tensorboard import scalar_tags, tile

logger = logging.getLogger(__name__)

MISSING = ("output.report_to = 'wandb' needs the wandb package: pip install 'textcraftor-fast[wandb]' (or leave "
           "'wandb' out of output.report_to)")


class WandbWriter:
    """One W&B run: `config` (the run's config as a dict) as its config, scalars and image grids at their steps."""

    def __init__(self, output_dir: str | Path, config: dict[str, Any], project: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(MISSING) from None
        self.wandb = wandb
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # reinit='create_new': a run of ours never finishes, or logs into, a run the caller has open.
        self.run = wandb.init(project=project, name=output_dir.resolve().name, dir=str(output_dir), config=config,
                              reinit="create_new")
        logger.info("W&B run %s in %s", self.run.name, self.run.dir)

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(scalar_tags(metrics), step=step)

    def image_grid(self, tag: str, images: Tensor, step: int, rows: int) -> None:
        """images (rows * n, 3, H, W) in [0, 1] as one picture with `rows` rows."""
        self.run.log({tag: self.wandb.Image(to_pil(tile(images, rows)))}, step=step)

    def close(self) -> None:
        self.run.finish()
