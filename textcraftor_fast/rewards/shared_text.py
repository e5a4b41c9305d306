"""One copy of a CLIP text transformer that a reward tower and the frozen original text encoder both need.

SD1.5's text encoder is OpenAI CLIP ViT-L/14's text transformer, so a ViT-L/14 reward tower (CLIP score, an
aesthetic tower loaded with its text side) holds the same 123M parameters a second time: 0.46 GiB in fp32.
When the tower's text transformer has the encoder's architecture and, element for element, its weights (in the
dtype and on the device both run in), the tower uses the encoder's module and drops its own copy; its text
features are then bitwise what its own copy gave.

The comparison reads the tower's .safetensors files with plain reads, not through the tensors just loaded:
those are memory-mapped, and pages touched there stay resident for as long as the file's image half keeps the
mapping alive, so comparing through them would cost the memory the sharing saves. Towers from other
files (open_clip/OpenAI checkpoints, .bin) are compared in memory.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .clip_tower import ClipTower

logger = logging.getLogger(__name__)

# Config fields that change a CLIPTextTransformer's forward (eos_token_id picks the pooled token).
_FORWARD_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps", "eos_token_id",
                   "_attn_implementation")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsReader:
    """Tensors of .safetensors files read with plain file reads (into fresh memory, freed with the tensor)."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for key, meta in header.items():
                if key != "__metadata__":
                    self._where[key] = (path, 8 + n, meta)

    def get(self, key: str) -> Tensor | None:
        """The stored tensor `key`, or None when no file holds it (or in a dtype this reader does not know)."""
        if key not in self._where:
            return None
        path, base, meta = self._where[key]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            return None
        start, end = meta["data_offsets"]
        buf = bytearray(end - start)
        with open(path, "rb", buffering=0) as f:
            f.seek(base + start)
            if f.readinto(buf) != len(buf):
                return None  # a truncated file: the in-memory copy decides nothing either, so do not share
        if not buf:
            return torch.empty(meta["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    ca, cb = getattr(a, "config", None), getattr(b, "config", None)
    return (ca is not None and cb is not None and type(a) is type(b)
            and all(getattr(ca, f, None) == getattr(cb, f, None) for f in _FORWARD_FIELDS))


def _same_weights(tower_text: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                  stored: Callable[[str], Tensor | None]) -> bool:
    """Whether every parameter and buffer of `tower_text` equals the encoder's (`params`, `buffers`), in dtype, device
    and value; parameter values come from `stored(name)` (the file) when it has them, else from the tower's copy."""
    theirs = dict(tower_text.named_parameters())
    if theirs.keys() != params.keys():
        return False
    for name, p in params.items():
        q = theirs[name]
        if (q.shape, q.dtype, q.device) != (p.shape, p.dtype, p.device):
            return False
        on_disk = stored(name)
        value = q if on_disk is None else on_disk.to(device=q.device, dtype=q.dtype)  # as the loader cast it
        if value.shape != p.shape or not torch.equal(value, p):
            return False
    own_buffers = dict(tower_text.named_buffers())
    return own_buffers.keys() == buffers.keys() and all(
        own_buffers[k].shape == buffers[k].shape and torch.equal(own_buffers[k], buffers[k]) for k in buffers)


def _base_tensors(text: nn.Module) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """(the plain model, its parameters, its buffers) of `text`: itself, or the base of an adapted model that a
    wrapper runs with its adapters off (models.adapters.AdaptersDisabled: `base_tensors`)."""
    if hasattr(text, "base_tensors"):
        return text.base_tensors()
    return text, dict(text.named_parameters()), dict(text.named_buffers())


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def share_text_transformers(encoder: nn.Module, rewards: nn.Module) -> dict[str, int]:
    """Point every CLIP reward tower whose text transformer equals the (frozen) `encoder`'s at that module (a
    LoRA-adapted encoder: at the wrapper that runs it with its adapters off); returns {tower's module name: bytes of
    the copy it dropped}."""
    # transformers 5's CLIPTextModel is the transformer itself; 4.x wrapped it as `.text_model`.
    text = getattr(encoder, "text_model", encoder)
    model, params, buffers = _base_tensors(text)
    shared: dict[str, int] = {}
    for name, tower in rewards.named_modules():
        if not isinstance(tower, ClipTower) or not tower.has_text or tower.model.text_model is text:
            continue
        own = tower.model.text_model
        if not _same_architecture(own, model):
            continue
        reader = SafetensorsReader(tower.weight_files)
        if not _same_weights(own, params, buffers, lambda n: reader.get(f"text_model.{n}")):
            logger.info("Reward tower %s: its text transformer is not the original encoder's (weights differ); "
                        "both copies kept", name or "0")
            continue
        shared[name] = _nbytes(own)
        tower.model.text_model = text
        logger.info("Reward tower %s shares the original text encoder's transformer (equal weights): %.0f MiB "
                    "not held twice", name or "0", shared[name] / 2**20)
    return shared
