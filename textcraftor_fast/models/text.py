"""Prompts -> token ids -> the UNet's text conditioning: the one implementation the trainer, evaluation, generation
and the tiny world share.

SD1.5 and SD2.x condition on the text encoder's last hidden state of the ids padded (SD1.5's tokenizer pads with its
end token, SD2's with "!") or truncated to the tokenizer's length (77), as diffusers' `StableDiffusionPipeline.
encode_prompt` does; SDXL on its two encoders' packed conditioning (models/conditioner.py), from (B, 2, 77) ids.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .conditioner import unwrap, zeroes_empty_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device | None = None) -> Tensor:
    """(B, L) token ids (SDXL's PairTokenizer: (B, 2, L)), padded to the tokenizer's model_max_length and truncated
    to it."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)


def encode(encoder: nn.Module, ids: Tensor) -> Tensor:
    """(B, L, D) last hidden state of `ids`, in the caller's grad mode (any module returning a transformers
    CLIP encoder's output tuple: the encoder itself, SDXL's conditioner, or a DDP/DeepSpeed engine around them)."""
    return encoder(ids)[0]


def encode_prompts(encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> Tensor:
    """(B, L, D) conditioning of `prompts`, on the encoder's device, in the caller's grad mode."""
    return encode(encoder, tokenize(tokenizer, prompts, next(encoder.parameters()).device))


def encode_empty(encoder: nn.Module, ids: Tensor) -> Tensor:
    """(1, L, D) the unconditional embedding from the empty prompt's `ids`: its encoding, or zeros where the model
    sets force_zeros_for_empty_prompt (SDXL base), as the pipeline builds it for an empty negative prompt."""
    if zeroes_empty_prompt(encoder):
        return unwrap(encoder).empty(ids.shape[0])
    return encode(encoder, ids)


def encode_empty_prompt(encoder: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """`encode_empty` of the prompt ''."""
    return encode_empty(encoder, tokenize(tokenizer, [""], next(encoder.parameters()).device))
