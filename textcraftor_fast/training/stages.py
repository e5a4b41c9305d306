"""Training stages: what a run fine-tunes, how its weights go into a checkpoint, and what the run leaves behind.

    TextEncoderStage  train.stage = "text_encoder" (TextCraftor): the CLIP text encoder trains with fp32 master
                      weights; a frozen copy of it, the "original", conditions the early no-grad steps; the UNet
                      is frozen. Checkpoints hold text_encoder/; the run ends by writing output.dir/text_encoder/.
    EncoderLoraStage  the same with encoder.method = "lora": LoRA adapters on the encoder train, the base stays
                      frozen and, with the adapters off, is the original (no copy). Checkpoints hold
                      text_encoder_lora/; the run ends by writing output.dir/text_encoder_lora/.
    UNetStage         train.stage = "unet" (the paper's second stage, AlignProp / DRaFT style): the UNet trains,
                      as LoRA adapters (peft) or in full; the text encoder (model.text_encoder_path, e.g. an
                      encoder-stage run's text_encoder/; unset: the base one) is frozen and is both the "original"
                      and the "trainable" encoder, so the sampler's two embeddings coincide and carry no gradient.
                      Checkpoints hold unet_lora/ (or unet/); the run ends by writing output.dir/unet_lora/ (or
                      unet/) and, when model.text_encoder_path is set, a copy of that encoder in text_encoder/, so
                      that the run folder holds everything that differs from the base model.

The Trainer asks a stage for its modules, its checkpoint `weights` (checkpointing.Weights), `export` at the end,
`monitor` per log line and `evaluated` for evaluation during training; it never asks which stage it runs.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from ..atomic import replaced_atomically
from ..config import ConfigError
from ..models.conditioner import SDXLConditioner, sub_encoders
from .checkpoints import COMMON, EncoderWeights, Weights, encoder_files
from ..models.adapters import LORA_WEIGHTS, AdaptersDisabled
from ..models.encoder_lora import LORA_DIR as ENCODER_LORA_DIR, load_encoder_lora_state, save_encoder_lora
from ..models.lora import UNET_WEIGHTS, load_lora_state, save_lora
from .monitor import embedding_monitor, weight_drift
from ..rewards import freeze

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..models import SDComponents

logger = logging.getLogger(__name__)

LORA_DIR, UNET_DIR, ENCODER_DIR = "unet_lora", "unet", "text_encoder"


LORA_FILES = (f"{LORA_DIR}/{LORA_WEIGHTS}",)
FULL_UNET_FILES = (f"{UNET_DIR}/config.json", f"{UNET_DIR}/{UNET_WEIGHTS}")
ENCODER_LORA_FILES = (f"{ENCODER_LORA_DIR}/{LORA_WEIGHTS}",)


def checkpoint_files(cfg: TrainConfig) -> tuple[str, ...]:
    """Every file a checkpoint of this config's stage must hold besides the manifest (known before any model is
    built, so that a resume target is checked in milliseconds; SDXL with encoder.train empty trains both encoders
    and the loaded stage checks text_encoder_2/ too)."""
    if cfg.train.stage == "text_encoder":
        if cfg.encoder.method == "lora":
            return (*ENCODER_LORA_FILES, *COMMON)
        return (*encoder_files(cfg.encoder.train or ("text_encoder",)), *COMMON)
    return (*(LORA_FILES if cfg.unet.method == "lora" else FULL_UNET_FILES), *COMMON)


class Stage:
    """The modules a Trainer runs and what it trains. `unet` is what the sampler calls; `text_encoder` gives the
    embeddings of the graph-carrying steps and `original_encoder` (frozen) those of the early steps; the optimizer
    updates the parameters of `trainable` that require grad; `base_unet` is the UNet before any update."""

    name: str
    unet: nn.Module
    text_encoder: nn.Module
    original_encoder: nn.Module
    trainable: nn.Module
    base_unet: nn.Module | None
    weights: Weights

    def export(self, output_dir: Path, write: bool = True) -> dict[str, Path]:
        """What the run leaves in `output_dir` ({'text_encoder': ..., 'unet': ...}); files only when `write`, each
        folder replaced in one rename (a failed write leaves an earlier export as it was)."""
        raise NotImplementedError

    def monitor(self, tokenize: Callable[[list[str]], Tensor], prompts: list[str]) -> dict[str, float]:
        """Cheap numbers for each log line that show the trained model drifting."""
        raise NotImplementedError

    def evaluated(self) -> tuple[nn.Module | None, nn.Module]:
        """(tuned encoder or None, UNet) to evaluate against (original encoder, `base_unet`)."""
        raise NotImplementedError

    def unets(self) -> dict[str, nn.Module]:
        """Every distinct UNet module the run calls: each gets the same op swaps and speed options, or the base
        and the tuned UNet differ before any update."""
        found = {"unet": self.unet}
        if self.base_unet is not None and not isinstance(self.base_unet, AdaptersDisabled) \
                and self.base_unet is not self.unet:
            found["base_unet"] = self.base_unet  # method 'full': a frozen copy, for evaluation during training
        return found


def _cast_base_keep_adapters(model: nn.Module, cast: dict) -> None:
    """Cast a LoRA-adapted model's frozen base as `cast` says and keep its adapters fp32 (diffusers'
    cast_training_params). Adapters are created in the base layer's dtype, hence added while it is still fp32."""
    model.to(**cast)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


