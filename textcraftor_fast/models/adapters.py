"""What every LoRA-adapted model shares, a UNet's (lora.py) or a text encoder's (encoder_lora.py): the peft import,
switching the adapters off for the base model without a copy (`AdaptersDisabled`), the diffusers LoRA file and
which models it adapts, and the drift monitor."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: what load_lora_weights looks for
ADAPTER = "default"
INSTALL_HINT = "pip install 'textcraftor-fast[lora]'"


def require_peft(what: str):
    """The peft module, or an ImportError that says which feature needs it and how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"{what} needs the peft package: {INSTALL_HINT} (or pip install peft)") from None
    return peft


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """Every peft adapter layer of `module` (LoRA's linear and conv layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run the block as the base model: the peft `layers` (`tuner_layers`) switched off, and back on afterwards
    (peft's `enable_adapters`, which also gives the active adapters back the requires_grad that disabling cleared)."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersDisabled(nn.Module):
    """The base model of a LoRA-adapted one (a UNet or a text encoder), without a copy: calls run with the
    adapters switched off. The adapters are back on when a call returns, so a checkpointed layer of the adapted
    model that recomputes in backward recomputes with them (tests/models/test_encoder_lora.py)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._layers = tuner_layers(model)

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._layers):
            return self.model(*args, **kwargs)

    def base_tensors(self) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the adapted model, its base parameters under the plain model's names, its buffers): what this wrapper
        computes with, for comparing it with a plain copy (rewards/shared_text.py)."""
        params = {name.replace(".base_layer.", "."): p for name, p in self.model.named_parameters()
                  if ".lora_" not in name}
        return self.model, params, dict(self.model.named_buffers())


def lora_file(path: Path) -> Path | None:
    """The LoRA file `path` names: itself, or its pytorch_lora_weights.safetensors; None when there is none."""
    candidate = path / LORA_WEIGHTS if path.is_dir() else path
    return candidate if candidate.is_file() and candidate.name == LORA_WEIGHTS else None


def lora_parts(path: Path) -> set[str]:
    """Which models a LoRA file adapts ({'unet', 'text_encoder'}: its key prefixes); empty when `path` is none."""
    from safetensors import safe_open

    file = lora_file(path)
    if file is None:
        return set()
    with safe_open(str(file), framework="pt") as f:
        return {key.split(".", 1)[0] for key in f.keys()}


@torch.no_grad()
def lora_drift(model: nn.Module) -> float:
    """||sum of LoRA updates|| / ||adapted base weights|| over every adapted layer (Frobenius norms): how far the
    adapted model has moved from its base, on the same scale as a fully tuned encoder's weight drift."""
    from peft.tuners.lora import LoraLayer

    num = den = 0.0
    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            delta = module.get_delta_weight(ADAPTER).float()
            num += float(delta.pow(2).sum())
            den += float(module.get_base_layer().weight.float().pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5
