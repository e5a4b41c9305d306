"""The training loop on tiny random SD-architecture models: gradients, resume, checkpoints, guards, CLI."""
import json

import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast import cli, load_config
from textcraftor_fast.training.trainer import Trainer, train
from textcraftor_fast.rewards.base import Reward

FAST = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=8", "output.overwrite=false"]  # tests exercise the safe default


def cfg_for(tmp_path, *extra):
    return load_config("configs/tiny_random.toml", FAST + [f'output.dir="{tmp_path}"', *extra])


def test_only_the_text_encoder_gets_gradients(tmp_path):
    trainer = Trainer(cfg_for(tmp_path))
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    enc = [p.grad for p in trainer.text_encoder.parameters()]
    assert all(g is not None for g in enc) and any(g.abs().max() > 0 for g in enc)
    for name, module in [("unet", trainer.unet), ("vae", trainer.vae), ("rewards", trainer.rewards),
                         ("original encoder", trainer.original_encoder)]:
        params = list(module.parameters())
        assert all(p.grad is None for p in params), name
        assert not any(p.requires_grad for p in params), name
    assert not trainer.unet.training and not trainer.vae.training
    assert trainer.vae.encoder is None  # training only decodes: the encoder half is freed at build


def _weights(path):
    return load_file(str(path / "text_encoder" / "model.safetensors"))


def test_resume_continues_exactly(tmp_path):
    straight = train(cfg_for(tmp_path / "a", "train.steps=4", "train.checkpointing_steps=2"))
    first = train(cfg_for(tmp_path / "b", "train.steps=2", "train.checkpointing_steps=2"))
    resumed = train(cfg_for(tmp_path / "b", "train.steps=4", "train.checkpointing_steps=2",
                            'train.resume_from_checkpoint="latest"'))
    assert first.steps == 2 and resumed.steps == 4
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    assert [m["step"] for m in resumed.history] == [1, 2, 3, 4]
    assert [m["reward"] for m in resumed.history] == [m["reward"] for m in straight.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_checkpoints_are_complete_and_pruned(tmp_path):
    result = train(cfg_for(tmp_path, "train.steps=3", "train.checkpointing_steps=1", "train.checkpoints_total_limit=2"))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"]  # no temporary folders left, oldest pruned
    for name in ("optimizer.pt", "rng.safetensors", "rng.json", "state.json", "config.toml", "manifest.json",
                 "text_encoder/model.safetensors"):
        assert (result.checkpoint / name).is_file(), name
    assert json.loads((result.checkpoint / "state.json").read_text())["step"] == 3
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()


class NaNReward(Reward):
    name = "nan"

    def score(self, pixels, prompts):
        return pixels.mean((1, 2, 3)) * float("nan")


NAN_REWARD = "tests.test_engine:NaNReward"  # a custom reward, named as a user's config names one


def test_nan_guard_skips_the_step_and_keeps_weights(tmp_path):
    trainer = Trainer(cfg_for(tmp_path, f'rewards=[{{name="{NAN_REWARD}"}}]'))
    before = {k: v.clone() for k, v in trainer.text_encoder.state_dict().items()}
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1
    for k, v in trainer.text_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="consecutive non-finite steps"):
        train(cfg_for(tmp_path / "run", f'rewards=[{{name="{NAN_REWARD}"}}]', "train.max_nan_skips=2"))
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()  # last good weights saved


@pytest.mark.parametrize("extra", [
    ["train.gradient_accumulation_steps=2", "sampler.random_grad_steps=true"],
    ["sampler.draft_lv_samples=2", "sampler.train_uncond=false"],
    ["train.mixed_precision=bf16", "sampler.checkpoint=every_n"],
])
def test_variants_run(tmp_path, extra):
    trainer = Trainer(cfg_for(tmp_path, *extra))
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))


def test_cli_train_then_resume(tmp_path, capsys):
    base = ["train", "--config", "configs/tiny_random.toml"] + sum((["--set", s] for s in FAST), [])
    assert cli.main(base + ["--set", f'output.dir="{tmp_path}"', "--set", "train.steps=1"]) == 0
    ckpt = capsys.readouterr().out.split("checkpoint: ")[1].split()[0]
    assert cli.main(base + ["--set", f'output.dir="{tmp_path}"', "--set", "train.steps=2", "--resume", ckpt]) == 0
    assert "step-000002" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", "configs/tiny_random.toml", "--set", "train.stepz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textcraftor-fast train: error: unknown config key 'train.stepz'") and "\n" not in err
    assert cli.main(["train", "--config", "missing.toml"]) == 2


def test_a_fresh_run_never_overwrites_an_existing_one(tmp_path):
    train(cfg_for(tmp_path, "train.steps=1"))
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(cfg_for(tmp_path, "train.steps=1"))
    assert (tmp_path / "checkpoints" / "step-000001").is_dir()
    result = train(cfg_for(tmp_path, "train.steps=2", "output.overwrite=true"))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    assert [m["step"] for m in result.history] == [1, 2]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "textcraftor_fast.cli", "train", "--config", "configs/tiny_random.toml"]
    for kv in FAST + [f"output.dir={tmp_path}", "train.steps=100000", "train.checkpointing_steps=100000"]:
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    ckpt = tmp_path / "checkpoints" / f"step-{last:06d}"
    assert ckpt.is_dir() and f"checkpoint: {ckpt}" in out