class _LoraWeights:
    """A LoRA-adapted model's checkpoint weights: its adapters as one diffusers LoRA file in `<folder>/<name>/`,
    fp32, so the file is the exact state; `save_fn`/`load_fn` are the model's LoRA writer and strict reader."""

    def __init__(self, model: nn.Module, name: str, save_fn: Callable, load_fn: Callable) -> None:
        self.model, self.name, self._save_fn, self._load_fn = model, name, save_fn, load_fn
        self.files = (f"{name}/{LORA_WEIGHTS}",)

    def save(self, folder: Path) -> None:
        self.write(folder / self.name)

    def write(self, path: Path) -> None:
        self._save_fn(self.model, path)

    def load(self, folder: Path) -> None:
        self._load_fn(self.model, folder / self.name)


def trained_encoder_names(train: tuple[str, ...], encoder: nn.Module) -> tuple[str, ...]:
    """encoder.train resolved against the model's encoders (empty: all of them); a name the model lacks is a
    ConfigError naming the key and what the model has."""
    have = tuple(sub_encoders(encoder))
    missing = [n for n in train if n not in have]
    if missing:
        raise ConfigError(f"config key 'encoder.train': {missing} not among this model's text encoders {list(have)} "
                          "(text_encoder_2 is SDXL's; empty trains every encoder)")
    return tuple(train) or have


