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
        # The paired mean difference is the difference of the two means (a property of the data written,
        # not of how the interval was built).
        assert row["diff"] == pytest.approx(row["after"] - row["before"], abs=1e-9)


def test_paired_interval_by_hand():
    import torch

    from textcraftor_fast.tiny.evaluate import paired_diff

    # after - before = [1, 0, 0, 1]: mean 0.5, sample sd sqrt(1/3), half-width 1.96 * sqrt(1/3) / 2 = 0.565803.
    got = paired_diff(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert got["diff"] == pytest.approx(0.5)
    assert got["half_width"] == pytest.approx(0.565803, abs=1e-6)
    assert (got["lo"], got["hi"]) == pytest.approx((0.5 - 0.565803, 0.5 + 0.565803), abs=1e-6)


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
