"""The tiny world: 32x32 captioned images of one shape, drawn in code.

Caption grammar: "a {size} {colour} {shape} on {background}", e.g. "a small red circle on black".
Attributes: colour (12) x shape (3) x size (2) x background (3) = 216 captions. Which colour-shape pairs a world
holds out (never used to pretrain its UNet / text encoder nor to fine-tune) is not fixed here: it is the world's
data, given to its build and recorded in its build_info.json (split.py). The judge (a reward model of the world,
not a generator) is trained on every combination, like a real reward model trained on its own data.

Each image is drawn at 4x and box-downsampled (anti-aliased edges); position jitter and size jitter make
the distribution continuous, so a 1M-parameter UNet cannot just memorise 216 pictures.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SIZE = 32
_SS = 4  # supersampling factor for anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "pink": (250, 130, 200),
    "brown": (130, 75, 30),
    "teal": (0, 120, 120),
    "lime": (150, 230, 40),
    "navy": (30, 40, 130),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "background": tuple(BACKGROUNDS),
}
# The attribute the world is designed to leave PARTLY right on held-out captions (the base model draws
# the shapes of unseen colour-shape pairs less reliably); the demo's acceptance is judged on it.
TARGET_ATTRIBUTES: tuple[str, ...] = ("shape",)
# Half-extent in pixels at 32x32, jittered +-15%. The classes must not overlap: the widest small shape (a
# triangle, 13.9 px) stays narrower than the narrowest large one (a square, 15.8 px). With 6 / 10 they did
# (16.7 vs 15.0 px), so any change of a large shape's outline could read as a change of size.
_RADIUS = {"small": 5.0, "large": 10.5}


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    size: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on {self.background}"

    def label(self, attribute: str) -> int:
        """Class index of this caption's value for `attribute` (see ATTRIBUTES)."""
        return ATTRIBUTES[attribute].index(getattr(self, attribute))


def parse_caption(text: str) -> Caption:
    """Inverse of Caption.text; raises ValueError naming the word it could not place."""
    words = text.strip().lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for w in words:
        for attr, values in ATTRIBUTES.items():
            if w in values:
                if attr in found and found[attr] != w:
                    raise ValueError(f"caption {text!r} names two values of {attr}: {found[attr]!r} and {w!r}")
                found[attr] = w
    missing = [a for a in ATTRIBUTES if a not in found]
    if missing:
        raise ValueError(f"caption {text!r} does not name a {', '.join(missing)} "
                         f"(tiny-world captions look like 'a small red circle on black')")
    return Caption(**found)


def all_captions() -> list[Caption]:
    return [Caption(c, s, z, b) for c in COLOURS for s in SHAPES for z in SIZES for b in BACKGROUNDS]


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary)."""
    words = ["a", "on"]
    for values in ATTRIBUTES.values():
        words += list(values)
    return words


def draw(caption: Caption, rng: random.Random | None = None) -> Image.Image:
    """Draw one 32x32 RGB image of `caption`; `rng` jitters position and size (None: centred, exact)."""
    from PIL import Image, ImageDraw  # lazy: evaluation and training never draw, only the build and tests do

    s = IMAGE_SIZE * _SS
    img = Image.new("RGB", (s, s), BACKGROUNDS[caption.background])
    d = ImageDraw.Draw(img)
    r = _RADIUS[caption.size]
    cx = cy = IMAGE_SIZE / 2
    if rng is not None:
        r *= rng.uniform(0.85, 1.15)
        slack = IMAGE_SIZE / 2 - r - 1
        cx += rng.uniform(-slack, slack) * 0.6
        cy += rng.uniform(-slack, slack) * 0.6
    r, cx, cy = r * _SS, cx * _SS, cy * _SS
    fill = COLOURS[caption.colour]
    if caption.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif caption.shape == "square":
        q = r * 0.886  # same area as the circle
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    else:
        h = r * 1.15
        d.polygon([(cx, cy - h), (cx - h * 1.05, cy + h * 0.8), (cx + h * 1.05, cy + h * 0.8)], fill=fill)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, 32, 32) in [0, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, 32, 32, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)


def make_dataset(captions: list[Caption], n: int, seed: int) -> tuple[torch.Tensor, list[Caption]]:
    """n jittered images cycling through `captions` in a seeded order: (images (n,3,32,32) in [0,1], captions)."""
    rng = random.Random(seed)
    chosen = [captions[i % len(captions)] for i in range(n)]
    rng.shuffle(chosen)
    return to_tensor([draw(c, rng) for c in chosen]), chosen


def labels(captions: list[Caption]) -> dict[str, torch.Tensor]:
    """attribute -> (n,) long tensor of class indices."""
    return {a: torch.tensor([c.label(a) for c in captions]) for a in ATTRIBUTES}