class TextEncoderStage(Stage):
    name = "text encoder"

    def __init__(self, comp: SDComponents, device: torch.device, cast: dict, train: tuple[str, ...] = ()) -> None:
        # Frozen towers are stored in the autocast dtype: they never update, so fp32 copies would only cost memory
        # and a cast per call. The trained encoders keep fp32 master weights; on SDXL an encoder that does not train
        # is frozen like a tower and shared with the original (held once).
        self.unet = self.base_unet = freeze(comp.unet).to(device, **cast)
        encoder = comp.text_encoder.to(device).float().train()
        self.trained = trained_encoder_names(train, encoder)
        parts = sub_encoders(encoder)
        for name, part in parts.items():
            if name in self.trained:
                part.requires_grad_(True)
            else:
                freeze(part).to(**cast)
        self.text_encoder = self.trainable = encoder
        if isinstance(encoder, SDXLConditioner):
            originals = {n: freeze(copy.deepcopy(parts[n])).to(**cast) for n in self.trained}
            self.original_encoder = freeze(encoder.replaced(**originals))
            logger.info("Text-encoder stage (SDXL): training %s; %s frozen", " and ".join(self.trained),
                        " and ".join(n for n in parts if n not in self.trained) or "none")
        else:
            self.original_encoder = freeze(copy.deepcopy(encoder)).to(**cast)
        self.weights = EncoderWeights(encoder, self.trained)

    def export(self, output_dir: Path, write: bool = True) -> dict[str, Path]:
        """text_encoder/ (and SDXL's text_encoder_2/) of each trained encoder. The returned 'text_encoder' is what
        model.text_encoder_path takes: the text_encoder/ folder, or for SDXL the folder holding both."""
        parts = sub_encoders(self.text_encoder)
        if write:
            from ..models import export_text_encoder

            for name in self.trained:
                with replaced_atomically(output_dir / name) as tmp:
                    export_text_encoder(parts[name], tmp, layout="diffusers")
        sdxl = isinstance(self.text_encoder, SDXLConditioner)
        return {"text_encoder": output_dir if sdxl else output_dir / ENCODER_DIR}

    def monitor(self, tokenize: Callable[[list[str]], Tensor], prompts: list[str]) -> dict[str, float]:
        return embedding_monitor(self.text_encoder, self.original_encoder, tokenize, prompts,
                                 weight_drift(self.text_encoder, self.original_encoder))

    def evaluated(self) -> tuple[nn.Module | None, nn.Module]:
        return self.text_encoder, self.unet


class EncoderLoraStage(TextEncoderStage):
    """encoder.method = 'lora': adapters on the encoder train (fp32), its base weights stay frozen in the autocast
    dtype, and the original encoder is the same module with the adapters switched off: no second copy."""

    name = "text encoder (LoRA)"

    def __init__(self, comp: SDComponents, device: torch.device, cast: dict, cfg: TrainConfig) -> None:
        from ..models.encoder_lora import add_encoder_lora

        e = cfg.encoder
        trained_encoder_names(e.train, comp.text_encoder)  # a name the model lacks fails here too
        if isinstance(comp.text_encoder, SDXLConditioner):
            raise ConfigError("config key 'encoder.method': expected 'full' for an SDXL model (LoRA on SDXL's two "
                              "encoders is not built yet); choose the encoders that learn with encoder.train")
        self.unet = self.base_unet = freeze(comp.unet).to(device, **cast)
        encoder = comp.text_encoder.to(device).float().train()
        n = add_encoder_lora(encoder, e.rank, e.lora_alpha, e.target_modules, e.init)
        _cast_base_keep_adapters(encoder, cast)
        self.text_encoder = self.trainable = encoder
        # A reward tower whose text transformer is the base encoder's runs this wrapper too (adapters off).
        self.original_encoder = AdaptersDisabled(encoder)
        self.weights = _LoraWeights(encoder, ENCODER_LORA_DIR, save_encoder_lora, load_encoder_lora_state)
        logger.info("Text-encoder stage: LoRA rank %d, alpha %g on %s (%s parameters)", e.rank, e.lora_alpha,
                    ", ".join(e.target_modules), f"{n:,}")

    def export(self, output_dir: Path, write: bool = True) -> dict[str, Path]:
        final = output_dir / ENCODER_LORA_DIR
        if write:
            with replaced_atomically(final) as tmp:
                self.weights.write(tmp)
        return {"text_encoder": final}

    def monitor(self, tokenize: Callable[[list[str]], Tensor], prompts: list[str]) -> dict[str, float]:
        from ..models.adapters import lora_drift

        return embedding_monitor(self.text_encoder, self.original_encoder, tokenize, prompts,
                                 lora_drift(self.text_encoder))


class _FullUNetWeights:
    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.files = FULL_UNET_FILES

    def save(self, folder: Path) -> None:
        self.write(folder / UNET_DIR)

    def write(self, path: Path) -> None:
        self.unet.save_pretrained(path)

    def load(self, folder: Path) -> None:
        from ..models.loading import check_keys, load_safetensors

        path = folder / UNET_DIR / UNET_WEIGHTS
        state = load_safetensors(path)
        check_keys({k: v.shape for k, v in self.unet.state_dict().items()}, state, "UNet", path)
        self.unet.load_state_dict(state, strict=True)


