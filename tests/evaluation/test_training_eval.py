"""Evaluation during training (train.eval_every), TensorBoard logging and the run summary, on the tiny world."""
from __future__ import annotations

import json

import pytest
import torch

from textcraftor_fast import train
from textcraftor_fast.config import ConfigError, load_config

BASE = ["train.steps=4", "train.batch_size=2", "train.progress_bar=false", "train.checkpointing_steps=2",
        "train.checkpoints_total_limit=2",
        'data.eval_path="builtin:tiny_world"', "data.eval_max_prompts=3"]


def _cfg(out, *extra: str):
    return load_config("builtin:tiny", [*BASE, f'output.dir="{out}"', *extra])


def _weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.text_encoder / "model.safetensors"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_eval_metrics_at_every_n_steps_and_the_last(tmp_path, method):
    res = train(_cfg(tmp_path, "train.eval_every=3", "train.log_every=2", f"encoder.method={method}"))
    logged = {h["step"]: h for h in res.history}
    assert sorted(logged) == [2, 3, 4]  # log_every 2, plus the evaluation at step 3 and the last step
    assert "eval/reward" not in logged[2]
    for step in (3, 4):
        assert {"eval/reward", "eval/reward_diff", "eval/shape_correct", "eval/shape_correct_diff"} <= set(logged[step])
    assert logged[3]["eval/reward"] != logged[4]["eval/reward"]  # the encoder moved between them


@pytest.mark.parametrize("method", ["full", "lora"])
def test_an_unchanged_encoder_evaluates_to_exact_zero_differences(tmp_path, method):
    from textcraftor_fast.training.trainer import Trainer

    # LoRA: the up matrices start at zero, so the adapted encoder is the original until the first step.
    trainer = Trainer(_cfg(tmp_path, "train.eval_every=2", f"encoder.method={method}"))
    try:
        metrics, grid = trainer.evaluator(trainer.text_encoder)  # before any step: the original's weights
    finally:
        trainer.close()
    diffs = {k: v for k, v in metrics.items() if k.endswith("_diff")}
    assert len(diffs) == len(metrics) // 2 >= 5 and all(v == 0.0 for v in diffs.values())
    assert grid.shape == (6, 3, 32, 32) and torch.equal(grid[:3], grid[3:])
    assert trainer.text_encoder.training  # left in the mode it came in


def test_evaluating_does_not_change_training_and_resumes_exactly(tmp_path):
    plain = train(_cfg(tmp_path / "plain"))
    evaluated = train(_cfg(tmp_path / "eval", "train.eval_every=1"))
    for key, value in _weights(plain).items():
        assert torch.equal(value, _weights(evaluated)[key]), key
    # Resumed from its step-2 checkpoint: the same weights and the same evaluations as the straight run.
    step2 = tmp_path / "eval" / "checkpoints" / "step-000002"
    resumed = train(_cfg(tmp_path / "resumed", "train.eval_every=1", f'train.resume_from_checkpoint="{step2}"'))
    assert resumed.summary["steps_this_session"] == 2
    for key, value in _weights(evaluated).items():
        assert torch.equal(value, _weights(resumed)[key]), key
    evals = lambda r: {h["step"]: {k: v for k, v in h.items() if k.startswith("eval/")} for h in r.history}
    assert sorted(evals(resumed)) == [3, 4]  # a fresh output folder: the history starts at the resumed step
    assert evals(resumed) == {step: evals(evaluated)[step] for step in (3, 4)}


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(_cfg(tmp_path, "train.eval_every=2", 'output.report_to="tensorboard"'))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/reward", "train/lr", "eval/reward", "eval/reward_diff"} <= set(tags["scalars"])
    assert "eval/original_vs_tuned" in tags["images"]
    read = {e.step: e.value for e in acc.Scalars("train/reward")}
    assert read == pytest.approx({h["step"]: h["reward"] for h in res.history}, rel=1e-6)
    read_eval = {e.step: e.value for e in acc.Scalars("eval/reward")}
    assert read_eval == pytest.approx({h["step"]: h["eval/reward"] for h in res.history if "eval/reward" in h},
                                      rel=1e-6)
    assert sorted(read_eval) == [2, 4]
    assert (tmp_path / "metrics.jsonl").is_file()  # the run's own record (resume reads it) is kept too


def test_run_summary(tmp_path):
    res = train(_cfg(tmp_path, "train.eval_every=2"))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == res.summary
    assert res.summary["steps"] == res.summary["steps_this_session"] == 4
    assert res.summary["samples_per_second"] > 0 and res.summary["peak_memory_gb"] > 0
    evals = {h["step"]: h["eval/reward"] for h in res.history if "eval/reward" in h}
    best = max(evals, key=evals.get)
    assert res.summary["best_eval"]["step"] == best and res.summary["best_eval"]["eval/reward"] == evals[best]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.eval_path': expected a prompt file or built-in set"):
        load_config("builtin:tiny", ["train.eval_every=5"])
    with pytest.raises(ConfigError, match=r"output.report_to.*'jsonl', 'tensorboard', 'wandb', 'none'"):
        load_config("builtin:tiny", ['output.report_to="mlflow"'])
    with pytest.raises(ConfigError, match=r"'train.eval_every': expected an integer >= 0"):
        load_config("builtin:tiny", ["train.eval_every=-1"])
