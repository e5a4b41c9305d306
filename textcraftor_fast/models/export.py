"""Writing components: a diffusers folder, the original SD1.5 single-file layout, or just the text encoder."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from . import keymap
from .components import SDComponents

if TYPE_CHECKING:
    from transformers import CLIPTextModel

logger = logging.getLogger(__name__)


def _model_index(comp: SDComponents) -> dict:
    import diffusers

    def entry(obj: object) -> list[str]:
        return [type(obj).__module__.split(".")[0], type(obj).__name__]

    # safety_checker/feature_extractor null so StableDiffusionPipeline.from_pretrained accepts the folder.
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        **{name: entry(getattr(comp, name)) for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae")},
    }


def save_components(comp: SDComponents, folder: str | Path) -> Path:
    """Write a diffusers folder (save_pretrained of each part + model_index.json); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comp.unet.save_pretrained(folder / "unet")
    comp.vae.save_pretrained(folder / "vae")
    save_text_encoder_folder(comp.text_encoder, folder / "text_encoder")
    comp.tokenizer.save_pretrained(folder / "tokenizer")
    comp.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(comp), indent=2) + "\n")
    logger.info("Saved diffusers folder %s", folder)
    return folder


def save_text_encoder_folder(text_encoder: CLIPTextModel, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained, then store the weights under `text_model.*` as SD1.5's own folders do.

    transformers >= 5.6 saves a flattened CLIPTextModel (no `text_model.` prefix). Older transformers would
    load such a file with every weight "missing" (random init, only a warning), while both old and new read
    the prefixed form, so the prefixed form is what other tools can consume.
    """
    from safetensors.torch import load_file, save_file

    # deepcopy: Module.to casts in place and must not change the caller's (training) model.
    model = text_encoder if dtype is None else copy.deepcopy(text_encoder).to(dtype)
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    if hasattr(model, "text_model") or not weights.is_file():
        return folder  # already prefixed (transformers < 5.6), or sharded: leave transformers' own files
    state_dict = load_file(str(weights))
    # A model that transformers loaded from a prefixed file is saved back prefixed (it reverses its own key
    # conversion on save), so prefix only what is not prefixed yet.
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()},
              str(weights), metadata={"format": "pt"})
    return folder


def _to_saveable(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous CPU tensors that do not share storage: clone cuts views (e.g. the 1x1 VAE convs).
    out = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().clone()
    return out


def _save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> Path:
    from safetensors.torch import save_file

    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"output '{path}' must end in .safetensors for the single-file layout")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_to_saveable(state_dict, dtype), str(path), metadata={"format": "pt"})
    return path


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's state dict under `cond_stage_model.transformer.text_model.*` (original layout)."""
    return keymap.diffusers_to_ldm_clip(text_encoder.state_dict(), text_encoder.config.max_position_embeddings)


def to_single_file_state_dict(comp: SDComponents) -> dict[str, torch.Tensor]:
    """UNet + VAE + text encoder in the original SD1.5 single-file key layout."""
    sd = keymap.diffusers_to_ldm_unet(comp.unet.state_dict(), comp.unet.config.layers_per_block)
    sd.update(keymap.diffusers_to_ldm_vae(comp.vae.state_dict(), len(comp.vae.config.up_block_types)))
    sd.update(text_encoder_to_ldm(comp.text_encoder))
    return sd


def save_single_file(comp: SDComponents, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the whole model as one .safetensors in the original SD1.5 layout (loadable by A1111/ComfyUI/
    diffusers' from_single_file); `dtype` (e.g. torch.float16) casts floating tensors."""
    path = _save_safetensors(to_single_file_state_dict(comp), Path(path), dtype)
    logger.info("Saved single-file checkpoint %s", path)
    return path


def export_text_encoder(text_encoder: CLIPTextModel, out_path: str | Path,
                        layout: Literal["diffusers", "single_file"] = "diffusers",
                        dtype: torch.dtype | None = None) -> Path:
    """Export a (fine-tuned) text encoder.

    "diffusers": `out_path` becomes a text_encoder folder (config.json + model.safetensors via save_pretrained),
    ready to replace `<sd folder>/text_encoder`. "single_file": `out_path` is a .safetensors holding only
    `cond_stage_model.transformer.text_model.*` keys, mergeable into an original SD1.5 checkpoint.
    """
    out_path = Path(out_path)
    if layout == "diffusers":
        if out_path.suffix:
            raise ValueError(f"layout 'diffusers' writes a folder; got a file name '{out_path}'")
        save_text_encoder_folder(text_encoder, out_path, dtype)
    elif layout == "single_file":
        _save_safetensors(text_encoder_to_ldm(text_encoder), out_path, dtype)
    else:
        raise ValueError(f"layout must be one of 'diffusers', 'single_file'; got {layout!r}")
    logger.info("Exported text encoder (%s layout) to %s", layout, out_path)
    return out_path
