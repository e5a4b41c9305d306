"""Reading reward checkpoints from local disk and loading them strictly, with errors that name file and keys.

Users bring the published files; nothing is downloaded. One reader handles every layout the reward
towers are published in: `.safetensors`, pickled state dicts (`.pt/.pth/.bin`, read with
`weights_only=True`, optionally wrapped as {"state_dict": ...} the way HPSv2 saves), and TorchScript
archives (the OpenAI CLIP `ViT-L-14.pt`). A mismatch between a file and the architecture is reported
as missing / unexpected / wrong-shape keys, never as a silent partial load.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError

_WRAPPER_KEYS = ("state_dict", "model", "module")
_MAX_LISTED = 8


def require_path(path: str | Path, what: str) -> Path:
    """The path as a Path, or FileNotFoundError saying which reward needs it and what to pass."""
    if not str(path):
        raise ConfigError(f"{what}: no path given; set `path` to a local file or folder (nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: '{p}' does not exist (rewards load local files only; nothing is downloaded)")
    return p


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zip files holding a `constants.pkl` / `code/` entry; plain torch.save zips do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint file as a flat {key: tensor} dict on CPU.

    Unwraps {"state_dict": ...}-style containers and a DistributedDataParallel `module.` prefix.
    """
    p = require_path(path, "checkpoint")
    if p.is_dir():
        raise ConfigError(f"checkpoint '{p}' is a folder; expected a .safetensors/.pt/.pth/.bin file")
    if p.suffix == ".safetensors":
        from ..models.loading import load_safetensors
        sd: Mapping = load_safetensors(p)
    elif _is_torchscript(p):
        sd = torch.jit.load(str(p), map_location="cpu").state_dict()
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ConfigError(f"checkpoint '{p}' could not be read as a torch state dict: {e}") from None
    while isinstance(sd, Mapping) and not any(isinstance(v, Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd), None)
        if inner is None:
            raise ConfigError(f"checkpoint '{p}' holds no tensors at top level and none of the wrapper keys "
                              f"{_WRAPPER_KEYS}; top-level keys: {_listed(sd.keys())}")
        sd = inner
    if not isinstance(sd, Mapping):
        raise ConfigError(f"checkpoint '{p}' holds a {type(sd).__name__}, expected a state dict")
    out = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_state_dict(expected: Mapping[str, torch.Size], got: Mapping[str, Tensor], source: str,
                     arch: str) -> None:
    """Raise ConfigError listing missing, unexpected and wrong-shape keys (all of them, not just the first)."""
    missing = set(expected) - set(got)
    unexpected = set(got) - set(expected)
    bad_shape = [f"{k}: file {tuple(got[k].shape)} vs {arch} {tuple(expected[k])}"
                 for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or bad_shape):
        return
    parts = [f"checkpoint '{source}' does not match the {arch} architecture:"]
    if missing:
        parts.append(f"  {len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected keys: {_listed(unexpected)}")
    if bad_shape:
        more = f" ... (+{len(bad_shape) - _MAX_LISTED} more)" if len(bad_shape) > _MAX_LISTED else ""
        parts.append(f"  {len(bad_shape)} keys with wrong shapes: " + "; ".join(bad_shape[:_MAX_LISTED]) + more)
    raise ConfigError("\n".join(parts))


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, arch: str,
                assign: bool = False) -> nn.Module:
    """Check keys and shapes against `module` (clear error), then load_state_dict(strict=True)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source, arch)
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module
