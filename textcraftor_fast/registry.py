"""Named extension points: what a config or the command line can name besides a file or an import string.

    MODEL_KINDS   model.kind = "<name>"                    ModelKind: a loader (ModelConfig, seed) -> SDComponents
    REWARDS       [[rewards]] name = "<name>"              "module:attribute" of a Reward class or factory
    PROMPT_SETS   data.path, data.eval_path, --prompts     PromptSet: packaged prompt files, optional extra scorer
    CONFIGS       --config builtin:<name>                  "package:relative/path.toml"
    COMMANDS      textcraftor-fast <name>                  Command: argparse set-up and handler

Every entry is held as import strings and imported only when a run names it, so an unused reward tower or world
costs nothing and this module imports nothing of the package. The engine's own entries are below; a plugin adds
its own through `register`, the call a user's code makes too. The embedded tiny world (`textcraftor_fast.tiny`)
is such a plugin: `PLUGINS` names its registration function, which runs at the first lookup, and nothing outside
`tiny/` imports it.
"""
from __future__ import annotations

import difflib
import importlib
import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

PLUGINS = ("textcraftor_fast.tiny.plugin:register",)
"""Registration functions run once before the first lookup in any registry."""


def import_target(target: str, what: str = "entry"):
    """The attribute a "module:attribute" string names; ImportError naming the string when it cannot be had."""
    module_name, sep, attr = target.partition(":")
    if not (sep and module_name and attr):
        raise ImportError(f"{what} '{target}' is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"{what} '{target}': cannot import module '{module_name}': {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{what} '{target}': module '{module_name}' has no attribute '{attr}'") from None


@dataclass(frozen=True)
class ModelKind:
    loader: str
    """'module:function' of `f(cfg: ModelConfig, seed: int) -> SDComponents`."""
    eval_prompts: str = "builtin:parti"
    """The prompt set `textcraftor-fast evaluate` uses for this kind when --prompts is not given."""


@dataclass(frozen=True)
class PromptSet:
    train: str | None
    """'package:relative/file' of the prompts a run trains on (data.path); None: not a training set."""
    evaluation: str | None
    """The prompts evaluation reads (data.eval_path, `evaluate --prompts`): held-out ones where the set has them."""
    scorer: str | None = None
    """'module:function' of a factory of extra per-sample scores (evaluation.core.Scorer) for this set's prompts..."""
    scored_kind: str | None = None
    """...on images of this model kind."""


@dataclass(frozen=True)
class Command:
    add_arguments: str
    """'module:function' of `f(parser)`, adding the command's arguments (the CLI adds --config and --set)."""
    run: str
    """'module:function' of `f(args) -> exit status`."""
    help: str
    default_config: str | None = None
    """--config when none is given (None: --config is required)."""


class Registry(Generic[T]):
    """name -> entry, for one kind of thing (`what`, used in errors)."""

    def __init__(self, what: str, entries: dict[str, T]) -> None:
        self.what = what
        self._entries = dict(entries)

    def register(self, name: str, entry: T, replace: bool = False) -> None:
        """Add `entry` under `name`; an existing name is an error unless `replace`."""
        if name in self._entries and not replace and self._entries[name] != entry:
            raise ValueError(f"{self.what} '{name}' is already registered ({self._entries[name]}); pass "
                             "replace=True to override it")
        self._entries[name] = entry

    def names(self) -> list[str]:
        _load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _load_plugins()
        return name in self._entries

    def get(self, name: str) -> T:
        """The entry under `name`; a KeyError naming the close matches and every valid name otherwise."""
        _load_plugins()
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.what} {name!r}{hint} (registered: {', '.join(map(repr, self.names()))})")
        return self._entries[name]


MODEL_KINDS: Registry[ModelKind] = Registry("model kind", {
    "pretrained": ModelKind("textcraftor_fast.models.loading:load_pretrained_kind"),
    "tiny_random": ModelKind("textcraftor_fast.models.tiny_random:build_tiny_random_kind"),
})
REWARDS: Registry[str] = Registry("reward", {
    "brightness": "textcraftor_fast.rewards.simple:BrightnessReward",
    "colorfulness": "textcraftor_fast.rewards.simple:ColorfulnessReward",
    "aesthetic": "textcraftor_fast.rewards.aesthetic:AestheticReward",
    "clip_score": "textcraftor_fast.rewards.clip_score:ClipScoreReward",
    "pickscore": "textcraftor_fast.rewards.pickscore:PickScoreReward",
    "hpsv2": "textcraftor_fast.rewards.hpsv2:HPSv2Reward",
})
PROMPT_SETS: Registry[PromptSet] = Registry("prompt set", {
    "builtin:parti": PromptSet("textcraftor_fast:prompt_sets/PartiPrompts.tsv",
                               "textcraftor_fast:prompt_sets/PartiPrompts.tsv"),
})
CONFIGS: Registry[str] = Registry("built-in config", {})
COMMANDS: Registry[Command] = Registry("command", {})

_loaded = False


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a plugin's own lookups must not load the plugins again
    for target in PLUGINS:
        try:
            register = import_target(target, "plugin")
        except ImportError as e:  # a build without the plugin still runs everything else
            logger.warning("plugin not loaded: %s", e)
            continue
        register()


def resource_path(target: str):
    """The file a 'package:relative/path' string names, as an importlib.resources Traversable."""
    from importlib import resources

    package, _, relative = target.partition(":")
    return resources.files(package).joinpath(relative)
