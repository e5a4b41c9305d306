"""Loading SD components from a diffusers folder or one original-layout .safetensors/.ckpt file, offline.

Every route is strict: a checkpoint whose keys or shapes do not match the architecture raises a ValueError
naming the file and a few offending keys, because a partly-loaded model (random weights where keys were
missing, which is what diffusers' ``from_single_file`` and ``from_pretrained`` do with only a warning) trains
and samples without error and silently wastes a run.

Single files are read into models built on the meta device and loaded with ``assign=True``: no random
initialisation of 1B parameters and no second copy of the weights in memory.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..registry import MODEL_KINDS, import_target
from . import keymap
from .components import COMPONENT_NAMES, SD15_CONFIG_DIR, SDComponents
from .tensors import load_safetensors

if TYPE_CHECKING:
    from transformers import CLIPTextModel

    from ..config import ModelConfig

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Reading files and strict loading
# ---------------------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a .safetensors or .ckpt file (a Lightning .ckpt's "state_dict" is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist (expected a .safetensors or .ckpt file)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix == ".ckpt":
        # weights_only: a .ckpt is a pickle and must not be able to run code when loaded.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"checkpoint '{path}' holds Python objects that are unsafe to unpickle (e.g. training "
                             f"callbacks); convert it to .safetensors with a tool you trust: {e}") from e
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict of tensors")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"checkpoint '{path}' has extension '{path.suffix}'; expected one of "
                     f"{', '.join(SINGLE_FILE_SUFFIXES)} (or a diffusers folder)")


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def check_keys(expected: Mapping[str, torch.Size], got: Mapping[str, torch.Tensor], what: str, source: Any,
               extra_unexpected: list[str] = ()) -> None:
    """Raise ValueError naming missing / unexpected / wrongly-shaped keys; do nothing when they all match."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected] + list(extra_unexpected)
    wrong = [f"{k}: {tuple(got[k].shape)} vs expected {tuple(s)}" for k, s in expected.items()
             if k in got and tuple(got[k].shape) != tuple(s)]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{label} keys: {_examples(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong)) if keys]
    raise ValueError(f"'{source}': the {what} weights do not match the expected architecture; "
                     + "; ".join(parts) + ". Is this a Stable Diffusion 1.x checkpoint for this config?")


