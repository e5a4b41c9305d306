"""Paired evaluation of tuned text encoders against the original (`evaluate`), and its pieces for
evaluation during training (`core`)."""
from __future__ import annotations

from .entries import Tuned
from .runner import EvalOptions, EvalResult, evaluate

__all__ = ["EvalOptions", "EvalResult", "Tuned", "evaluate"]
