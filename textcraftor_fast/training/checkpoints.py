"""Resumable checkpoints that survive crashes, power loss and files from strangers.

A checkpoint is a folder `checkpoints/step-000123/` holding
  text_encoder/        the tuned encoder (diffusers layout: config.json + model.safetensors), drop-in
                       (train.stage = 'unet': unet_lora/ or unet/ instead, see training/stages.py)
  optimizer.pt         optimizer state in torch's per-parameter format whatever the rank count (DeepSpeed's
                       ZeRO shards are gathered first), tensors and numbers only: loaded with weights_only=True
  rng.safetensors      torch CPU/CUDA RNG and the sampler generator's state
  rng.json             Python's random state
  state.json           step, data cursor, metrics offset, grad-scaler state
  config.toml          the config that produced it
  manifest.json        every other file's size and sha256, written last
Writing: files go to a temporary folder, each is fsynced, the manifest last, the folder is fsynced and
renamed into place and the parent fsynced, so a `step-*` folder exists only complete and on disk. Re-saving
a step moves the old folder aside until the new one is in place. Loading: the manifest is checked first; a
bad newest checkpoint makes `latest` fall back to the newest good one (with a warning naming the bad one
and why); an explicit path that fails the check is an error. Nothing is unpickled beyond plain data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from ..atomic import replaced_atomically

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
# What every checkpoint holds besides its weights and the manifest.
COMMON = ("optimizer.pt", "rng.safetensors", "rng.json", "state.json", "config.toml")
# What a text-encoder-stage checkpoint must hold besides the manifest; anything missing makes it incomplete.
# Other stages name their own weight files (`Weights.files`) in place of the encoder's.
REQUIRED = ("text_encoder/model.safetensors", "text_encoder/config.json", *COMMON)


class Weights(Protocol):
    """What a checkpoint stores of the model being trained: its files (relative to the checkpoint folder), how
    they are written and how they are read back (strictly, bit for bit)."""

    files: tuple[str, ...]

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def encoder_files(names: tuple[str, ...] = ("text_encoder",)) -> tuple[str, ...]:
    """The files the text-encoder stage's checkpoint holds for the trained encoders `names`."""
    return tuple(f"{n}/{f}" for n in names for f in ("model.safetensors", "config.json"))


class EncoderWeights:
    """The text-encoder stage's weights: text_encoder/ (and SDXL's text_encoder_2/) of each trained encoder, in the
    diffusers layout. `names` picks the encoders of `text_encoder` (a CLIPTextModel or SDXL's conditioner)."""

    def __init__(self, text_encoder: torch.nn.Module, names: tuple[str, ...] = ("text_encoder",)) -> None:
        from ..models.conditioner import sub_encoders

        self.encoders = {n: sub_encoders(text_encoder)[n] for n in names}
        self.files = encoder_files(names)

    def save(self, folder: Path) -> None:
        from ..models import export_text_encoder

        for name, encoder in self.encoders.items():
            export_text_encoder(encoder, folder / name, layout="diffusers")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from ..models.keymap import clip_state_dict_any_layout

        for name, encoder in self.encoders.items():
            weights = folder / name / "model.safetensors"
            state = load_file(str(weights))
            if set(state) != set(encoder.state_dict()):  # CLIPTextModel: saved prefixed, flattened in memory
                state = clip_state_dict_any_layout(state)
            result = encoder.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"checkpoint '{weights}' does not match the {name.replace('_', ' ')}: missing "
                                 f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def _weights(model: torch.nn.Module | Weights) -> Weights:
    # A bare module is the text encoder: the checkpoint layout this module has always written.
    return EncoderWeights(model) if isinstance(model, torch.nn.Module) else model


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupted or not a checkpoint at all."""


def check_writable(folder: Path) -> None:
    """Create `folder` and write a probe file there, or raise an OSError that names output.dir."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output.dir '{folder}' cannot be created or written ({e.strerror or e}); choose another "
                      "output.dir") from None


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)
    entries = {}
    for p in files:
        _fsync(p)
        entries[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": entries}, indent=1))
    _fsync(folder / MANIFEST)
    for d in {p.parent for p in files} | {folder}:
        _fsync(d)


def _outside(folder: Path, rel: object) -> str | None:
    """Why the manifest entry `rel` does not name a file inside `folder` (None when it does): an absolute path, a
    '..' component, or a link anywhere on the way that leads out of the folder."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or \
            any(part in ("", ".", "..") for part in rel.split("/")):
        return f"{MANIFEST} names {rel!r}, which is not a relative path inside the checkpoint folder"
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder.resolve()) or (folder / rel).is_symlink():
        return f"{MANIFEST} names {rel!r}, which is a link or leads outside the checkpoint folder"
    return None


def verify_checkpoint(path: Path, required: tuple[str, ...] = REQUIRED) -> str | None:
    """None if `path` is a complete checkpoint (holding every file of `required`) whose files match its manifest,
    else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (incomplete, or not written by this version)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for rel in required:
        if rel not in entries:
            return f"{MANIFEST} does not list {rel}" + ("" if rel in COMMON else " (a checkpoint of another "
                                                       "train.stage, unet.method or encoder.method?)")
    if not isinstance(entries, dict):
        return f"{MANIFEST} is unreadable (its files are not a mapping)"
    # Every entry is checked to name a plain file inside the folder before any file is read: a manifest could
    # otherwise point the sha256 pass (and the loaders after it) at any file on the machine.
    for rel, meta in entries.items():
        problem = _outside(path, rel)
        if problem is None and not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                                    and isinstance(meta.get("sha256"), str)):
            problem = f"{MANIFEST} entry {rel!r} has no integer size and sha256 string"
        if problem is not None:
            return problem
    for rel, meta in entries.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated or replaced)"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its sha256 in the manifest (corrupted or modified)"
    return None


