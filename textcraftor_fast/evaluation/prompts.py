"""Prompt sets for evaluation: a prompt file or a registered set (registry.PROMPT_SETS), whose evaluation
prompts may be held out from its training ones (the tiny world's 'builtin:tiny_world' evaluates on its test
captions), and the extra per-sample scorers a set brings for the images of its model kind."""
from __future__ import annotations

from ..data import load_prompts
from ..registry import PROMPT_SETS, import_target
from .core import Scorer


def eval_prompts(source: str, field: str = "prompt", max_prompts: int | None = None) -> list[str]:
    """The distinct evaluation prompts of `source`, in file order (at most `max_prompts`)."""
    return load_prompts(source, field, max_prompts, purpose="evaluation")


def extra_scorers(source: str, model_kind: str) -> list[Scorer]:
    """The scorers prompt set `source` adds when the images come from a model of `model_kind` (the tiny world's
    judge accuracy per attribute); none for prompt files and other kinds."""
    if source not in PROMPT_SETS:
        return []
    entry = PROMPT_SETS.get(source)
    if entry.scorer is None or entry.scored_kind != model_kind:
        return []
    return [import_target(entry.scorer, f"scorer of prompt set {source!r}")()]
