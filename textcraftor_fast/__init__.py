"""textcraftor_fast: fine-tune Stable Diffusion's text encoder with differentiable rewards (TextCraftor)."""
from __future__ import annotations

from .config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "EvalOptions", "TrainConfig", "TrainResult", "Tuned", "evaluate", "load_config", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package must not pay for torch/diffusers until a function is used.
    if name in ("train", "TrainResult"):
        from . import engine
        return getattr(engine, name)
    if name in ("evaluate", "EvalOptions", "Tuned"):
        from . import evaluation
        return getattr(evaluation, name)
    raise AttributeError(f"module 'textcraftor_fast' has no attribute {name!r}")
