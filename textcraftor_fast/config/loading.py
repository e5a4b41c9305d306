"""Loading the config tree: TOML files (or a built-in config, registry.CONFIGS), 'a.b=c' overrides, the spellings
users type in diffusers' training scripts (`ALIASES`), typed coercion whose errors name the key, the closest valid
keys and the choices, and writing a config back as TOML."""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ..registry import CONFIGS, resource_path
from .sections import ConfigError, TrainConfig, _default_rewards


# Spellings users already type in diffusers training scripts, mapped to ours.
ALIASES: dict[str, str] = {
    "train.learning_rate": "optim.lr",
    "train.train_batch_size": "train.batch_size",
    "train.max_train_steps": "train.steps",
    "train.use_8bit_adam": "optim.name",  # value True -> "adamw8bit"
    "train.gradient_checkpointing": "sampler.checkpoint",  # value True -> "step", False -> "none"
    "train.compile": "ops.compile",  # the name the performance issue and diffusers users reach for
    "train.allow_tf32": "ops.tf32",  # diffusers' --allow_tf32
    "output.output_dir": "output.dir",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] == tuple[args[0], ...]:  # e.g. output.report_to: a name or a list of names
            return f"{_type_name(args[0])}, or a list of them"
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "unset"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML/override value to the annotated type or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise ConfigError(f"config key '{key}': expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        finite = [e for e in errors if "finite" in str(e)]
        if finite:
            raise finite[0]  # the float branch's "expected a finite number" says more than the union's name
        listed = [e for arg, e in zip((a for a in args if a is not type(None)), errors)
                  if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple))]
        if listed:
            raise listed[0]  # a list's own error names the bad entry ('output.report_to.1') and the choices
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a table of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Mapping, dict, collections.abc.Mapping) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # TOML reads inf and nan as floats; no setting means either (guidance_scale = inf trains NaN steps).
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr((prefix + '.' if prefix else '') + c) for c in close)}?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {valid})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (numbers, bools, lists, strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_alias(path: list[str], value: Any) -> tuple[list[str], Any]:
    key = ".".join(path)
    if key not in ALIASES:
        return path, value
    target = ALIASES[key]
    if key == "train.use_8bit_adam":
        value = "adamw8bit" if value else "adamw"
    elif key == "train.gradient_checkpointing":
        value = "step" if value else "none"
    return target.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any, original: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{original}': '{part}' is not an index of the {len(node)}-entry list "
                                  f"'{'.'.join(path[:i])}'")
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{original}': '{last}' is not an index of list '{'.'.join(path[:-1])}'")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form a.b=c (e.g. train.steps=3)")
        key, text = item.split("=", 1)
        path, value = _apply_alias(key.strip().split("."), _parse_value(text.strip()))
        if path[0] == "rewards" and "rewards" not in tree:
            tree["rewards"] = [dataclasses.asdict(r) for r in _default_rewards()]
        _set_path(tree, path, value, item)
    return tree


def _normalise_aliases(tree: dict[str, Any]) -> dict[str, Any]:
    """Rewrite alias keys found in a TOML file (e.g. [train] learning_rate) to their canonical place."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for alias in ALIASES:
        section, key = alias.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            value = out[section].pop(key)
            path, value = _apply_alias([section, key], value)
            _set_path(out, path, value, alias)
    return out


def config_from_dict(tree: Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    data = apply_overrides(_normalise_aliases(dict(tree)), overrides)
    cfg = _build(TrainConfig, data)
    cfg.validate()
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, with 'builtin:<name>' mapped to the copy a package ships (registry.CONFIGS); the
    repository's configs/<name>.toml is the readable copy (a test keeps the two identical)."""
    text = str(path)
    if text.startswith("builtin:"):
        if text not in CONFIGS:
            raise ConfigError(f"unknown built-in config {text!r}; built-in configs: {', '.join(CONFIGS.names())}")
        return Path(str(resource_path(CONFIGS.get(text))))
    return Path(path)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a TOML config ('builtin:tiny' names the shipped one; None: the defaults), apply 'a.b=c' overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist (pass a TOML file, e.g. configs/tiny_random.toml, "
                              f"or a built-in config: {', '.join(CONFIGS.names())})")
        try:
            tree = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None
    return config_from_dict(tree, overrides)


def to_toml(cfg: TrainConfig) -> str:
    """Serialise a config back to TOML (for saving beside checkpoints)."""
    plain = cfg.to_dict()
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    for key, value in plain.items():
        if not isinstance(value, (Mapping, list)):
            lines.append(f"{key} = {fmt(value)}")
    for key, value in plain.items():
        if isinstance(value, Mapping):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {fmt(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            for entry in value:
                lines.append(f"\n[[{key}]]")
                lines += [f"{k} = {fmt(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"
