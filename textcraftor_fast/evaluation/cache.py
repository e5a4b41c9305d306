"""A resumable on-disk cache of an evaluation's per-sample scores, one file per (variant, batch).

A killed evaluation restarts where it stopped: every finished batch is a file written atomically (temporary
name, then rename), keyed by everything that determines its numbers (model, encoder weights, sampler
settings, rewards, prompts, seeds, batch). A changed setting gives a new key, never a stale reuse.
Only scores are cached (a few bytes per sample), plus uint8 pictures of the samples a grid shows.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights (every byte): two encoders share it only if they are identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ScoreCache:
    """Batches of per-sample scores under `folder/<variant key>/<first sample>.pt`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, key: str, start: int) -> Path:
        return self.folder / key / f"{start:07d}.pt"

    def load(self, key: str, start: int) -> dict[str, Tensor] | None:
        path = self._path(key, start)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn file cannot exist (atomic rename), but a disk error can: recompute it
            return None

    def save(self, key: str, start: int, scores: dict[str, Tensor]) -> None:
        path = self._path(key, start)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(scores, tmp)
        os.replace(tmp, path)

    def count(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.pt")) if self.folder.is_dir() else 0
