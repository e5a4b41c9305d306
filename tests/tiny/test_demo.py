"""The tiny-world demo end to end: a shortened run started outside the repository (files, well-formed
metrics) and the sweep command. The demo's acceptance on the test split is in test_demo_acceptance_*.py, one
(seed, threads) point per file, so that two pytest-xdist workers (`--dist loadfile`) run them side by side."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from textcraftor_fast import cli
from textcraftor_fast.tiny import data as D


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


def test_pair_breakdown_by_hand():
    import torch

    from textcraftor_fast.tiny.evaluate import pair_breakdown

    # Two red squares and one blue circle (any size/background); shape classes: circle 0, square 1, triangle 2.
    prompts = ["a small red square on black", "a blue large circle on white", "a large red square on gray"]
    before = {"shape_pred": torch.tensor([0, 0, 2]), "shape_correct": torch.tensor([0.0, 1.0, 0.0])}
    after = {"shape_pred": torch.tensor([1, 0, 0]), "shape_correct": torch.tensor([1.0, 1.0, 0.0])}
    got = pair_breakdown(before, after, prompts)
    assert list(got) == ["red square", "blue circle"]
    assert got["red square"] == {"n": 2, "before": 0.0, "after": 0.5,
                                 "before_read_as": {"circle": 1, "square": 0, "triangle": 1},
                                 "after_read_as": {"circle": 1, "square": 1, "triangle": 0}}
    assert got["blue circle"]["before"] == got["blue circle"]["after"] == 1.0


def test_wilson_interval_by_hand():
    from textcraftor_fast.tiny.evaluate import wilson_interval

    # z = 1.96. 5 of 10: centre 0.5, half-width 1.96 sqrt(0.025 + 0.009604) / 1.38416 = 0.26340.
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.8416 / 13.8416]; never the normal interval's zero width.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-5)
    for n in range(1, 40):  # the ends hold the estimate exactly at 0 and n (an error bar cannot be negative)
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    # 88 of 108 (make demo's red circle before): centre (0.814815 + 0.017785) / 1.035570 = 0.804002, half-width
    # 1.96 sqrt(0.150892 / 108 + 3.8416 / 46656) / 1.035570 = 0.072800.
    assert wilson_interval(88, 108) == pytest.approx((0.731202, 0.876802), abs=2e-6)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


def _fake_report(pairs: list[str], per_pair: int) -> dict:
    """A finished demo's report from made-up per-sample results (no model): `per_pair` samples of every pair,
    the original encoder right on the first third of each pair's samples, the tuned one on the first two thirds."""
    import torch

    from textcraftor_fast.tiny.evaluate import compare, pair_breakdown, verdict

    prompts = [f"a small {p} on black" for p in pairs for _ in range(per_pair)]
    labels = torch.tensor([D.SHAPES.index(p.split()[1]) for p in pairs for _ in range(per_pair)])
    k = torch.arange(len(prompts)) % per_pair

    def result(right_below: int) -> dict:
        right = k < right_below
        pred = torch.where(right, labels, (labels + 1) % 3)
        res = {"reward": right.double() * 0.5, "shape_pred": pred, "shape_correct": right.double()}
        res.update({f"{a}_correct": torch.ones(len(prompts)) for a in D.ATTRIBUTES if a != "shape"})
        return res

    before, after = result(per_pair // 3), result(2 * per_pair // 3)
    table = compare(before, after)
    arm = {"table": table, "verdict": verdict(table, ["shape"]), "pairs": pair_breakdown(before, after, prompts),
           "emb_cos_after": 0.5, "drift": 0.01, "train_seconds": 1.0,
           "history": [{"step": i, "reward": 0.1 * i, "emb_cos": 0.5, "drift": 0.01 * i} for i in range(3)]}
    return {"split": "test", "n_samples": len(prompts), "n_captions": len(pairs), "seeds_per_caption": per_pair,
            "num_steps": 10, "guidance_scale": 5.0, "emb_cos_before": 0.5, "arms": {"tuned": arm}}


def test_report_writes_the_per_pair_chart(tmp_path):
    from PIL import Image

    from textcraftor_fast.tiny.demo import write_report

    pairs = ["green circle", "blue circle", "red square", "yellow square", "purple triangle"]
    written = write_report(_fake_report(pairs, per_pair=9), tmp_path)
    assert [p.name for p in written] == ["reward_curve.png", "pairs.png", "report.md", "report.json"]
    chart = Image.open(tmp_path / "pairs.png")
    assert chart.size[0] > 400 and chart.info["Description"] == "pairs: " + "; ".join(pairs)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [(p, e["n"], e["before"], e["after"]) for p, e in saved["arms"]["tuned"]["pairs"].items()] == [
        (p, 9, 3 / 9, 6 / 9) for p in pairs]
    assert "history" not in saved["arms"]["tuned"]


def test_quick_demo_runs_from_outside_the_repository(tmp_path):
    # The default config is the packaged builtin:tiny, so no repo-relative path is needed.
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "textcraftor_fast.cli", "demo", "--quick", "--paper", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout  # the verdict is printed, flagged as a smoke test's
    assert "--quick: 3 fine-tuning steps and 36 samples" in proc.stdout
    for name in ("grid.png", "reward_curve.png", "pairs.png", "report.md", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["arms"]) == {"tuned", "paper_recipe"} and saved["split"] == "test"
    assert saved["n_samples"] == 36  # the shipped world's 36 test captions x 1 seed
    for arm in saved["arms"].values():
        _check_table(arm["table"])
        assert arm["steps"] == 3 and set(arm["verdict"]) >= {"passed", "target_improved", "others_held"}
        assert 0 < arm["drift"] < 1
        assert {p: e["n"] for p, e in arm["pairs"].items()} == {
            "red circle": 6, "cyan circle": 6, "green square": 6, "pink square": 6, "blue triangle": 6,
            "lime triangle": 6}
    assert "| tuned | red circle | 6 |" in (out / "report.md").read_text()
    lines = (out / "tuned" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all({"reward", "emb_cos", "drift"} <= set(json.loads(x)) for x in lines)
    assert (out / "tuned" / "text_encoder").is_dir()


def test_sweep_command_sets_threads_inside_each_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = cli.main(["demo", "--seeds", "3", "--threads", "1,2", "--split", "validation", "--eval-seeds", "1",
                   "--out", str(out), "--set", "train.steps=1", "--set", "train.batch_size=2"])
    sweep = json.loads((out / "sweep.json").read_text())
    # Each run trained at its own thread count (read inside the run, not from the environment).
    assert [(r["seed"], r["threads"], r["train_threads"]) for r in sweep["runs"]] == [(3, 1, 1), (3, 2, 2)]
    assert sweep["split"] == "validation" and sweep["n_samples"] == 36
    assert sweep["held_out_pairs"] == ["purple circle", "navy circle", "orange square", "brown square",
                                       "yellow triangle", "teal triangle"]
    passed = sum(r["verdict"]["passed"] for r in sweep["runs"])
    assert sweep["passed"] == passed and rc == (0 if passed == 2 else 1)
    table = (out / "sweep.md").read_text()
    assert table.count("| 3 | 1 |") == 1 and table.count("| 3 | 2 |") == 1 and f"{passed} of 2 runs PASS" in table


def test_a_stopped_fine_tuning_is_not_evaluated(tmp_path):
    # SIGTERM mid-training: the engine saves and returns early; the demo must stop there (exit 130) rather than
    # print a verdict for a half-trained encoder.
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "textcraftor_fast.cli", "demo", "--out", str(out), "--eval-seeds", "1",
                             "--set", "train.steps=400", "--set", "train.batch_size=2", "--set", "train.progress_bar=false"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "tuned" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.time() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "tuned: fine-tuning stopped at step" in stderr and "not evaluating a partial run" in stderr
    assert "PASS" not in stdout and "FAIL" not in stdout and not (out / "report.md").exists()
    assert any((out / "tuned" / "checkpoints").glob("step-*"))  # the interrupted run is kept, resumable


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--seeds", "0,1"], "--quick runs one shortened demo"),
    (["--threads", "0"], "--threads: thread counts must be >= 1"),
    (["--eval-seeds", "0"], "--eval-seeds: noise seeds per caption must be >= 1"),
    (["--split", "train"], "invalid choice: 'train'"),
    (["--seeds", "0,x"], "expected comma-separated integers"),
])
def test_demo_rejects_bad_arguments_before_any_work(argv, message, capsys, tmp_path):
    try:
        code = cli.main(["demo", "--out", str(tmp_path / "demo"), *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing was trained or written
