"""Loading SD components from a diffusers folder or one original-layout .safetensors/.ckpt file, offline.

Every route is strict: a checkpoint whose keys or shapes do not match the architecture raises a ValueError
naming the file and a few offending keys, because a partly-loaded model (random weights where keys were
missing, which is what diffusers' ``from_single_file`` and ``from_pretrained`` do with only a warning) trains
and samples without error and silently wastes a run.

Single files are read into models built on the meta device and loaded with ``assign=True``: no random
initialisation of 1B parameters and no second copy of the weights in memory.
"""
from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..registry import MODEL_KINDS, import_target
from . import keymap
from .components import COMPONENT_NAMES, SD15_CONFIG_DIR, SDComponents
from .conditioner import PairTokenizer, SDXLConditioner
from .families import check_family, folder_family
from .tensors import load_safetensors

if TYPE_CHECKING:
    from transformers import CLIPTextModel

    from ..config import ModelConfig

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TEXT_ROOTS = ("cond_stage_model.", "conditioner.")  # where original single files keep their text encoders
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
                     + "; ".join(parts) + ". Is this a checkpoint of this model family and config (model.family, "
                     "model.path)?")


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


def sdxl_conditioner(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, unet: torch.nn.Module,
                     vae: torch.nn.Module, config_dir: Path | None = None):
    """SDXL's two encoders as one SDXLConditioner, micro-conditioned on the model's native image size (the UNet's
    sample size in pixels), with config_dir's model_index.json's force_zeros_for_empty_prompt (default true, as SDXL
    base)."""
    index = config_dir / "model_index.json" if config_dir is not None else None
    zeros = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index and index.is_file() \
        else True
    side = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return SDXLConditioner(text_encoder, text_encoder_2, (side, side), bool(zeros)).eval()


def family_tokenizer(folder: Path):
    """`folder`'s tokenizer/, or SDXL's tokenizer/ + tokenizer_2/ as one PairTokenizer."""
    if (folder / "tokenizer_2").is_dir():
        return PairTokenizer(load_tokenizer(folder / "tokenizer"), load_tokenizer(folder / "tokenizer_2"))
    return load_tokenizer(folder / "tokenizer")


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


