"""output.report_to = "wandb" (reporting/wandb.py): an offline W&B run under output.dir holding the metrics, the config
and the evaluation grid, read back from its .wandb file; the missing package and bad report_to lists as config errors.

The training runs go in a subprocess: wandb installs process-wide hooks (console capture, its service process) that
should not outlive one test, and a fresh interpreter is where `import wandb` can be made to fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textcraftor_fast.config import ConfigError, OutputConfig, load_config

FAST = ["sampler.num_steps=2", "sampler.grad_steps=1", "train.batch_size=1", "train.steps=2",
        "train.progress_bar=false", "data.max_prompts=4"]
ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    home = tmp_path / "wandb-home"  # wandb's settings and caches, away from the user's ~/.config/wandb
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home / "config"),
           "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def read_wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a 7-byte ':W&B' header, then LevelDB log blocks of 32 KiB whose
    records (4-byte checksum, 2-byte little-endian length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) carry
    the serialised `wandb_internal_pb2.Record`s (wandb >= 0.20 reads them in its Go core only)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes, too few for a header, are padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_offline_run_holds_the_metrics_the_config_and_the_evaluation_grid(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "my-run"
    overrides = [*FAST, f"output.dir='{out}'", 'output.report_to=["tensorboard","wandb"]', "train.eval_every=2",
                 'data.eval_path="builtin:parti"', "data.eval_max_prompts=2"]
    proc = _run(f"from textcraftor_fast import load_config, train\n"
                f"train(load_config('configs/tiny_random.toml', {overrides!r}))\n", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").iterdir())
    records = read_wandb_records(runs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("textcraftor-fast", "my-run")
    config = _items(run.config.update)
    assert config["output"]["report_to"] == ["tensorboard", "wandb"] and config["sampler"]["num_steps"] == 2

    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = _items(r.history.item)
            history.setdefault(row["_step"], {}).update(row)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [m["step"] for m in logged] == [1, 2]
    for m in logged:
        row = history[m["step"]]
        assert {"train/loss", "train/reward", "train/lr", "train/grad_norm"} <= set(row)
        assert row["train/reward"] == pytest.approx(m["reward"], rel=1e-6)
    assert history[2]["eval/reward"] == pytest.approx(logged[1]["eval/reward"], rel=1e-6)
    assert "eval/reward" not in history[1]

    grid = {k.split("/")[-1]: v for k, v in history[2].items() if k.startswith("eval/original_vs_tuned/")}
    assert grid["_type"] == "image-file" and (grid["width"], grid["height"]) == (2 * 32, 2 * 32)  # 2 prompts x 2 rows
    assert (runs[0].parent / "files" / grid["path"]).is_file()
    assert not any(k.startswith("eval/original_vs_tuned") for k in history[1])
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))  # the other reporter of the list ran too


def test_without_wandb_the_config_loads_and_training_names_the_extra(tmp_path):
    code = f"""
import sys
sys.modules["wandb"] = None  # as on a machine without it: `import wandb` raises ImportError
from textcraftor_fast import load_config, train
from textcraftor_fast.config import ConfigError
cfg = load_config("configs/tiny_random.toml", {[*FAST, f"output.dir='{tmp_path / 'run'}'", "output.report_to=wandb"]!r})
try:
    train(cfg)
except ConfigError as e:
    print("ERROR:", e)
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("ERROR: config key 'output.report_to': 'wandb' needs the wandb package, which is not installed: "
            "pip install 'textcraftor-fast[wandb]'") in proc.stdout, proc.stdout[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any model was built


def test_report_to_takes_a_name_or_a_list_and_names_a_bad_entry(tmp_path):
    assert load_config("builtin:tiny", ["output.report_to=wandb"]).output.reporters == ("wandb",)
    both = load_config("builtin:tiny", ['output.report_to=["tensorboard", "wandb"]']).output
    assert both.report_to == ("tensorboard", "wandb") and both.wandb_project == "textcraftor-fast"
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nkind = "tiny_random"\n\n[output]\nreport_to = ["wandb", "jsonl"]\nwandb_project = "p"\n')
    from_toml = load_config(toml).output
    assert (from_toml.reporters, from_toml.wandb_project) == (("wandb", "jsonl"), "p")

    choices = "'jsonl', 'tensorboard', 'wandb', 'none'"
    with pytest.raises(ConfigError, match=rf"'output\.report_to\.1': expected one of {choices}, got 'wandbb'"):
        load_config("builtin:tiny", ['output.report_to=["tensorboard", "wandbb"]'])
    with pytest.raises(ConfigError, match=rf"'output\.report_to': expected one of {choices}, or a list of them, "
                                          r"got 'tensorbored'"):
        load_config("builtin:tiny", ["output.report_to=tensorbored"])
    with pytest.raises(ConfigError, match=r"'output\.report_to': expected 'none' alone"):
        load_config("builtin:tiny", ['output.report_to=["none", "wandb"]'])
    with pytest.raises(ConfigError, match=r"'output\.report_to': expected a reporter name or a non-empty list"):
        load_config("builtin:tiny", ["output.report_to=[]"])
    with pytest.raises(ConfigError, match=r"'output\.report_to': expected each reporter once"):
        load_config("builtin:tiny", ['output.report_to=["wandb", "wandb"]'])
    with pytest.raises(ConfigError, match=r"'output\.wandb_project': expected a W&B project name"):
        load_config("builtin:tiny", ["output.report_to=wandb", 'output.wandb_project=""'])
    # Built in Python rather than loaded, the entry is still checked by name.
    with pytest.raises(ConfigError, match=rf"'output\.report_to\.1': expected one of {choices}, got 'wandbb'"):
        OutputConfig(report_to=("wandb", "wandbb")).validate("output")
