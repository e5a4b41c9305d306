"""`evaluate` on the tiny world: exact zeros against itself, the demo's own numbers for a demo-tuned encoder,
w = 0 / w = 1 reproducing the original / tuned pipelines bit for bit, a killed run resuming to the same
table, and the files and CLI a user gets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from textcraftor_fast import cli
from textcraftor_fast.config import load_config
from textcraftor_fast.evaluation import EvalOptions, evaluate
from textcraftor_fast.evaluation.core import EVAL_SEED0, sample_set
from textcraftor_fast.inference import conditioning
from textcraftor_fast.models.text import encode_prompts
from textcraftor_fast.models import load_components
from textcraftor_fast.models import export_text_encoder
from textcraftor_fast.sampler import Embeddings, make_schedule, sample_images
from tests.evaluation.by_hand import paired_row

FAST = dict(prompts="builtin:tiny_world", max_prompts=6, seeds_per_prompt=1, batch_size=3, grid_prompts=3,
            progress=False)


@pytest.fixture(scope="module")
def cfg():
    return load_config("builtin:tiny")


@pytest.fixture(scope="module")
def encoders(cfg, tmp_path_factory):
    """(original exported, 'tuned': the original with a fixed perturbation): two encoder folders."""
    root = tmp_path_factory.mktemp("encoders")
    te = load_components(cfg.model).text_encoder
    original = export_text_encoder(te, root / "original" / "text_encoder")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return original, export_text_encoder(te, root / "tuned" / "text_encoder")


def test_original_against_itself_is_exactly_zero(cfg, encoders, tmp_path):
    res = evaluate(cfg, [str(encoders[0])], tmp_path, EvalOptions(**FAST, weights=(), switch_steps=()),
                   names=["copy"])
    table = res.table["copy"]
    assert {"reward", "reward/tiny_alignment", "shape_correct", "colour_correct"} <= set(table)
    for metric, row in table.items():
        assert (row["diff"], row["lo"], row["hi"]) == (0.0, 0.0, 0.0), metric
        assert row["before"] == row["after"]


def test_table_files_grid_and_curves(cfg, encoders, tmp_path):
    res = evaluate(cfg, [str(e) for e in encoders], tmp_path, EvalOptions(**FAST, weights=(0.0, 0.5, 1.0),
                   switch_steps=(0, 5)), names=["same", "tuned"])
    assert set(res.files) == {"markdown", "csv", "json", "grid", "weight_curve", "switch_curve"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in res.files.values())
    md = res.files["markdown"].read_text()
    assert "### tuned" in md and "| reward |" in md and "Monotone in w" in md
    rows = res.files["csv"].read_text().splitlines()
    assert rows[0].startswith("encoder,metric,n,original")
    assert len(rows) == 1 + 2 * len(res.table["tuned"])
    data = json.loads(res.files["json"].read_text())
    assert data["n_samples"] == 6 and [p["weight"] for p in data["curves"]["tuned"]["weight"]] == [0.0, 0.5, 1.0]
    assert [p["switch_step"] for p in data["curves"]["tuned"]["switch_step"]] == [0, 5]
    assert set(data["monotone_in_weight"]["tuned"]) == set(res.table["tuned"])
    # The perturbed encoder changes the pictures (so zeros above are not a property of any pair of encoders).
    assert res.table["tuned"]["reward"]["diff"] != 0.0


def test_weight_zero_and_one_reproduce_the_original_and_tuned_pipelines(cfg, encoders, tmp_path):
    res = evaluate(cfg, [str(encoders[1])], tmp_path, EvalOptions(**FAST, weights=(0.0, 1.0), switch_steps=()),
                   names=["tuned"])
    s = res.scores
    for metric in s["original"]:
        assert torch.equal(s["tuned w=0"][metric], s["original"][metric]), metric
        assert torch.equal(s["tuned w=1"][metric], s["tuned"][metric]), metric
    # And at the level of pictures, against pipelines built here without lerp: the original encoder alone,
    # and the tuned encoder conditioning every step (the tiny config's switch step is 0).
    from textcraftor_fast.models import load_text_encoder

    comp = load_components(cfg.model)
    tuned = load_text_encoder(encoders[1])
    prompts, seeds = sample_set(["a small red circle on black", "a large green square on gray"], 1)
    schedule = make_schedule(comp.scheduler.config, cfg.sampler.num_steps, 0.0, cfg.sampler.timestep_spacing)
    run = lambda frozen, mixed: sample_images(comp.unet, comp.vae, schedule, seeds, (4, 16, 16), frozen, mixed,
                                              cfg.sampler.guidance_scale, 0)
    encode = torch.no_grad()(encode_prompts)
    plain_original = Embeddings(encode(comp.text_encoder, comp.tokenizer, prompts),
                                encode(comp.text_encoder, comp.tokenizer, [""]))
    plain_tuned = Embeddings(encode(tuned, comp.tokenizer, prompts), plain_original.uncond)
    for w, expected in ((0.0, run(plain_original, None)), (1.0, run(plain_original, plain_tuned))):
        frozen, mixed = conditioning(comp.text_encoder, [tuned], [w], comp.tokenizer, prompts, mix_uncond=False)
        assert torch.equal(run(frozen, mixed), expected), f"w = {w}"
    assert not torch.equal(run(plain_original, None), run(plain_original, plain_tuned))


def test_a_demo_tuned_encoder_gets_the_demos_own_numbers(cfg, tmp_path):
    from textcraftor_fast.tiny.demo import run_demo

    report = run_demo(cfg, out_dir=tmp_path / "demo", quick=True, seeds_per_caption=2)
    res = evaluate(cfg, [str(tmp_path / "demo" / "tuned" / "text_encoder")], tmp_path / "eval",
                   EvalOptions(prompts="builtin:tiny_world", seeds_per_prompt=2, batch_size=128, weights=(),
                               switch_steps=(), progress=False), names=["tuned"])
    demo_table = report["arms"]["tuned"]["table"]
    assert set(demo_table) == set(res.table["tuned"])
    for metric, row in demo_table.items():
        # Both tables against the statistics computed by hand from evaluate's per-sample scores: the demo's
        # numbers come from the same samples, and neither side checks evaluation/stats.py against itself.
        want = paired_row(res.scores["tuned"][metric], res.scores["original"][metric])
        assert res.table["tuned"][metric] == pytest.approx(want, rel=1e-12, abs=1e-12), metric
        for key in ("n", "before", "before_hw", "after", "after_hw", "diff", "half_width", "lo", "hi"):
            assert row[key] == pytest.approx(want[key], abs=1e-6), (metric, key)
    assert report["n_samples"] == res.table["tuned"]["reward"]["n"] == 72  # 36 test captions x 2


def test_weights_outside_zero_one_warn_and_bad_switch_steps_fail(cfg, encoders, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        evaluate(cfg, [str(encoders[1])], tmp_path, EvalOptions(**{**FAST, "max_prompts": 1}, weights=(1.5,),
                 switch_steps=()), names=["t"])
    assert "extrapolating" in caplog.text
    with pytest.raises(ValueError, match=r"switch step 10 is outside 0\.\.9 for 10 DDIM steps"):
        evaluate(cfg, [str(encoders[1])], tmp_path, EvalOptions(**FAST, switch_steps=(10,)), names=["t"])
    with pytest.raises(ValueError, match="one distinct name per tuned encoder"):
        evaluate(cfg, [str(e) for e in encoders], tmp_path, EvalOptions(**FAST), names=["a", "a"])
    with pytest.raises(ValueError, match="seeds_per_prompt must be an integer >= 1"):
        EvalOptions(seeds_per_prompt=0)


def _cli(out: Path, encoder: Path) -> list[str]:
    return [sys.executable, "-m", "textcraftor_fast.cli", "evaluate", "--config", "builtin:tiny", "--text-encoder",
            str(encoder), "--name", "tuned", "--max-prompts", "4", "--batch-size", "1", "--weights", "0,1",
            "--switch-steps", "none", "--out", str(out)]


def test_a_killed_evaluation_resumes_to_the_same_table(cfg, encoders, tmp_path):
    clean = evaluate(cfg, [str(encoders[1])], tmp_path / "clean", EvalOptions(
        prompts="builtin:tiny_world", max_prompts=4, batch_size=1, weights=(0.0, 1.0), switch_steps=(),
        progress=False), names=["tuned"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(tmp_path / "killed", encoders[1]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    cache = tmp_path / "killed" / "cache"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*/*.pt"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the evaluation finished before it could be killed: give it more batches"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.glob("*/*.pt")))
    assert 3 <= done < 12  # 3 settings (original, w=0, w=1) x 4 batches: killed part-way
    resumed = subprocess.run(_cli(tmp_path / "killed", encoders[1]), env=env, capture_output=True, text=True,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({done} batches cached)" in resumed.stderr
    data = json.loads((tmp_path / "killed" / "table.json").read_text())
    assert data["table"] == json.loads(json.dumps(clean.table))
    assert data["curves"] == json.loads(json.dumps(clean.curves))


def test_cli_prints_the_table(encoders, tmp_path, capsys):
    code = cli.main(["evaluate", "--config", "builtin:tiny", "--text-encoder", str(encoders[1]), "--max-prompts",
                     "2", "--weights", "none", "--switch-steps", "none", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "| metric | original | tuned | paired diff [95% CI] |" in out and "table.csv" in out
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--config", "builtin:tiny", "--weights", "a,b", "--out", str(tmp_path)])
    assert "expected comma-separated floats" in capsys.readouterr().err
