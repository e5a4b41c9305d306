"""State dicts to and from safetensors, shared by every writer (export layouts, LoRAs) and reader."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def to_saveable(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, floating tensors cast to `dtype` (None: kept)."""
    # safetensors needs contiguous CPU tensors that do not share storage: clone cuts views (e.g. the 1x1 VAE convs).
    out = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().clone()
    return out


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors; a truncated or foreign file is a ValueError naming the path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise ValueError(f"'{path}' is not a readable .safetensors file ({e}): it is truncated, corrupted or in "
                         "another format; re-download or re-export it") from None
