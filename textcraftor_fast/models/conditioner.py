"""SDXL's text conditioning as ONE module and ONE tensor, so that the engine's SD1.5 machinery carries it unchanged.

SDXL (diffusers' `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`, the reference) conditions the UNet
on three things: the concatenated penultimate hidden states of its two encoders (B, 77, 768 + 1280), the pooled
`text_embeds` of encoder 2 (B, 1280) and six micro-conditioning "time ids" (original size, crop top-left, target
size), the last two through `added_cond_kwargs`. The engine's sampler, checkpointing, DDP/DeepSpeed wrapping,
embedding interpolation, anchors and monitors all handle one (B, L, D) embedding per branch. So the conditioner
packs the pooled embedding and the time ids into one extra row of that tensor:

    packed[:, :77]  = cat(encoder 1 hidden_states[-2], encoder 2 hidden_states[-2])   (B, 77, 2048)
    packed[:, 77]   = [pooled (1280) | time ids (6) | zeros]                            (B, 2048)

and `unet_inputs` unpacks it at the UNet call. The packing is exact (a concatenation, no arithmetic), so the
trajectory equals the stock pipeline's (tests/models/test_sdxl_fidelity.py). Like the original SGM code, where the
size embedders sit in the same `conditioner` as the text embedders, the time ids are part of the conditioning;
they are constants of the image size (`set_image_size`), never trained.

`PairTokenizer` gives the ids both encoders read as one (B, 2, 77) tensor: tokenizer 1 pads with the end token,
tokenizer 2 with "!" (id 0), as the pipeline's two tokenizers do.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config.sections import ENCODER_NAMES

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w): SDXL base's micro-conditioning


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / DeepSpeed engines keep the model as .module


class SDXLConditioner(nn.Module):
    """SDXL's two text encoders as one module: ids (B, 2, L) -> (packed (B, L + 1, D1 + D2),).

    `force_zeros_for_empty_prompt` (the model_index.json flag of SDXL base): the unconditional embedding is
    zeros (hidden states and pooled), not the empty prompt's encoding; `empty()` returns it."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module, image_size: tuple[int, int] = (1024, 1024),
                 force_zeros_for_empty_prompt: bool = True) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        pooled = text_encoder_2.config.projection_dim
        if pooled + TIME_IDS > width:
            raise ValueError(f"SDXL conditioner: the pooled embedding ({pooled}) and {TIME_IDS} time ids do not fit "
                             f"in one row of the {width}-wide context; encoder 2's projection_dim is too large")
        self.register_buffer("time_ids", torch.zeros(TIME_IDS), persistent=False)
        self.set_image_size(image_size)

    @property
    def config(self) -> Any:
        """Encoder 1's config (max_position_embeddings, hidden_size of the first part): what code written for one
        CLIP encoder reads."""
        return self.text_encoder.config

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder_2.dtype

    def set_image_size(self, size: int | tuple[int, int]) -> None:
        """Micro-conditioning for images of `size` pixels: original = target = size, crop (0, 0), the pipeline's
        defaults for `height`/`width` (`_get_add_time_ids`)."""
        h, w = (size, size) if isinstance(size, int) else size
        self.time_ids.copy_(torch.tensor([h, w, 0, 0, h, w], dtype=self.time_ids.dtype))

    def replaced(self, **encoders: nn.Module) -> SDXLConditioner:
        """A conditioner with the named encoders replaced and the others shared with this one (not copied: a frozen
        2.8 GB encoder 2 is held once), with the same time ids."""
        new = SDXLConditioner(encoders.get("text_encoder", self.text_encoder),
                              encoders.get("text_encoder_2", self.text_encoder_2), (1, 1),
                              self.force_zeros_for_empty_prompt)
        new.time_ids = self.time_ids.clone()
        return new.train(self.training)

    def encoders(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in ENCODER_NAMES}

    def forward(self, ids: Tensor) -> tuple[Tensor]:
        if ids.ndim != 3 or ids.shape[1] != 2:
            raise ValueError(f"SDXLConditioner takes ids of shape (B, 2, L) (PairTokenizer's), got {tuple(ids.shape)}")
        h1 = self.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(ids[:, 1], output_hidden_states=True)
        hidden = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)  # (B, L, D1 + D2)
        return (pack(hidden, out2.text_embeds, self.time_ids),)

    def empty(self, n: int = 1) -> Tensor:
        """(n, L + 1, D) the zeroed unconditional embedding (force_zeros_for_empty_prompt), with the time ids."""
        p = next(self.text_encoder_2.parameters())
        length = self.text_encoder.config.max_position_embeddings
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        hidden = torch.zeros(n, length, width, device=p.device, dtype=p.dtype)
        pooled = torch.zeros(n, self.text_encoder_2.config.projection_dim, device=p.device, dtype=p.dtype)
        return pack(hidden, pooled, self.time_ids)


