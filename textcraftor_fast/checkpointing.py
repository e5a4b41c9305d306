"""Resumable checkpoints, written atomically: a run is never lost to a crash mid-save.

A checkpoint is a folder `checkpoints/step-000123/` holding
  text_encoder/        the tuned encoder (diffusers layout: config.json + model.safetensors), drop-in
  optimizer.pt         optimizer state
  rng.pt               torch CPU/CUDA RNG and the sampler's generator state
  state.json           step, data cursor, metrics offset
  config.toml          the config that produced it
It is written under a temporary name and renamed into place, so a folder named step-* is always complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """'latest' -> newest step-* under output_dir/checkpoints; otherwise a checkpoint folder path."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume 'latest': no checkpoint under '{checkpoints_dir(output_dir)}'; "
                                    "train first or pass a checkpoint folder")
        return found[-1]
    path = Path(spec)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume: '{path}' is not a checkpoint folder (expected {path}/state.json); pass a "
                                f"folder like {checkpoints_dir(output_dir)}/step-000010 or 'latest'")
    return path


def save_checkpoint(output_dir: str | Path, step: int, text_encoder: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rng: dict[str, Any], state: dict[str, Any],
                    config_toml: str, keep: int | None) -> Path:
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    from .models import export_text_encoder

    export_text_encoder(text_encoder, tmp / "text_encoder", layout="diffusers")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    (tmp / "config.toml").write_text(config_toml)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("Saved checkpoint %s", final)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, text_encoder: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights (strict) and optimizer state in place; return (state, rng)."""
    from safetensors.torch import load_file

    from .models.keymap import clip_state_dict_any_layout

    weights = path / "text_encoder" / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' has no text encoder weights at '{weights}'")
    result = text_encoder.load_state_dict(clip_state_dict_any_layout(load_file(str(weights))), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint '{weights}' does not match the text encoder: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False) if (path / "rng.pt").is_file() else {}
    state = json.loads((path / "state.json").read_text())
    return state, rng
