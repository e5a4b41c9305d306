"""Stops of every kind: kill -9 between checkpoints, a double Ctrl-C, NaN rewards and loss spikes."""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast.training import checkpoints as ck
from textcraftor_fast import load_config
from textcraftor_fast.training.monitor import SpikeMonitor
from textcraftor_fast.training.trainer import Trainer, train

CONFIG = "configs/tiny_random.toml"
# Random K and gradient accumulation on: the resume must restore the Python RNG and the data cursor too.
RUN = ["sampler.num_steps=3", "sampler.grad_steps=2", "sampler.random_grad_steps=true", "train.batch_size=1",
       "train.gradient_accumulation_steps=2", "train.progress_bar=false", "data.max_prompts=8",
       "train.checkpointing_steps=2", "optim.lr=1e-3"]


def _cli(out, steps, *extra):
    args = [sys.executable, "-m", "textcraftor_fast.cli", "train", "--config", CONFIG]
    for o in RUN + [f"train.steps={steps}", f'output.dir="{out}"', *extra]:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path, proc, timeout=180.0):
    t0 = time.monotonic()
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.02)


def _weights(path):
    return load_file(str(path / "text_encoder" / "model.safetensors"))


@pytest.mark.slow
def test_kill_9_between_checkpoints_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    straight = train(load_config(CONFIG, RUN + ["train.steps=6", f'output.dir="{tmp_path / "straight"}"']))
    out = tmp_path / "killed"
    proc = _cli(out, 50)  # far more steps than we let it run
    _wait_for(out / "checkpoints" / "step-000002" / "manifest.json", proc)
    assert proc.poll() is None, "the run must still be going when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    resumed = train(load_config(CONFIG, RUN + ["train.steps=6", f'output.dir="{out}"',
                                               'train.resume_from_checkpoint="latest"']))
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [(m["step"], m["k"], m["reward"]) for m in resumed.history] == \
        [(m["step"], m["k"], m["reward"]) for m in straight.history]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    # The second press is sent once the first one's warning is out: sent back to back from here, the OS may
    # merge the two into one pending signal before the run is scheduled (seen under load). Two presses that
    # both land during one long C call are tested in test_signals.py.
    out = tmp_path / "run"
    proc = _cli(out, 1000, "train.checkpointing_steps=1")
    _wait_for(out / "checkpoints" / "step-000001" / "manifest.json", proc)
    proc.send_signal(signal.SIGINT)
    log = b""
    while b"press Ctrl-C again" not in log:
        line = proc.stdout.readline()
        assert line, f"the run ended after one Ctrl-C: {log.decode()[-2000:]}"
        log += line
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    log = (log + proc.stdout.read()).decode()
    assert proc.returncode == 130, log[-2000:]
    assert "Ctrl-C again: stopping at once" in log and "Traceback" not in log
    found = ck.list_checkpoints(out)
    assert found and all(ck.verify_checkpoint(p) is None for p in found)


def test_a_nan_reward_skips_the_step_and_names_its_prompts(tmp_path, caplog):
    trainer = Trainer(load_config(CONFIG, RUN[:-1] + ["train.steps=2", "sampler.random_grad_steps=false",
                                                      f'output.dir="{tmp_path}"', "train.checkpointing_steps=10"]))
    real, calls = trainer.rewards, []

    class NaNOnce:  # a reward that returns NaN on its first call, as a broken reward model might
        def __call__(self, images, prompts):
            total, parts = real(images, prompts)
            calls.append(list(prompts))
            return (total * float("nan") if len(calls) == 1 else total), parts

        def __getattr__(self, name):
            return getattr(real, name)

    trainer.rewards = NaNOnce()
    before = {n: p.detach().clone() for n, p in trainer.text_encoder.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="textcraftor_fast.training.trainer"):
        first = trainer.train_step()
        trainer.step += 1
    assert first["skipped"] == 1 and not math.isfinite(first["loss"])
    assert all(torch.equal(p, before[n]) for n, p in trainer.text_encoder.named_parameters())
    result = trainer.train()  # the loop's own guard and log, from step 1 on
    assert result.steps == 2 and result.history[-1]["skipped"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.text_encoder.named_parameters())


def test_the_skip_warning_names_the_prompts(tmp_path, caplog):
    trainer = Trainer(load_config(CONFIG, RUN[:-1] + ["train.steps=1", "sampler.random_grad_steps=false",
                                                      f'output.dir="{tmp_path}"']))
    real = trainer.rewards

    class AlwaysNaN:
        def __call__(self, images, prompts):
            total, parts = real(images, prompts)
            return total * float("nan"), parts

        def __getattr__(self, name):
            return getattr(real, name)

    trainer.rewards = AlwaysNaN()
    with caplog.at_level(logging.WARNING, logger="textcraftor_fast.training.trainer"):
        result = trainer.train()
    assert result.history[0]["skipped"] == 1
    assert "optimizer step skipped" in caplog.text and trainer.last_prompts[0] in caplog.text


def test_a_loss_spike_is_logged_with_its_prompts(caplog):
    monitor = SpikeMonitor()
    with caplog.at_level(logging.WARNING, logger="textcraftor_fast.training.trainer"):
        calm = [monitor.check(i, 1.0 + 0.01 * math.sin(i), ["calm"]) for i in range(30)]
        spike = monitor.check(30, 5.0, ["a prompt that blew up"])
    assert not any(calm) and spike
    assert "loss spike" in caplog.text and "a prompt that blew up" in caplog.text


def test_fp16_resume_is_exact_including_the_grad_scaler(tmp_path):
    fp16 = ["train.mixed_precision=fp16", "sampler.random_grad_steps=false"]
    straight = train(load_config(CONFIG, RUN + fp16 + ["train.steps=4", f'output.dir="{tmp_path / "a"}"']))
    train(load_config(CONFIG, RUN + fp16 + ["train.steps=2", f'output.dir="{tmp_path / "b"}"']))
    state = (tmp_path / "b" / "checkpoints" / "step-000002" / "state.json").read_text()
    assert '"scale"' in state  # the scaler's state travels with the checkpoint
    resumed = train(load_config(CONFIG, RUN + fp16 + ["train.steps=4", f'output.dir="{tmp_path / "b"}"',
                                                      'train.resume_from_checkpoint="latest"']))
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    for key in a:
        assert torch.equal(a[key], b[key]), key
