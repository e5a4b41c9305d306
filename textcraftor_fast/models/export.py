"""Writing components: a diffusers folder, the original SD1.5 single-file layout, or just the tuned parts.

`export_tuned` is the one entry point for a tuned text encoder and/or a tuned UNet (UNet stage: a LoRA-adapted
or fully tuned UNet; a LoRA is merged into the weights for every layout but "lora"). What each layout holds and
what loads it:

    layout="diffusers"            the tuned component's folder: a text_encoder/ folder (CLIPTextModel.from_pretrained,
                                  to pass as StableDiffusionPipeline.from_pretrained(base, text_encoder=...)) or a
                                  merged unet/ folder (UNet2DConditionModel.from_pretrained, passed as unet=...)
    layout="lora"                 the text encoder's and/or the UNet's LoRA in diffusers' format, one file:
                                  pipe.load_lora_weights(out)
    layout="pipeline"             whole diffusers folder (base parts + the tuned encoder and/or merged UNet):
                                  StableDiffusionPipeline.from_pretrained(out)
    layout="single_file"          .safetensors of the tuned parts' keys only (`cond_stage_model.transformer.
                                  text_model.*` and/or `model.diffusion_model.*`), to merge into an original
                                  SD1.5 checkpoint
    layout="single_file", full    the whole original-layout checkpoint (base parts + the tuned ones):
                                  StableDiffusionPipeline.from_single_file(out, config=<base folder>)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..atomic import replaced_atomically
from . import keymap
from .tensors import to_saveable
from .components import SDComponents
from .conditioner import PairTokenizer, SDXLConditioner, sub_encoders

if TYPE_CHECKING:
    from transformers import CLIPTextModel

    from ..config import TrainConfig
    from .encoder_lora import EncoderLora

logger = logging.getLogger(__name__)

Layout = Literal["diffusers", "pipeline", "single_file", "lora"]
LAYOUTS: tuple[str, ...] = ("diffusers", "pipeline", "single_file", "lora")


def _model_index(comp: SDComponents) -> dict:
    import diffusers

    def entry(obj: object) -> list[str]:
        return [type(obj).__module__.split(".")[0], type(obj).__name__]

    if isinstance(comp.text_encoder, SDXLConditioner):
        # force_zeros_for_empty_prompt as the model had it: the pipeline's unconditional branch must stay the one
        # the encoders were tuned under.
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": comp.text_encoder.force_zeros_for_empty_prompt,
            "image_encoder": [None, None],
            "scheduler": entry(comp.scheduler), "unet": entry(comp.unet), "vae": entry(comp.vae),
            **{name: entry(part) for name, part in comp.text_encoder.encoders().items()},
            "tokenizer": entry(comp.tokenizer.tokenizer), "tokenizer_2": entry(comp.tokenizer.tokenizer_2),
        }
    # safety_checker/feature_extractor null so StableDiffusionPipeline.from_pretrained accepts the folder.
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        **{name: entry(getattr(comp, name)) for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae")},
    }


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    # deepcopy: Module.to casts in place and must not change the caller's (training) model.
    return module if dtype is None else copy.deepcopy(module).to(dtype)


def save_components(comp: SDComponents, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers folder (save_pretrained of each part + model_index.json); returns the folder.
    `dtype` (e.g. torch.float16) casts the saved weights, not `comp`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _cast_copy(comp.unet, dtype).save_pretrained(folder / "unet")
    _cast_copy(comp.vae, dtype).save_pretrained(folder / "vae")
    save_encoder_folders(comp.text_encoder, folder, dtype)
    tokenizers = ({"tokenizer": comp.tokenizer.tokenizer, "tokenizer_2": comp.tokenizer.tokenizer_2}
                  if isinstance(comp.tokenizer, PairTokenizer) else {"tokenizer": comp.tokenizer})
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(folder / name)
    comp.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(comp), indent=2) + "\n")
    logger.info("Saved diffusers folder %s", folder)
    return folder


def save_encoder_folders(text_encoder: torch.nn.Module, folder: Path, dtype: torch.dtype | None = None) -> None:
    """folder/text_encoder/ (and SDXL's folder/text_encoder_2/), each a `save_text_encoder_folder`."""
    for name, encoder in sub_encoders(text_encoder).items():
        save_text_encoder_folder(encoder, folder / name, dtype)


def save_text_encoder_folder(text_encoder: CLIPTextModel, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained, then store the weights under `text_model.*` as SD1.5's own folders do.

    transformers >= 5.6 saves a flattened CLIPTextModel (no `text_model.` prefix). Older transformers would
    load such a file with every weight "missing" (random init, only a warning), while both old and new read
    the prefixed form, so the prefixed form is what other tools can consume.
    """
    from safetensors.torch import load_file, save_file

    model = _cast_copy(text_encoder, dtype)
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


def _save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> Path:
    from safetensors.torch import save_file

    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"output '{path}' must end in .safetensors for the single-file layout")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_saveable(state_dict, dtype), str(path), metadata={"format": "pt"})
    return path


def text_encoder_to_ldm(text_encoder: CLIPTextModel, family: str = "sd15") -> dict[str, torch.Tensor]:
    """The text encoder(s) in `family`'s original layout: `cond_stage_model.transformer.text_model.*` (SD1.x),
    `cond_stage_model.model.*` (SD2.x, OpenCLIP names), `conditioner.embedders.0/1.*` (SDXL's conditioner)."""
    from .keymap_families import write_text_encoders

    parts = list(sub_encoders(text_encoder).values())
    return write_text_encoders(family, [p.state_dict() for p in parts], parts[0].config.max_position_embeddings)


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A (plain, merged) UNet's state dict under `model.diffusion_model.*` (original layout)."""
    return keymap.diffusers_to_ldm_unet(unet.state_dict(), unet.config.layers_per_block)


def to_single_file_state_dict(comp: SDComponents) -> dict[str, torch.Tensor]:
    """UNet + VAE + text encoder in the original SD1.5 single-file key layout."""
    sd = unet_to_ldm(comp.unet)
    sd.update(keymap.diffusers_to_ldm_vae(comp.vae.state_dict(), len(comp.vae.config.up_block_types)))
    sd.update(text_encoder_to_ldm(comp.text_encoder, comp.family))
    return sd


def save_single_file(comp: SDComponents, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the whole model as one .safetensors in the original SD1.5 layout (loadable by A1111/ComfyUI/
    diffusers' from_single_file); `dtype` (e.g. torch.float16) casts floating tensors."""
    path = _save_safetensors(to_single_file_state_dict(comp), Path(path), dtype)
    logger.info("Saved single-file checkpoint %s", path)
    return path


def _require_folder_name(out_path: Path, layout: str) -> None:
    if out_path.suffix or out_path.is_file():
        raise ValueError(f"layout '{layout}' writes a folder; got the file name '{out_path}' (drop the extension, "
                         "or use layout 'single_file' for one .safetensors)")


def export_text_encoder(text_encoder: CLIPTextModel, out_path: str | Path,
                        layout: Literal["diffusers", "single_file"] = "diffusers",
                        dtype: torch.dtype | None = None, family: str = "sd15") -> Path:
    """Export a (fine-tuned) text encoder.

    "diffusers": `out_path` becomes a text_encoder folder (config.json + model.safetensors via save_pretrained),
    ready to replace `<sd folder>/text_encoder`; for SDXL's conditioner a folder holding text_encoder/ and
    text_encoder_2/. "single_file": `out_path` is a .safetensors holding only the text encoders' keys in `family`'s
    original layout (SD1.x: `cond_stage_model.transformer.text_model.*`), mergeable into an original checkpoint.
    """
    out_path = Path(out_path)
    if layout == "diffusers" and isinstance(text_encoder, SDXLConditioner):
        _require_folder_name(out_path, layout)
        save_encoder_folders(text_encoder, out_path, dtype)  # what model.text_encoder_path takes for SDXL
    elif layout == "diffusers":
        _require_folder_name(out_path, layout)
        save_text_encoder_folder(text_encoder, out_path, dtype)
    elif layout == "single_file":
        _save_safetensors(text_encoder_to_ldm(text_encoder, family), out_path, dtype)
    else:
        raise ValueError(f"layout must be one of 'diffusers', 'single_file'; got {layout!r}")
    logger.info("Exported text encoder (%s layout) to %s", layout, out_path)
    return out_path


def _check_fits(base: SDComponents, text_encoder: CLIPTextModel) -> None:
    width = sum(e.config.hidden_size for e in sub_encoders(text_encoder).values())
    expected = base.unet.config.cross_attention_dim
    if width != expected:
        raise ValueError(f"the tuned text encoder's hidden size is {width} but the base UNet's cross_attention_dim "
                         f"is {expected}: the encoder was tuned for another model; export it with the config "
                         "(model.kind / model.path) of the model it was tuned from")


def _with_spacing(scheduler, timestep_spacing: str | None):
    if timestep_spacing is None:
        return scheduler
    return type(scheduler).from_config(scheduler.config, timestep_spacing=timestep_spacing)




def check_layout(layout: str, full: bool = False, text_encoder: bool = True, unet: bool = False) -> None:
    """Raise ValueError for an unknown layout, `full` with a layout it does not apply to, or tuned parts (`text_encoder`,
    `unet`: which are given) that the layout cannot write (before any loading)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    if full and layout != "single_file":
        what = {"pipeline": "already writes every component", "lora": "writes LoRA adapters alone"}.get(layout, (
            f"writes the {'text encoder' if text_encoder else 'merged UNet'} alone (layout 'pipeline' writes a whole "
            "diffusers folder)"))
        raise ValueError(f"--full (full=True) writes the whole single-file checkpoint and applies to layout "
                         f"'single_file' only; layout '{layout}' {what}")
    if not (text_encoder or unet):
        raise ValueError("nothing to export: give a tuned text encoder (--text-encoder) and/or a tuned UNet (--unet)")
    if layout == "diffusers" and text_encoder and unet:
        raise ValueError("layout 'diffusers' writes one component's folder, and both a text encoder and a UNet were "
                         "given: use layout 'pipeline' (a whole folder) or 'single_file', or export each on its own")


def save_unet_folder(unet: torch.nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A diffusers UNet folder of a plain (merged) UNet: UNet2DConditionModel.from_pretrained(folder)."""
    _cast_copy(unet, dtype).save_pretrained(folder)
    logger.info("Saved the UNet folder %s", folder)
    return Path(folder)


def _save_loras(text_encoder: torch.nn.Module | EncoderLora | None, unet: torch.nn.Module | None, out_path: Path,
                dtype: torch.dtype | None) -> Path:
    """Layout 'lora': the encoder's and/or the UNet's adapters in one diffusers LoRA file."""
    from .encoder_lora import EncoderLora, has_encoder_lora, save_encoder_lora
    from .lora import has_lora, save_lora, unet_lora_parts

    if unet is not None and not has_lora(unet):
        raise ValueError("layout 'lora' needs a LoRA-adapted UNet; this one has no LoRA (a full fine-tune): "
                         "export it with layout 'diffusers', 'pipeline' or 'single_file'")
    if text_encoder is not None and not (isinstance(text_encoder, EncoderLora) or has_encoder_lora(text_encoder)):
        raise ValueError("layout 'lora' needs a text-encoder LoRA (an encoder.method='lora' run); this encoder is a "
                         "full fine-tune: export it with layout 'diffusers', 'pipeline' or 'single_file'")
    _require_folder_name(out_path, "lora")
    if text_encoder is None:
        return save_lora(unet, out_path, dtype)
    return save_encoder_lora(text_encoder, out_path, dtype, **(unet_lora_parts(unet, dtype) if unet else {}))


def export_tuned(base: SDComponents, text_encoder: CLIPTextModel | EncoderLora | None, out_path: str | Path,
                 layout: Layout = "diffusers", full: bool = False, dtype: torch.dtype | None = None,
                 timestep_spacing: str | None = None, unet: torch.nn.Module | None = None) -> Path:
    """Export a tuned text encoder (plain, LoRA-adapted, or an `EncoderLora` read from a file) and/or a tuned `unet`
    (LoRA-adapted or plain) in `layout` (what loads each: the module docstring); returns `out_path`. Adapters are
    merged into the weights for every layout but 'lora' (an `EncoderLora` into `base`'s encoder).

    `base` supplies the rest of the whole-model layouts ("pipeline"; "single_file" with `full`): its UNet, VAE,
    text encoder, tokenizer and scheduler where no tuned one is given. `timestep_spacing` goes into the pipeline's scheduler config so that stock
    diffusers samples the timesteps our `generate` does (sampler.timestep_spacing): SD1.5's own scheduler
    config means 'leading' (751, 501, 251, 1 for 4 steps) where the sampler uses 'trailing' (999, 749, 499, 249).
    `dtype` (e.g. torch.float16) casts every written floating tensor.
    """
    check_layout(layout, full, text_encoder is not None, unet is not None)
    out_path = Path(out_path)
    _require_name_fits(out_path, layout, full, unet is not None)
    try:
        # Written beside `out_path` and renamed in: a failure (disk full, Ctrl-C) leaves no half-written export and
        # keeps an earlier export at `out_path` as it was.
        with replaced_atomically(out_path) as tmp:
            _write_export(base, text_encoder, tmp, layout, full, dtype, timestep_spacing, unet)
            _check_replaceable(out_path, tmp)
    except OSError as e:
        raise OSError(e.errno, f"writing the export to '{out_path}' failed ({e.strerror or e}); nothing was written "
                      f"there{' and the earlier export is unchanged' if out_path.exists() else ''}: free space or "
                      "choose another place, then export again") from e
    logger.info("Wrote the export (layout '%s'%s) to %s", layout, ", full" if full else "", out_path)
    return out_path


def _check_replaceable(out_path: Path, written: Path) -> None:
    """An existing `out_path` is replaced whole, so it may hold only what the new export holds (an earlier export of
    the same kind): a ValueError, before anything is replaced, for a folder with other files in it."""
    if not out_path.exists():
        return
    if out_path.is_dir() != written.is_dir():
        raise ValueError(f"'{out_path}' exists and is a {'folder' if out_path.is_dir() else 'file'}; this export "
                         f"writes a {'folder' if written.is_dir() else 'file'}: choose another output path")
    if out_path.is_dir():
        foreign = sorted({p.name for p in out_path.iterdir()} - {p.name for p in written.iterdir()})
        if foreign:
            raise ValueError(f"'{out_path}' exists and holds files this export does not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}), which replacing it would delete: export into "
                             "a new or empty folder, or remove them first")


def _require_name_fits(out_path: Path, layout: str, full: bool, has_unet: bool) -> None:
    """The folder-or-file check on the user's own name (the writers see a temporary one beside it)."""
    if layout == "pipeline" or (layout in ("diffusers", "lora") and not full):
        _require_folder_name(out_path, layout)
    elif layout == "single_file" and out_path.suffix != ".safetensors":
        raise ValueError(f"output '{out_path}' must end in .safetensors for the single-file layout")


def _write_export(base: SDComponents, text_encoder, out_path: Path, layout: Layout, full: bool,
                  dtype: torch.dtype | None, timestep_spacing: str | None, unet: torch.nn.Module | None) -> Path:
    if layout == "lora":
        return _save_loras(text_encoder, unet, out_path, dtype)
    if text_encoder is not None:
        from .encoder_lora import as_plain_encoder

        text_encoder = as_plain_encoder(text_encoder, base.text_encoder)
    if unet is not None:
        from .lora import merged_unet

        unet = merged_unet(unet)
    if text_encoder is not None and (layout == "pipeline" or full):
        _check_fits(base, text_encoder)
    tuned = dataclasses.replace(base, text_encoder=base.text_encoder if text_encoder is None else text_encoder,
                                unet=base.unet if unet is None else unet)
    if layout == "pipeline":
        _require_folder_name(out_path, layout)
        save_components(dataclasses.replace(tuned, scheduler=_with_spacing(base.scheduler, timestep_spacing)),
                        out_path, dtype)
    elif full:
        save_single_file(tuned, out_path, dtype)
    elif unet is None:
        export_text_encoder(text_encoder, out_path, layout, dtype, base.family)
    elif layout == "single_file":
        parts = {**(text_encoder_to_ldm(text_encoder, base.family) if text_encoder is not None else {}),
                 **unet_to_ldm(unet)}
        _save_safetensors(parts, out_path, dtype)
        logger.info("Exported the tuned parts (single-file keys) to %s", out_path)
    else:
        _require_folder_name(out_path, layout)
        save_unet_folder(unet, out_path, dtype)
    return out_path


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def export(config: TrainConfig, out: str | Path, text_encoder: str | Path | None = None,
           unet: str | Path | None = None, layout: Layout = "diffusers", full: bool = False,
           dtype: Literal["fp32", "fp16"] = "fp32") -> Path:
    """Export a tuned text encoder and/or UNet of the model `config.model` names, in `layout` (the module docstring
    says what each layout holds and what loads it); returns the written path.

    `text_encoder`: a text_encoder folder, a run or checkpoint folder holding one, a .safetensors file, or an encoder
    LoRA ('PATH[:SCALE]', '+'-stacked: merged into the base encoder for every layout but 'lora', which writes one LoRA
    again); `unet`: a UNet-stage result (a LoRA folder, a UNet folder, or a run/checkpoint folder holding unet_lora/
    or unet/), merged into the weights for every layout but 'lora'. The layout is checked, and `out` refused when it is the base
    model's own folder, before the base model loads."""
    from .loading import load_components, load_tuned_encoder
    from .lora import load_unet

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, EXPORT_DTYPES))}, got {dtype!r}")
    check_layout(layout, full, text_encoder is not None, unet is not None)
    if config.model.path and Path(out).resolve() == Path(config.model.path).resolve():
        # A pipeline export into the base folder would replace its original text encoder with the tuned one.
        raise ValueError(f"out '{out}' is the base model (model.path); write the export somewhere else")
    lora = None
    if text_encoder and layout == "lora":  # the adapters as they are: read (and checked) before the base loads
        from .encoder_lora import read_lora_for_export

        lora = read_lora_for_export(str(text_encoder))
    comp = load_components(config.model, seed=config.seed)
    encoder = lora if lora is not None or not text_encoder else load_tuned_encoder(text_encoder, comp.text_encoder)
    tuned_unet = load_unet(unet, comp.unet, merge=layout != "lora") if unet else None
    return export_tuned(comp, encoder, out, layout=layout, full=full, dtype=EXPORT_DTYPES[dtype],
                        timestep_spacing=config.sampler.timestep_spacing, unet=tuned_unet)