def _restore_position_ids(model: torch.nn.Module) -> None:
    """Recreate non-persistent buffers left on meta by assign-loading (CLIP's position_ids is the only one)."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer '{name}' of {type(model).__name__} has no value after loading")
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def load_into_meta_model(factory: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor], what: str,
                         source: Any, dtype: torch.dtype = torch.float32,
                         extra_unexpected: list[str] = ()) -> torch.nn.Module:
    """Build a model on the meta device, check `state_dict` strictly, then assign its tensors (cast to `dtype`)."""
    with torch.device("meta"):
        model = factory()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state_dict, what, source, extra_unexpected)
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    _restore_position_ids(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Configs, tokenizer, scheduler
# ---------------------------------------------------------------------------------------------------------

def _require_config_dir(config_dir: Path) -> None:
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json"]
    missing = [n for n in needed if not (config_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"config folder '{config_dir}' lacks {', '.join(missing)} (expected a diffusers "
                                f"folder layout with {', '.join(needed)})")


def load_tokenizer(folder: str | Path | None = None):
    """CLIP tokenizer from a folder with vocab.json/merges.txt (or tokenizer.json); default: the shipped SD1.5 one."""
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder is not None else SD15_CONFIG_DIR / "tokenizer"
    # from_pretrained(folder), not CLIPTokenizer(vocab_file=..., merges_file=...): the latter silently gives
    # wrong ids in transformers 5.
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_scheduler(folder: str | Path | None = None):
    """DDIM scheduler from a scheduler/ config folder (any SD scheduler class's config); default: SD1.5's."""
    from diffusers import DDIMScheduler

    folder = Path(folder) if folder is not None else SD15_CONFIG_DIR / "scheduler"
    return DDIMScheduler.from_config(DDIMScheduler.load_config(str(folder)))


# ---------------------------------------------------------------------------------------------------------
# Single file
# ---------------------------------------------------------------------------------------------------------

def _unet_from_ckpt(ckpt: StateDict, config_dir: Path, source: Path, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(config_dir / "unet"))
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(config)
    # diffusers' converter drops keys it does not know: find them with our inverse map so they are reported.
    known = set(keymap.diffusers_to_ldm_unet(meta.state_dict(), meta.config.layers_per_block))
    extra = [k for k in ckpt if k.startswith(keymap.UNET_PREFIX) and k not in known]
    sd = keymap.ldm_to_diffusers_unet(ckpt, meta.config)
    return load_into_meta_model(lambda: UNet2DConditionModel.from_config(config), sd, "UNet", source, dtype, extra)


def _vae_from_ckpt(ckpt: StateDict, config_dir: Path, source: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(str(config_dir / "vae"))
    with torch.device("meta"):
        meta = AutoencoderKL.from_config(config)
    known = set(keymap.diffusers_to_ldm_vae(meta.state_dict(), len(meta.config.up_block_types)))
    extra = [k for k in ckpt if k.startswith(keymap.VAE_PREFIX) and k not in known]
    sd = keymap.ldm_to_diffusers_vae(ckpt, meta.config)
    return load_into_meta_model(lambda: AutoencoderKL.from_config(config), sd, "VAE", source, dtype, extra)


def _clip_config(folder: Path):
    from transformers import CLIPTextConfig

    return CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)


def text_encoder_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any, source: Any,
                                 dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """CLIPTextModel from a state dict in the original, transformers < 5.6 or >= 5.6 key layout."""
    from transformers import CLIPTextModel

    sd = keymap.clip_state_dict_any_layout(state_dict)
    return load_into_meta_model(lambda: CLIPTextModel(config), sd, "text encoder", source, dtype)


def load_single_file(path: str | Path, config_dir: str | Path | None = None,
                     dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load an original-layout SD checkpoint (.safetensors/.ckpt).

    The architecture comes from `config_dir` (a diffusers-layout folder with unet/, vae/, text_encoder/
    configs, e.g. a folder written by `save_components`); default: the shipped SD1.5 configs. The tokenizer
    and scheduler come from its tokenizer/ and scheduler/ subfolders when present, else SD1.5's.
    """
    path = Path(path)
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
    _require_config_dir(config_dir)
    ckpt = read_state_dict(path)
    clip_sd = {k: v for k, v in ckpt.items() if k.startswith(keymap.CLIP_PREFIX)}
    comp = SDComponents(
        unet=_unet_from_ckpt(ckpt, config_dir, path, dtype),
        vae=_vae_from_ckpt(ckpt, config_dir, path, dtype),
        text_encoder=text_encoder_from_state_dict(clip_sd, _clip_config(config_dir / "text_encoder"), path, dtype),
        tokenizer=load_tokenizer(config_dir / "tokenizer" if (config_dir / "tokenizer").is_dir() else None),
        scheduler=load_scheduler(config_dir / "scheduler" if (config_dir / "scheduler").is_dir() else None),
    )
    logger.info("Loaded single-file checkpoint %s (architecture from %s)", path, config_dir)
    return comp


# ---------------------------------------------------------------------------------------------------------
# Diffusers folder
# ---------------------------------------------------------------------------------------------------------

def _check_loading_info(info: Mapping[str, Any], what: str, folder: Path) -> None:
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        parts = [f"{k.replace('_', ' ')}: {_examples([str(x) for x in v])}" for k, v in bad.items() if v]
        raise ValueError(f"'{folder}': the {what} weights do not match its config; " + "; ".join(parts))


def _from_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any):
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"could not load the {what} from '{folder}': {e}") from e
    _check_loading_info(info, what, folder)
    return model.eval()


