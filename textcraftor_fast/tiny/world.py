"""Load the shipped tiny world (or any folder `python -m textcraftor_fast.tiny.build` wrote) as SDComponents.

The folder has SD1.5's diffusers layout, so `model.kind="pretrained", model.path=<folder>` loads it too;
`model.kind="tiny_world"` is the shortcut to the weights committed in the package.
"""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_dir(folder: str | Path | None = None) -> Path:
    """The world's folder (default: the shipped weights), checked to hold a built world."""
    path = Path(folder) if folder else WEIGHTS_DIR
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "judge")
               if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"tiny world folder '{path}' lacks {', '.join(missing)}/: build it with "
                                f"`python -m textcraftor_fast.tiny.build --out {path}` (20-40 minutes on 2 cores)")
    return path


def load_tiny_world(folder: str | Path | None = None):
    """SDComponents(unet, vae, text_encoder, tokenizer, scheduler) of the tiny world, frozen, in eval mode.

    The engine decides which parts train (the text encoder); everything loads with requires_grad False.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..models import SDComponents
    from .tokenizer import load_tokenizer

    path = weights_dir(folder)
    comp = SDComponents(
        unet=UNet2DConditionModel.from_pretrained(path / "unet"),
        vae=AutoencoderKL.from_pretrained(path / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder"),
        tokenizer=load_tokenizer(path / "tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
    )
    for module in (comp.unet, comp.vae, comp.text_encoder):
        module.eval().requires_grad_(False)
    logger.info("Loaded the tiny world from %s", path)
    return comp


def world_folder(model) -> Path:
    """The folder of the tiny world a ModelConfig loads: the shipped weights for kind 'tiny_world', `path` for
    kind 'pretrained' pointing at a folder the build wrote. Raises ValueError for anything else: only a tiny world
    has a judge and a held-out split to evaluate on."""
    if model.kind == "tiny_world":
        return WEIGHTS_DIR
    if model.kind == "pretrained" and model.path and Path(model.path).is_dir():
        return Path(model.path)
    raise ValueError(f"model.kind={model.kind!r}, model.path={model.path!r} is not a tiny world: use model.kind="
                     f"'tiny_world' (the shipped one) or model.kind='pretrained' with model.path a folder written by "
                     f"`python -m textcraftor_fast.tiny.build`")


def load_tiny_world_kind(cfg, seed: int = 0):
    """model.kind = 'tiny_world' (registered by plugin.py): the shipped world."""
    return load_tiny_world()


def load_judge(folder: str | Path | None = None):
    """The world's judge CNN (frozen), the model behind the tiny-world rewards."""
    from .models import read_judge

    return read_judge(weights_dir(folder) / "judge")