def _text_encoders_from_ckpt(ckpt: StateDict, config_dir: Path, family: str, source: Path,
                             dtype: torch.dtype) -> list[torch.nn.Module]:
    """The file's text encoder(s), each built from config_dir's text_encoder[_2]/ config and loaded strictly."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .keymap_families import read_text_encoders

    names = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    configs = [_clip_config(config_dir / n) for n in names]
    try:
        state_dicts = read_text_encoders(family, ckpt, [c.num_hidden_layers for c in configs])
    except ValueError as e:
        raise ValueError(f"'{source}': {e}") from None
    classes = (CLIPTextModel, CLIPTextModelWithProjection)
    return [load_into_meta_model(lambda cls=cls, c=c: cls(c), sd, n.replace("_", " "), source, dtype)
            for cls, c, sd, n in zip(classes, configs, state_dicts, names)]


def load_single_file(path: str | Path, config_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
                     family: str = "auto", prediction_type: str = "auto") -> SDComponents:
    """Load an original-layout SD1.x, SD2.x or SDXL checkpoint (.safetensors/.ckpt).

    The family comes from the file's keys (`keymap_families.detect_family`; `family`, unless 'auto', must match it).
    The architecture comes from `config_dir` (a diffusers-layout folder with the configs, e.g. one written by
    `save_components`); default: the family's shipped configs. The tokenizer(s) and scheduler come from its
    tokenizer[_2]/ and scheduler/ subfolders when present, else the family's. SD2.1 (v) and SD2.1-base (epsilon) files
    have the same keys: `prediction_type` 'auto' takes the config's (the shipped one: SD2.1's v_prediction) and the log
    says which.
    """
    from .families import CONFIG_DIRS
    from .keymap_families import detect_family

    path = Path(path)
    ckpt = read_state_dict(path)
    if config_dir is not None and (Path(config_dir) / "model_index.json").is_file():
        family = check_family(family, folder_family(Path(config_dir)), config_dir)
    try:
        found = check_family(family, detect_family(ckpt, path), path)
    except ValueError:
        if family == "auto" or any(k.startswith(TEXT_ROOTS) for k in ckpt):
            raise
        found = family  # no text encoder in the file at all: the strict load below names what is missing
    shipped = CONFIG_DIRS[found]
    config_dir = Path(config_dir) if config_dir is not None else shipped
    _require_config_dir(config_dir)
    unet = _unet_from_ckpt(ckpt, config_dir, path, dtype)
    vae = _vae_from_ckpt(ckpt, config_dir, path, dtype)
    encoders = _text_encoders_from_ckpt(ckpt, config_dir, found, path, dtype)
    encoder = sdxl_conditioner(*encoders, unet, vae, config_dir) if found == "sdxl" else encoders[0]
    own = lambda name: config_dir / name if (config_dir / name).is_dir() else shipped / name
    tokenizer = (PairTokenizer(load_tokenizer(own("tokenizer")), load_tokenizer(own("tokenizer_2"))) if found == "sdxl"
                 else load_tokenizer(own("tokenizer")))
    comp = SDComponents(unet=unet, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                        scheduler=load_scheduler(own("scheduler")), family=found)
    comp = with_prediction_type(comp, prediction_type)
    note = (" (SD2.1's; SD2.1-base predicts epsilon with the same keys: set model.prediction_type)"
            if found == "sd2" and prediction_type == "auto" else "")
    logger.info("Loaded %s single-file checkpoint %s (architecture from %s; %s prediction%s)", found, path,
                config_dir, comp.scheduler.config.prediction_type, note)
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


def load_diffusers_folder(folder: str | Path, family: str = "auto") -> SDComponents:
    """Load a diffusers Stable Diffusion folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/;
    SDXL: + text_encoder_2/ tokenizer_2/) of the family model_index.json names (`family`, unless 'auto', must
    match it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        missing = ["model_index.json", *(f"{n}/" for n in COMPONENT_NAMES if not (folder / n).is_dir())]
        raise FileNotFoundError(
            f"'{folder}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} (expected "
            f"model_index.json and {', '.join(n + '/' for n in COMPONENT_NAMES)}, and SDXL's text_encoder_2/ "
            f"tokenizer_2/; or pass one {'/'.join(SINGLE_FILE_SUFFIXES)} file in the original single-file layout)")
    found = check_family(family, folder_family(folder), folder)
    names = [*COMPONENT_NAMES, *(("text_encoder_2", "tokenizer_2") if found == "sdxl" else ())]
    missing = [f"{n}/" for n in names if not (folder / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"'{folder}' is not a complete diffusers {found} folder: missing {', '.join(missing)} "
                                f"(expected model_index.json and {', '.join(n + '/' for n in names)})")
    encoder = _from_pretrained(CLIPTextModel, folder / "text_encoder", "text encoder", dtype=torch.float32)
    unet = _from_pretrained(UNet2DConditionModel, folder / "unet", "UNet", torch_dtype=torch.float32)
    vae = _from_pretrained(AutoencoderKL, folder / "vae", "VAE", torch_dtype=torch.float32)
    if found == "sdxl":
        encoder_2 = _from_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2", "text encoder 2",
                                     dtype=torch.float32)
        encoder = sdxl_conditioner(encoder, encoder_2, unet, vae, folder)
    comp = SDComponents(unet=unet, vae=vae, text_encoder=encoder, tokenizer=family_tokenizer(folder),
                        scheduler=load_scheduler(folder / "scheduler"), family=found)
    logger.info("Loaded diffusers %s folder %s (%s prediction)", found, folder, comp.scheduler.config.prediction_type)
    return comp


def load_pretrained(path: str | Path, family: str = "auto", prediction_type: str = "auto") -> SDComponents:
    """A diffusers folder, or one original-layout file with the shipped architecture of its family."""
    path = Path(path)
    if path.is_dir():
        return with_prediction_type(load_diffusers_folder(path, family), prediction_type)
    if path.is_file():
        return load_single_file(path, family=family, prediction_type=prediction_type)
    raise FileNotFoundError(f"model path '{path}' does not exist (expected a diffusers folder with model_index.json, "
                            f"or one {'/'.join(SINGLE_FILE_SUFFIXES)} file)")


def load_pretrained_kind(cfg, seed: int = 0) -> SDComponents:
    """model.kind = 'pretrained' (registry.MODEL_KINDS): `load_pretrained(cfg.path)`."""
    if not cfg.path:
        raise ValueError("model.path is empty: set it to a diffusers folder or a .safetensors/.ckpt file "
                         "when model.kind='pretrained'")
    return load_pretrained(cfg.path, cfg.family, cfg.prediction_type)


def with_prediction_type(comp: SDComponents, prediction_type: str) -> SDComponents:
    """`comp` with its scheduler predicting `prediction_type` ('auto': as loaded)."""
    if prediction_type not in ("auto", comp.scheduler.config.prediction_type):
        logger.info("Prediction type %s (model.prediction_type; the model's scheduler config says %s)",
                    prediction_type, comp.scheduler.config.prediction_type)
        comp.scheduler = type(comp.scheduler).from_config(comp.scheduler.config, prediction_type=prediction_type)
    return comp


def load_components(cfg: ModelConfig, seed: int = 0) -> SDComponents:
    """The SD components `cfg` names, with `cfg.text_encoder_path` (if set) replacing the text encoder.

    `cfg.kind` is a registered model kind ('pretrained': `cfg.path` is a diffusers folder or one original-layout
    .safetensors/.ckpt of the SD1.5 architecture; 'tiny_random': `build_tiny_random(seed)`; a plugin's, e.g. the
    tiny world's 'tiny_world') or the 'module:function' of a loader `f(cfg, seed) -> SDComponents`."""
    target = MODEL_KINDS.get(cfg.kind).loader if ":" not in cfg.kind else cfg.kind
    comp = with_prediction_type(import_target(target, "model kind")(cfg, seed), cfg.prediction_type)
    if hasattr(comp.text_encoder, "set_image_size"):  # SDXL: micro-conditioning on the size sampled at
        comp.text_encoder.set_image_size(cfg.resolution)
    if cfg.text_encoder_path:
        comp.base_text_encoder = comp.text_encoder
        comp.text_encoder = load_tuned_encoder(cfg.text_encoder_path, comp.text_encoder)
        logger.info("Replaced the text encoder with %s", cfg.text_encoder_path)
    return comp


def load_tuned_encoder(path: str | Path, base: torch.nn.Module) -> torch.nn.Module:
    """A tuned replacement for `base` (the model's own encoder, whose architecture it must have): `load_text_encoder`
    for one encoder; for SDXL's conditioner, a folder holding text_encoder/ and/or text_encoder_2/ (a run's folder
    or an export), each replacing that encoder (one it lacks stays the base's)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not isinstance(base, SDXLConditioner):
        # The override must fit the base model's architecture, so its config is the base encoder's.
        return load_text_encoder(path, config=base.config, base=base)
    folder = Path(path)
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    if (folder / "config.json").is_file():  # one encoder's own folder: which one, its config's class says
        arch = (json.loads((folder / "config.json").read_text()).get("architectures") or [""])[0]
        name = "text_encoder_2" if arch == "CLIPTextModelWithProjection" else "text_encoder"
        tuned = {name: _from_pretrained(classes[name], folder, name.replace("_", " "), dtype=torch.float32)}
        return _replaced_checked(base, tuned, folder)
    found = [n for n in base.encoders() if (folder / n / "config.json").is_file()]
    if not found:
        raise FileNotFoundError(f"'{folder}' holds neither text_encoder/ nor text_encoder_2/ with a config.json: "
                                "an SDXL model's tuned encoders are given as a folder holding one or both "
                                "(a run's output.dir, or a pipeline export)")
    tuned = {n: _from_pretrained(classes[n], folder / n, n.replace("_", " "), dtype=torch.float32) for n in found}
    return _replaced_checked(base, tuned, folder)


def _replaced_checked(base: Any, tuned: dict[str, torch.nn.Module], source: Path) -> torch.nn.Module:
    """`base` with `tuned`'s encoders, each checked to have its base encoder's architecture."""
    for name, model in tuned.items():
        expected = {k: v.shape for k, v in getattr(base, name).state_dict().items()}
        check_keys(expected, model.state_dict(), name.replace("_", " "), source)
    return base.replaced(**tuned)


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