class UNetStage(Stage):
    name = "UNet"

    def __init__(self, comp: SDComponents, device: torch.device, cast: dict, cfg: TrainConfig) -> None:
        u = cfg.unet
        self.method = u.method
        self.keep_encoder = bool(cfg.model.text_encoder_path)
        # The frozen encoder stays fp32 (it is small beside the UNet): the copy written at the end is exact.
        self.text_encoder = freeze(comp.text_encoder).to(device)
        # Sample as the encoder stage trained and as evaluation and generate sample a tuned encoder: the steps before
        # sampler.switch_step and the unconditional embedding from the base model's encoder, the rest from the tuned
        # one. (Conditioning both on the tuned encoder trained the adapters under a CFG that inference never uses.)
        base = comp.base_text_encoder
        self.original_encoder = self.text_encoder if base is None else freeze(base).to(device, **cast)
        # eval(): the UNet has no dropout to switch, and eval keeps every sampler call the same function the
        # no-grad steps and inference use.
        unet = comp.unet.to(device).float().eval()
        if u.method == "lora":
            from ..models.lora import add_lora

            n = add_lora(unet, u.rank, u.lora_alpha, u.target_modules, u.init)
            _cast_base_keep_adapters(unet, cast)
            self.base_unet = AdaptersDisabled(unet)
            self.weights: Weights = _LoraWeights(unet, LORA_DIR, save_lora, load_lora_state)
            logger.info("UNet stage: LoRA rank %d, alpha %g on %s (%s parameters)", u.rank, u.lora_alpha,
                        ", ".join(u.target_modules), f"{n:,}")
        else:
            unet.requires_grad_(True)
            # The base is needed only to compare against during training: a frozen copy in the autocast dtype.
            self.base_unet = freeze(copy.deepcopy(unet)).to(**cast) if cfg.train.eval_every > 0 else None
            self.weights = _FullUNetWeights(unet)
            logger.info("UNet stage: full fine-tuning, fp32 master weights")
        self.unet = self.trainable = unet
        if cfg.train.embedding_anchor > 0:
            logger.warning("train.embedding_anchor=%g regularises the text encoder's embeddings; the UNet stage "
                           "keeps the encoder frozen, so it has no effect here", cfg.train.embedding_anchor)

    def export(self, output_dir: Path, write: bool = True) -> dict[str, Path]:
        out = {"unet": output_dir / (LORA_DIR if self.method == "lora" else UNET_DIR)}
        if self.keep_encoder:
            out["text_encoder"] = output_dir / ENCODER_DIR
        if write:
            with replaced_atomically(out["unet"]) as tmp:
                self.weights.write(tmp)
            if self.keep_encoder:
                from ..models import export_text_encoder

                with replaced_atomically(out["text_encoder"]) as tmp:
                    export_text_encoder(self.text_encoder, tmp, layout="diffusers")
        return out

    def monitor(self, tokenize: Callable[[list[str]], Tensor], prompts: list[str]) -> dict[str, float]:
        if self.method == "lora":
            from ..models.adapters import lora_drift

            return {"drift": lora_drift(self.unet)}
        return {}

    def evaluated(self) -> tuple[nn.Module | None, nn.Module]:
        return (self.text_encoder if self.keep_encoder else None), self.unet


def build_stage(cfg: TrainConfig, comp: SDComponents, device: torch.device, cast: dict) -> Stage:
    """The stage `cfg.train.stage` names, built from loaded components (which it moves, casts and freezes)."""
    if cfg.train.stage == "text_encoder":
        if cfg.encoder.method == "lora":
            return EncoderLoraStage(comp, device, cast, cfg)
        return TextEncoderStage(comp, device, cast, cfg.encoder.train)
    if cfg.train.stage == "unet":
        return UNetStage(comp, device, cast, cfg)
    raise ValueError(f"train.stage must be one of 'text_encoder', 'unet'; got {cfg.train.stage!r}")
