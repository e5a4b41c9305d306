"""textcraftor_fast: fine-tune Stable Diffusion's text encoder with differentiable rewards (TextCraftor).

    import textcraftor_fast as tc

    cfg = tc.load_config("configs/tiny.toml", overrides=["train.steps=50"])
    result = tc.train(cfg)                                       # -> TrainResult (checkpoint, text_encoder, ...)
    tc.evaluate(cfg, [result.text_encoder], "outputs/eval")      # paired before/after table with 95% intervals
    tc.generate(cfg.model, ["a red circle above a blue square"], "outputs/gen", text_encoders=[result.text_encoder])
    tc.export(cfg, "outputs/pipeline", text_encoder=result.text_encoder, layout="pipeline")

Everything else lives in subpackages by concern (README.md, Layout).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .config import ConfigError, TrainConfig, load_config

if TYPE_CHECKING:
    from .evaluation import EvalOptions, EvalResult, Tuned, evaluate
    from .inference import GenerateOptions, generate
    from .models.export import export
    from .training.trainer import TrainResult, train

__all__ = ["__version__", "ConfigError", "EvalOptions", "EvalResult", "GenerateOptions", "TrainConfig", "TrainResult", "Tuned",
           "evaluate", "export", "generate", "load_config", "train"]

# Lazy: importing the package must not pay for torch/diffusers until a function is used.
_LAZY = {
    "train": "training.trainer", "TrainResult": "training.trainer",
    "evaluate": "evaluation", "EvalOptions": "evaluation", "EvalResult": "evaluation", "Tuned": "evaluation",
    "generate": "inference", "GenerateOptions": "inference",
    "export": "models.export",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'textcraftor_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # cached: a later `from .inference import ...` elsewhere cannot shadow it
    return value
