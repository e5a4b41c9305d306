"""What an evaluation returns (and `report` writes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor


@dataclass
class EvalResult:
    out_dir: Path
    table: dict[str, dict[str, dict[str, float]]]
    """encoder name -> metric -> before/after means, paired diff and its 95% interval."""
    curves: dict[str, dict[str, list[dict]]]
    """encoder name -> 'weight' | 'switch_step' -> one point per setting (means and paired diffs per metric)."""
    scores: dict[str, dict[str, Tensor]] = field(repr=False)
    """variant label -> metric -> per-sample scores (N,)."""
    files: dict[str, Path] = field(default_factory=dict)
    pairs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """'a vs b' (EvalOptions.compare) -> metric -> b's ('before') and a's ('after') means and the paired a - b."""
