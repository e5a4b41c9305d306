"""Prompts -> token ids -> the UNet's text conditioning: the one implementation the trainer, evaluation, generation
and the tiny world share.

SD1.5 conditions on the text encoder's last hidden state of the ids padded (SD1.5's tokenizer pads with its end
token) or truncated to the tokenizer's length (77), as diffusers' `StableDiffusionPipeline.encode_prompt` does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device | None = None) -> Tensor:
    """(B, L) token ids, padded to the tokenizer's model_max_length and truncated to it."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)


def encode(encoder: nn.Module, ids: Tensor) -> Tensor:
    """(B, L, D) last hidden state of `ids`, in the caller's grad mode (any module returning a transformers
    CLIP encoder's output tuple: the encoder itself, or a DDP/DeepSpeed engine around it)."""
    return encoder(ids)[0]


def encode_prompts(encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> Tensor:
    """(B, L, D) conditioning of `prompts`, on the encoder's device, in the caller's grad mode."""
    return encode(encoder, tokenize(tokenizer, prompts, next(encoder.parameters()).device))
