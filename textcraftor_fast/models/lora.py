"""UNet LoRA through peft, stored in the format diffusers' LoRA loaders read.

    add_lora(unet, rank=4, alpha=4.0, target_modules=("to_k", "to_q", "to_v", "to_out.0"))  # base frozen
    save_lora(unet, folder)          # folder/pytorch_lora_weights.safetensors: pipe.load_lora_weights(folder)
    load_lora_state(unet, folder)    # the same adapters' weights back, strict and exact (resume)
    merged_unet(unet)                # a plain UNet2DConditionModel copy with W + (alpha / r) B A folded in
    load_unet(path, base_unet)       # a tuned UNet from a LoRA folder or a UNet folder, as a plain UNet

The file is what diffusers' own training scripts write (`convert_state_dict_to_diffusers(
get_peft_model_state_dict(unet))` through `save_lora_weights`, keys `unet.<module>.lora.down/up.weight`) plus
the adapter's LoraConfig as safetensors metadata, so an alpha other than the rank survives the round trip.

peft is an optional dependency: only the LoRA paths import it (`require_peft`), so the package and the full
text-encoder stage work without it. What any adapted model shares (the adapters switch, the LoRA file's parts, the
drift) is in adapters.py; the text encoder's LoRA in encoder_lora.py.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .adapters import ADAPTER, LORA_WEIGHTS, lora_file, lora_parts, require_peft

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

logger = logging.getLogger(__name__)

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
PREFIX = "unet"  # StableDiffusionLoraLoaderMixin.unet_name: the key prefix of a pipeline LoRA's UNet part


def add_lora(unet: nn.Module, rank: int, alpha: float, target_modules: Sequence[str],
             init: str = "gaussian") -> int:
    """Freeze `unet` and inject LoRA adapters (diffusers' `add_adapter`, adapter 'default'); returns the number
    of adapter parameters, the only ones with requires_grad. The up matrices start at zero: the adapted UNet
    computes exactly what the base does until the first update."""
    peft = require_peft("unet.method='lora'")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                             init_lora_weights="gaussian" if init == "gaussian" else True)
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"unet.target_modules={list(target_modules)}: {e}; the SD1.5 UNet's attention projections "
                         "are to_q, to_k, to_v, to_out.0") from None
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False)) and bool(getattr(unet, "peft_config", None))


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in diffusers' format (`<module>.lora.down.weight` / `.lora.up.weight`), no prefix."""
    require_peft("exporting a UNet LoRA")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))


