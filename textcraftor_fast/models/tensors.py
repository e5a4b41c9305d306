"""State dicts made ready for safetensors, shared by every writer (export layouts, UNet LoRAs)."""
from __future__ import annotations

from collections.abc import Mapping

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