def load_diffusers_folder(folder: str | Path) -> SDComponents:
    """Load a diffusers Stable Diffusion folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    missing = [n for n in ("model_index.json",) if not (folder / n).is_file()]
    missing += [f"{n}/" for n in COMPONENT_NAMES if not (folder / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"'{folder}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} (expected "
            f"model_index.json and {', '.join(n + '/' for n in COMPONENT_NAMES)}; or pass one "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file in the original single-file layout)")
    comp = SDComponents(
        unet=_from_pretrained(UNet2DConditionModel, folder / "unet", "UNet", torch_dtype=torch.float32),
        vae=_from_pretrained(AutoencoderKL, folder / "vae", "VAE", torch_dtype=torch.float32),
        text_encoder=_from_pretrained(CLIPTextModel, folder / "text_encoder", "text encoder", dtype=torch.float32),
        tokenizer=load_tokenizer(folder / "tokenizer"),
        scheduler=load_scheduler(folder / "scheduler"),
    )
    logger.info("Loaded diffusers folder %s", folder)
    return comp


def load_pretrained(path: str | Path) -> SDComponents:
    """A diffusers folder, or one original-layout file with the shipped SD1.5 architecture."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path)
    if path.is_file():
        return load_single_file(path)
    raise FileNotFoundError(f"model path '{path}' does not exist (expected a diffusers folder with model_index.json, "
                            f"or one {'/'.join(SINGLE_FILE_SUFFIXES)} file)")


def load_pretrained_kind(cfg, seed: int = 0) -> SDComponents:
    """model.kind = 'pretrained' (registry.MODEL_KINDS): `load_pretrained(cfg.path)`."""
    if not cfg.path:
        raise ValueError("model.path is empty: set it to a diffusers folder or a .safetensors/.ckpt file "
                         "when model.kind='pretrained'")
    return load_pretrained(cfg.path)


def load_components(cfg: ModelConfig, seed: int = 0) -> SDComponents:
    """The SD components `cfg` names, with `cfg.text_encoder_path` (if set) replacing the text encoder.

    `cfg.kind` is a registered model kind ('pretrained': `cfg.path` is a diffusers folder or one original-layout
    .safetensors/.ckpt of the SD1.5 architecture; 'tiny_random': `build_tiny_random(seed)`; a plugin's, e.g. the
    tiny world's 'tiny_world') or the 'module:function' of a loader `f(cfg, seed) -> SDComponents`."""
    target = MODEL_KINDS.get(cfg.kind).loader if ":" not in cfg.kind else cfg.kind
    comp = import_target(target, "model kind")(cfg, seed)
    if cfg.text_encoder_path:
        # The override must fit the base model's architecture, so its config is the base encoder's.
        comp.base_text_encoder = comp.text_encoder
        comp.text_encoder = load_text_encoder(cfg.text_encoder_path, config=comp.text_encoder.config,
                                              base=comp.text_encoder)
        logger.info("Replaced the text encoder with %s", cfg.text_encoder_path)
    return comp


# ---------------------------------------------------------------------------------------------------------
# Text encoder override
# ---------------------------------------------------------------------------------------------------------

def load_text_encoder(path: str | Path, config: Any = None, dtype: torch.dtype = torch.float32,
                      base: torch.nn.Module | None = None) -> CLIPTextModel:
    """A text encoder from a transformers folder (config.json + weights, or a parent with text_encoder/) or one
    .safetensors/.ckpt file of its state dict in any layout, whose architecture is `config` (default: SD1.5's).

    A text-encoder LoRA (a LoRA folder or file with `text_encoder.*` keys, a run holding text_encoder_lora/), with
    an optional scale and '+'-stacked others ('a:0.7+b:0.5', models/encoder_lora.py), is merged into a copy of
    `base` (the model's own encoder), which it then requires."""
    from transformers import CLIPTextModel

    from .encoder_lora import parse_lora_stack, stack_loras

    stack = parse_lora_stack(str(path))
    if stack is not None:
        if base is None:
            raise ValueError(f"'{path}' is a text-encoder LoRA: it needs the base model's encoder to apply to")
        return stack_loras(base, stack).to(dtype)
    path = Path(path)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "text_encoder"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder '{path}' has no config.json (nor text_encoder/config.json, "
                                    f"text_encoder_lora/); expected a folder written by save_pretrained, a LoRA "
                                    f"folder, or a .safetensors file")
        return _from_pretrained(CLIPTextModel, folder, "text encoder", dtype=dtype)
    if not path.exists():
        raise FileNotFoundError(f"text encoder path '{path}' does not exist (expected a text_encoder folder, a LoRA "
                                f"folder or a .safetensors file)")
    config = config if config is not None else _clip_config(SD15_CONFIG_DIR / "text_encoder")
    state_dict = read_state_dict(path)
    return text_encoder_from_state_dict(state_dict, config, path, dtype)
