"""The tiny-world demo end to end: a shortened run (files, well-formed metrics) and, slow-marked, the full
demo's acceptance (held-out improvement of the targeted attribute with paired intervals, no hedging)."""
from __future__ import annotations

import json
import math

import pytest

from textcraftor_fast.config import load_config
from textcraftor_fast.tiny import data as D
from textcraftor_fast.tiny.demo import run_demo


def _check_table(table: dict) -> None:
    assert {"reward", "reward/tiny_alignment", "reward/tiny_aesthetic"} <= set(table)
    for a in D.ATTRIBUTES:
        row = table[f"{a}_correct"]
        assert 0 <= row["before"] <= 1 and 0 <= row["after"] <= 1
    for row in table.values():
        assert all(math.isfinite(v) for v in row.values())
        assert row["lo"] <= row["diff"] <= row["hi"] and row["half_width"] >= 0


def test_quick_demo_end_to_end(tmp_path):
    cfg = load_config("configs/tiny.toml")
    report = run_demo(cfg, out_dir=tmp_path, quick=True)
    for name in ("grid.png", "reward_curve.png", "report.md", "report.json"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["arms"]) == {"tuned", "paper_recipe"}
    assert saved["n_samples"] == len(D.held_out_captions())
    for arm in saved["arms"].values():
        _check_table(arm["table"])
        assert arm["steps"] == 3 and set(arm["verdict"]) >= {"passed", "target_improved", "others_held"}
        assert 0 < arm["drift"] < 1
    hist = report["arms"]["tuned"]["history"]
    assert len(hist) == 3 and all({"reward", "emb_cos", "drift"} <= set(h) for h in hist)
    assert (tmp_path / "tuned" / "text_encoder").is_dir()


@pytest.mark.slow
def test_full_demo_improves_held_out_target_without_hedging(tmp_path):
    cfg = load_config("configs/tiny.toml")
    report = run_demo(cfg, out_dir=tmp_path, paper=False)
    assert report["n_samples"] >= 200
    v = report["arms"]["tuned"]["verdict"]
    assert v["passed"], json.dumps(report["arms"]["tuned"]["table"], indent=1)
