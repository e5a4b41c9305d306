"""Prompt sets for evaluation: a prompt file, `builtin:parti`, or the tiny world's held-out captions.

For evaluation `builtin:tiny_world` means the world's held-out TEST captions (the demo's reported split),
never its training captions; `builtin:tiny_world:validation` is the other held-out split.
"""
from __future__ import annotations

from importlib import resources

from ..data import load_prompts

TINY_WORLD_SPLITS = {"builtin:tiny_world": "test", "builtin:tiny_world:test": "test",
                     "builtin:tiny_world:validation": "validation"}


def is_tiny_world_set(source: str) -> bool:
    return source in TINY_WORLD_SPLITS


def eval_prompts(source: str, field: str = "prompt", max_prompts: int | None = None) -> list[str]:
    """The distinct prompts of `source`, in file order (at most `max_prompts`)."""
    if source in TINY_WORLD_SPLITS:
        path = resources.files("textcraftor_fast").joinpath(f"tiny/prompts/{TINY_WORLD_SPLITS[source]}.txt")
        return load_prompts(str(path), max_prompts=max_prompts)
    if source.startswith("builtin:tiny_world"):
        raise ValueError(f"unknown prompt set {source!r}; the tiny world's evaluation sets are "
                         f"{', '.join(TINY_WORLD_SPLITS)}")
    return load_prompts(source, field, max_prompts)
