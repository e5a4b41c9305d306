"""What an evaluation compares against the original model: tuned models, each a tuned text encoder and/or a tuned
UNet (a UNet-stage LoRA or UNet folder); a part left out is the base model's.

    Tuned(text_encoder="outputs/enc/text_encoder")                   # encoder stage only
    Tuned(unet="outputs/unet_only/unet_lora")                        # UNet stage on the base encoder
    Tuned.from_folder("outputs/both")                                # a run folder: text_encoder/ + unet_lora/
    Tuned(text_encoder="outputs/a:0.7+outputs/b:0.5")                # two encoder LoRAs stacked, scaled

A plain string is a tuned text encoder, as `evaluate` has always taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tuned:
    """One evaluated model: a tuned text encoder and/or a tuned UNet (None: the base model's part)."""

    text_encoder: str | None = None
    unet: str | None = None
    name: str = ""
    """A column name; empty: derived from the paths (the run folder's name)."""

    def __post_init__(self) -> None:
        if self.text_encoder is None and self.unet is None:
            raise ValueError("a tuned model needs a tuned text encoder and/or a tuned UNet")

    @classmethod
    def from_folder(cls, path: str | Path) -> Tuned:
        """What `path` holds: a run folder (or checkpoint) with text_encoder/ or text_encoder_lora/ and/or unet_lora/
        or unet/, a text_encoder folder, or a LoRA folder (a text encoder's and/or a UNet's) or UNet folder alone."""
        from ..models.encoder_lora import find_encoder_lora
        from ..models.adapters import lora_parts
        from ..models.lora import find_unet, is_lora_folder, is_unet_folder

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"model folder '{p}' does not exist (expected a run folder holding text_encoder/ "
                                    "and/or unet_lora/ or unet/)")
        if is_lora_folder(p) or is_unet_folder(p):  # a UNet LoRA file may hold the encoder's adapters too
            return cls(str(p) if "text_encoder" in lora_parts(p) else None, str(p), name=run_name(p))
        encoder = p / "text_encoder" if (p / "text_encoder" / "config.json").is_file() else (
            p if (p / "config.json").is_file() else None)
        if (p / "text_encoder_2" / "config.json").is_file():  # SDXL: the folder holding its tuned encoders
            encoder = p
        if encoder is None and find_encoder_lora(p) is not None:
            encoder = p
        try:
            unet = find_unet(p)
        except FileNotFoundError:
            unet = None
        if encoder is None and unet is None:
            raise FileNotFoundError(f"'{p}' holds neither a text encoder (text_encoder/config.json or "
                                    "text_encoder_lora/) nor a tuned UNet (unet_lora/ or unet/)")
        return cls(str(encoder) if encoder else None, str(unet) if unet else None, p.name)

    @property
    def label(self) -> str:
        return self.name or run_name(Path(self.text_encoder or self.unet))

    def describe(self) -> str:
        parts = [f"text encoder {self.text_encoder}" if self.text_encoder else "base text encoder",
                 f"UNet {self.unet}" if self.unet else "base UNet"]
        return ", ".join(parts)


def run_name(p: Path) -> str:
    """'outputs/run1/text_encoder' or 'outputs/run1/unet_lora' -> 'run1'."""
    return p.parent.name if p.name in ("text_encoder", "text_encoder_lora", "unet_lora", "unet", "") and p.parent.name \
        else p.stem or str(p)


def as_tuned(entry: str | Path | Tuned) -> Tuned:
    return entry if isinstance(entry, Tuned) else Tuned(text_encoder=str(entry))
