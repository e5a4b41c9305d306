"""Writing generated images: PNGs that carry their settings as text chunks, and a labelled contact sheet.

The settings travel inside each PNG (PIL `PngInfo` tEXt/iTXt chunks, read back with `Image.open(p).text`
or `read_png_settings`), so an image found later says how to regenerate it. The contact sheet is PIL only
(no matplotlib): one cell per image, its prompt written under it, small images scaled up by whole pixels.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

MIN_CELL = 128
"""Contact-sheet cells are at least this many pixels wide: a 32x32 image would leave no room for its prompt."""
LABEL_LINES = 3
PAD = 6


def to_pil(image: Tensor) -> PILImage.Image:
    """(3, H, W) in [0, 1] -> an 8-bit RGB PIL image."""
    from PIL import Image

    arr = (image.detach().float().cpu().permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(arr)


def _as_text(value: Any) -> str:
    # Strings stay as typed (a prompt must read back verbatim); everything else is JSON, so lists and
    # numbers read back with json.loads.
    return value if isinstance(value, str) else json.dumps(value)


def save_png(image: PILImage.Image, path: str | Path, settings: Mapping[str, Any]) -> Path:
    """Save `image` as PNG with every `settings` item as a text chunk (non-Latin-1 text goes to iTXt)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, _as_text(value))
    image.save(path, pnginfo=info)
    return Path(path)


def read_png_settings(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG written by `save_png` (values as stored: JSON for non-strings)."""
    from PIL import Image

    with Image.open(path) as img:
        return dict(img.text)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most LABEL_LINES lines (the last one cut with '...')."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > LABEL_LINES:
        lines = lines[:LABEL_LINES]
        lines[-1] = lines[-1] + " ..."
    return lines or [""]


def contact_sheet(images: Sequence[PILImage.Image], labels: Sequence[str],
                  columns: int | None = None) -> PILImage.Image:
    """All `images` on one white sheet, row by row (`columns` per row, default about square), each with its
    label (the prompt) under it."""
    from PIL import Image, ImageDraw, ImageFont

    if not images or len(images) != len(labels):
        raise ValueError(f"a contact sheet needs one label per image and at least one image; got {len(images)} "
                         f"images and {len(labels)} labels")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    side = max(max(img.size) for img in images)
    scale = max(1, math.ceil(MIN_CELL / side))  # whole-pixel nearest upscaling keeps small images sharp
    cell = side * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
    label_h = line_h * LABEL_LINES
    sheet = Image.new("RGB", (cols * (cell + PAD) + PAD, rows * (cell + label_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(zip(images, labels)):
        x = PAD + (i % cols) * (cell + PAD)
        y = PAD + (i // cols) * (cell + label_h + PAD)
        sheet.paste(img.convert("RGB").resize((img.width * scale, img.height * scale), Image.NEAREST), (x, y))
        for k, line in enumerate(_wrap(draw, label, font, cell)):
            draw.text((x, y + cell + k * line_h), line, fill="black", font=font)
    return sheet


__all__ = ["contact_sheet", "read_png_settings", "save_png", "to_pil"]
