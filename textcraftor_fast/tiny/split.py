"""A tiny world's held-out split, as data: the colour-shape pairs it never trains on, in two disjoint splits
(test, validation), given to the build or drawn from a seed, and recorded in the world's build_info.json.

One rule for every split (world 5's, the first to hold it): every colour is held out exactly once, and each
split holds PAIRS_PER_SHAPE pairs of every shape, so every shape is still learned from eight colours and every
colour from two shapes, and a drift from one shape to another shows up in both splits alike (world 3's
validation had no square and passed a drift away from squares; world 4's one pair per shape let one test pair
decide every verdict). Held-out pairs, with all their sizes and backgrounds, are never used to pretrain the
UNet / text encoder nor to fine-tune; the judge is trained on every caption, as a real reward model is.

Everything that evaluates on a split reads it from the world it loads (`read_held_out`); a world whose
build_info.json lacks the split is refused (no fallback: another world's split would evaluate on pairs this
world may have trained on).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import data as D

Pair = tuple[str, str]  # (colour, shape)
SplitName = Literal["test", "validation"]
SPLITS: tuple[SplitName, ...] = ("test", "validation")
PAIRS_PER_SHAPE = len(D.COLOURS) // (len(SPLITS) * len(D.SHAPES))  # 12 colours / (2 splits x 3 shapes) = 2
METADATA = "build_info.json"
KEY = "held_out"


def _order(pairs) -> tuple[Pair, ...]:
    """Shape order first, then colour order: 'red circle, cyan circle, green square, ...'."""
    return tuple(sorted(pairs, key=lambda p: (D.SHAPES.index(p[1]), list(D.COLOURS).index(p[0]))))


def _name(pair: Pair) -> str:
    return f"{pair[0]} {pair[1]}"


def parse_pairs(text: str | list[str]) -> tuple[Pair, ...]:
    """'red circle,cyan circle' (or a list of such names) -> (('red', 'circle'), ('cyan', 'circle')).
    Raises ValueError naming the item it cannot read and the valid colours and shapes."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [t.strip() for t in text]
    pairs = []
    for item in filter(None, items):
        words = item.split()
        if len(words) != 2 or words[0] not in D.COLOURS or words[1] not in D.SHAPES:
            raise ValueError(f"held-out pair {item!r} is not 'colour shape' with colour one of "
                             f"{', '.join(D.COLOURS)} and shape one of {', '.join(D.SHAPES)}")
        pairs.append((words[0], words[1]))
    return tuple(pairs)


@dataclass(frozen=True)
class HeldOut:
    """The held-out colour-shape pairs of one world, checked against the rule at construction."""

    test: tuple[Pair, ...]
    validation: tuple[Pair, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "test", _order(self.test))
        object.__setattr__(self, "validation", _order(self.validation))
        for name in SPLITS:
            pairs = self.pairs(name)
            for shape in D.SHAPES:
                got = [_name(p) for p in pairs if p[1] == shape]
                if len(got) != PAIRS_PER_SHAPE:
                    raise ValueError(f"held-out {name} split must hold {PAIRS_PER_SHAPE} pairs of every shape; it has "
                                     f"{len(got)} {shape}(s): {got or 'none'}")
        colours = [c for c, _ in self.test + self.validation]
        for colour in D.COLOURS:
            if colours.count(colour) != 1:
                raise ValueError(f"every colour must be held out exactly once over test and validation; {colour} is "
                                 f"held out {colours.count(colour)} times")

    def pairs(self, split: SplitName) -> tuple[Pair, ...]:
        if split not in SPLITS:
            raise ValueError(f"held-out split {split!r} is not one of {', '.join(map(repr, SPLITS))}")
        return getattr(self, split)

    @property
    def all_pairs(self) -> frozenset[Pair]:
        return frozenset(self.test + self.validation)

    def captions(self, split: SplitName) -> list[D.Caption]:
        """The split's captions (36: its pairs x sizes x backgrounds), in data.all_captions() order."""
        pairs = set(self.pairs(split))
        return [c for c in D.all_captions() if (c.colour, c.shape) in pairs]

    def train_captions(self) -> list[D.Caption]:
        """Every caption of a pair held out in neither split (144), in data.all_captions() order."""
        return [c for c in D.all_captions() if (c.colour, c.shape) not in self.all_pairs]

    def to_json(self) -> dict[str, list[str]]:
        return {name: [_name(p) for p in self.pairs(name)] for name in SPLITS}

    @classmethod
    def from_json(cls, obj: dict) -> "HeldOut":
        missing = [s for s in SPLITS if s not in obj]
        if missing:
            raise ValueError(f"held-out split record lacks {', '.join(missing)}: {obj!r}")
        return cls(**{s: parse_pairs(obj[s]) for s in SPLITS})


def draw_held_out(seed: int) -> HeldOut:
    """A split by the rule, drawn from `seed`: the colours shuffled into the slots (test, then validation; in
    each, PAIRS_PER_SHAPE slots per shape). Every split the rule allows is equally likely."""
    colours = list(D.COLOURS)
    random.Random(seed).shuffle(colours)
    slots = [s for s in D.SHAPES for _ in range(PAIRS_PER_SHAPE)]  # circle, circle, square, square, ...
    half = len(slots)
    return HeldOut(test=tuple(zip(colours[:half], slots)), validation=tuple(zip(colours[half:], slots)))


def read_held_out(world: str | Path) -> HeldOut:
    """The split recorded in `world`/build_info.json (written by `python -m textcraftor_fast.tiny.build`)."""
    path = Path(world) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"tiny world folder '{world}' has no {METADATA}, so its held-out split is unknown: "
                                f"build it with `python -m textcraftor_fast.tiny.build --out {world}`")
    info = json.loads(path.read_text())
    if KEY not in info:
        raise ValueError(f"{path} records no held-out split (key '{KEY}'; a world built before splits were recorded). "
                         f"Add the pairs it was built with, e.g. \"{KEY}\": {{\"test\": [\"red circle\", ...], "
                         f"\"validation\": [...]}}, or rebuild it (`python -m textcraftor_fast.tiny.build --help`)")
    try:
        return HeldOut.from_json(info[KEY])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write_prompt_files(held_out: HeldOut, folder: str | Path) -> dict[str, Path]:
    """train.txt, test.txt and validation.txt of `held_out` (one caption a line) under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lists = {"train": held_out.train_captions(), **{s: held_out.captions(s) for s in SPLITS}}
    paths = {}
    for name, caps in lists.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("".join(c.text + "\n" for c in caps))
    return paths