def pack(hidden: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
    """(B, L, D), (B, P), (6,) -> (B, L + 1, D): the extra row is [pooled | time ids | zeros]."""
    b, _, d = hidden.shape
    ids = time_ids.to(device=hidden.device, dtype=hidden.dtype).expand(b, -1)
    pad = hidden.new_zeros(b, d - pooled.shape[-1] - ids.shape[-1])
    row = torch.cat([pooled.to(hidden.dtype), ids, pad], dim=-1)
    return torch.cat([hidden, row[:, None]], dim=1)


def _takes_added_conditioning(config: Any) -> bool:
    return getattr(config, "addition_embed_type", None) == "text_time"


def unet_inputs(unet: nn.Module, emb: Tensor) -> dict[str, Any]:
    """The UNet's conditioning keyword arguments for embedding `emb`: `encoder_hidden_states` as is (SD1.5, SD2.x),
    or, for an SDXL UNet (`addition_embed_type='text_time'`), a packed embedding unpacked into the hidden states and
    `added_cond_kwargs` (text_embeds, time_ids)."""
    config = getattr(unwrap(unet), "config", None)
    if not _takes_added_conditioning(config):
        return {"encoder_hidden_states": emb}
    pooled = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
    row = emb[:, -1]
    return {"encoder_hidden_states": emb[:, :-1],
            "added_cond_kwargs": {"text_embeds": row[:, :pooled], "time_ids": row[:, pooled:pooled + TIME_IDS]}}


class PairTokenizer:
    """SDXL's two tokenizers as one: `tokenizer(prompts, padding="max_length", ..., return_tensors="pt").input_ids`
    is (B, 2, L). Anything else (token counts for the long-prompt warning) is tokenizer 1's: both share one BPE
    vocabulary and differ only in the padding token."""

    def __init__(self, tokenizer: Any, tokenizer_2: Any) -> None:
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise ValueError(f"SDXL tokenizers of different lengths ({tokenizer.model_max_length} vs "
                             f"{tokenizer_2.model_max_length}): the two encoders' hidden states are concatenated "
                             "position by position, so they must be equal")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    @property
    def model_max_length(self) -> int:
        return self.tokenizer.model_max_length

    def __call__(self, prompts: Sequence[str] | str, **kwargs: Any) -> Any:
        from transformers import BatchEncoding

        if kwargs.get("return_tensors") != "pt" or kwargs.get("padding") != "max_length":
            return self.tokenizer(prompts, **kwargs)
        ids = [t(prompts, **kwargs).input_ids for t in (self.tokenizer, self.tokenizer_2)]
        return BatchEncoding({"input_ids": torch.stack(ids, dim=1)})


def sub_encoders(encoder: nn.Module) -> dict[str, nn.Module]:
    """{'text_encoder': ...} for a one-encoder model, {'text_encoder': ..., 'text_encoder_2': ...} for SDXL."""
    encoder = unwrap(encoder)
    return encoder.encoders() if isinstance(encoder, SDXLConditioner) else {"text_encoder": encoder}


def zeroes_empty_prompt(encoder: nn.Module) -> bool:
    return bool(getattr(unwrap(encoder), "force_zeros_for_empty_prompt", False))