def unet_lora_parts(unet: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The UNet's part of `save_lora_weights`' arguments: its adapters (cast to `dtype`) and their LoraConfig."""
    from .tensors import to_saveable

    return {"unet_lora_layers": to_saveable(lora_state_dict(unet), dtype),
            "unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}


def save_lora(unet: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` as diffusers' training scripts do, with the LoraConfig as
    metadata; `dtype` casts the written tensors. Loads with `StableDiffusionPipeline.load_lora_weights(folder)`."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    folder = Path(folder)
    parts = unet_lora_parts(unet, dtype)
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, safe_serialization=True, **parts)
    logger.info("Saved the UNet LoRA (%d tensors) to %s", len(parts["unet_lora_layers"]), folder)
    return folder


def _lora_file(folder: Path) -> Path:
    path = lora_file(folder)
    if path is None:
        raise FileNotFoundError(f"'{folder}' holds no {LORA_WEIGHTS} (a UNet LoRA folder written by save_lora or "
                                "diffusers' save_lora_weights)")
    return path


def load_lora_state(unet: nn.Module, folder: str | Path) -> None:
    """Load a saved LoRA into `unet`'s existing adapter, bit for bit; every adapter weight must be in the file
    and every tensor of the file must have an adapter weight to go to (a ValueError names the first few)."""
    require_peft("loading a UNet LoRA")
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from .tensors import load_safetensors

    path = _lora_file(Path(folder))
    state = {k.removeprefix(PREFIX + "."): v for k, v in load_safetensors(path).items()}
    state = convert_unet_state_dict_to_peft(state)
    expected = set(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"'{path}' does not match the UNet's LoRA adapters (rank / target modules differ?): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)


def merged_unet(unet: nn.Module) -> nn.Module:
    """A copy of `unet` with its LoRA folded into the weights (`fuse_lora` + `unload_lora`): a plain
    UNet2DConditionModel that diffusers saves and loads like any other. A UNet without LoRA is copied as is."""
    merged = copy.deepcopy(unet)
    if has_lora(merged):
        merged.fuse_lora()
        merged.unload_lora()
    return merged.requires_grad_(False)


def is_lora_folder(path: Path) -> bool:
    """A LoRA folder or file that adapts a UNet (`unet.*` keys; it may hold a text encoder's adapters too)."""
    return PREFIX in lora_parts(path)


def is_unet_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / UNET_WEIGHTS).is_file()


def load_unet(path: str | Path, base_unet: UNet2DConditionModel, merge: bool = True) -> UNet2DConditionModel:
    """A tuned UNet (fp32, eval, frozen) from `path`:

    - a LoRA folder (pytorch_lora_weights.safetensors): applied to a copy of `base_unet` and merged into a plain
      UNet2DConditionModel (`merge` False: left as adapters, e.g. to write the LoRA again);
    - a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors: a merged export or a full
      fine-tune), whose weights must have `base_unet`'s names and shapes.
    A run or checkpoint folder holding unet_lora/ or unet/ is accepted too (`find_unet`).
    """
    from .loading import check_keys

    folder = find_unet(Path(path))
    if is_lora_folder(folder):
        require_peft("loading a UNet LoRA")
        from peft.utils import get_peft_model_state_dict

        from .tensors import load_safetensors

        unet = copy.deepcopy(base_unet).float()
        unet.load_lora_adapter(str(folder), prefix=PREFIX, weight_name=LORA_WEIGHTS, local_files_only=True,
                               adapter_name=ADAPTER)
        n_file = sum(1 for k in load_safetensors(_lora_file(folder)) if k.startswith(PREFIX + "."))
        n_loaded = len(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
        if n_file == 0 or n_loaded != n_file:
            # diffusers loads what it can and only warns about the rest: a LoRA for another architecture would
            # silently become a partial one.
            raise ValueError(f"'{folder}': {n_loaded} of the {n_file} UNet LoRA tensors found a module of the base "
                             "UNet; the LoRA was trained for another model")
        logger.info("Loaded the UNet LoRA %s (%d tensors)%s", folder, n_file, " and merged it" if merge else "")
        return merged_unet(unet).eval() if merge else unet.requires_grad_(False).eval()
    from diffusers import UNet2DConditionModel

    from .loading import _from_pretrained

    unet = _from_pretrained(UNet2DConditionModel, folder, "UNet", torch_dtype=torch.float32)
    check_keys({k: v.shape for k, v in base_unet.state_dict().items()}, unet.state_dict(), "UNet", folder)
    logger.info("Loaded the UNet %s", folder)
    return unet.requires_grad_(False)


def find_unet(path: Path) -> Path:
    """The tuned-UNet folder of `path`: itself (a LoRA or UNet folder), or its unet_lora/ or unet/."""
    if not path.exists():
        raise FileNotFoundError(f"UNet path '{path}' does not exist (expected a LoRA folder, a UNet folder, or a run "
                                "folder holding unet_lora/ or unet/)")
    if is_lora_folder(path) or is_unet_folder(path):
        return path
    for name in ("unet_lora", "unet"):
        if is_lora_folder(path / name) or is_unet_folder(path / name):
            return path / name
    raise FileNotFoundError(f"'{path}' holds no tuned UNet: expected {LORA_WEIGHTS} (a LoRA folder), config.json + "
                            f"{UNET_WEIGHTS} (a UNet folder), or a run folder with unet_lora/ or unet/")