def resolve_checkpoint(spec: str, output_dir: str | Path, required: tuple[str, ...] = REQUIRED) -> Path:
    """'latest' -> the newest VALID step-* under output_dir/checkpoints; otherwise a checkpoint folder path,
    which must pass `verify_checkpoint` (with the files `required` of this run's stage)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume 'latest': no checkpoint under '{checkpoints_dir(output_dir)}'; "
                                    "train first or pass a checkpoint folder")
        for path in reversed(found):
            problem = verify_checkpoint(path, required)
            if problem is None:
                return path
            logger.warning("resume 'latest': skipping %s: %s; trying the previous checkpoint", path, problem)
        raise CheckpointError(f"resume 'latest': none of the {len(found)} checkpoints under "
                              f"'{checkpoints_dir(output_dir)}' is intact (see the warnings above); "
                              "start over with output.overwrite=true or restore a checkpoint")
    path = Path(spec)
    if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"resume: '{path}' is not a checkpoint folder (expected {path}/{MANIFEST}); pass a "
                                f"folder like {checkpoints_dir(output_dir)}/step-000010 or 'latest'")
    problem = verify_checkpoint(path, required)
    if problem is not None:
        raise CheckpointError(f"resume: checkpoint '{path}' is not intact: {problem}; pass another checkpoint "
                              "or 'latest' (which falls back to the newest intact one)")
    return path


# ------------------------------------------------------------------------------------------- save / load
def _save_rng(folder: Path, rng: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in rng.items() if torch.is_tensor(v)}, str(folder / "rng.safetensors"))
    (folder / "rng.json").write_text(json.dumps({k: v for k, v in rng.items() if not torch.is_tensor(v)}))


def _load_rng(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    rng: dict[str, Any] = dict(load_file(str(folder / "rng.safetensors")))
    other = json.loads((folder / "rng.json").read_text())
    if "python" in other:  # random.setstate wants tuples; JSON gave lists
        version, internal, gauss = other.pop("python")
        rng["python"] = (version, tuple(internal), gauss)
    return {**rng, **other}


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module | Weights,
                    optimizer: torch.optim.Optimizer | Mapping[str, Any], rng: dict[str, Any],
                    state: dict[str, Any], config_toml: str, keep: int | None) -> Path:
    """Write checkpoint `step`; `model` is the text encoder (a module) or a stage's `Weights`; `optimizer` is an
    optimizer or its state dict (DeepSpeed's, gathered from the shards)."""
    weights = _weights(model)
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    # Written beside its place and renamed into it: disk full keeps the earlier checkpoints as they were, and a
    # re-saved step keeps its previous version until the new one is in place (put back if the rename fails).
    with replaced_atomically(final) as tmp:
        tmp.mkdir()
        weights.save(tmp)
        torch.save(optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict(), tmp / "optimizer.pt")
        _save_rng(tmp, rng)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        (tmp / "config.toml").write_text(config_toml)
        _write_manifest(tmp)  # last: a folder with a valid manifest is complete
    _fsync(root)
    logger.info("Saved checkpoint %s", final)
    if keep is not None:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module | Weights,
                    optimizer: torch.optim.Optimizer | Callable[[dict[str, Any]], None] | None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights (strict), optimizer and RNG state of a checkpoint that passed `resolve_checkpoint`; `model` is
    the text encoder (a module) or a stage's `Weights`; `optimizer` an optimizer or a function loading a state dict
    in torch's per-parameter format (DeepSpeed's: scattered into the shards)."""
    weights = _weights(model)
    missing = [rel for rel in (*weights.files, *COMMON) if not (path / rel).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}; an exact resume "
                              "needs all of them")
    weights.load(path)
    if optimizer is not None:
        saved = load_optimizer_state(path)
        load = optimizer.load_state_dict if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        try:
            load(saved)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{path / 'optimizer.pt'}' does not match the optimizer "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    state = json.loads((path / "state.json").read_text())
    return state, _load_rng(path)


def check_optimizer_name(path: Path, name: str) -> None:
    """Refuse a checkpoint whose optimizer state another optimizer wrote: torch AdamW keeps fp32 moments
    (exp_avg, exp_avg_sq), bitsandbytes' 8-bit AdamW quantised ones (state1/state2 + absmax); neither converts
    into the other, and loading one into the other fails only at the next step, or not at all."""
    import tomllib

    saved = tomllib.loads((path / "config.toml").read_text()).get("optim", {}).get("name", "adamw")
    if saved != name:
        raise CheckpointError(f"checkpoint '{path}' holds {saved!r} optimizer state and this run uses "
                              f"optim.name={name!r}; resume with --set optim.name={saved} (the state of one does "
                              "not convert into the other)")


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state dict of a checkpoint (torch's per-parameter format, any rank count)."""
    try:  # weights_only: tensors, numbers and containers only; a pickle that runs code is refused
        return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path / 'optimizer.pt'}' is not a plain optimizer state "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); refusing to load it") from None
