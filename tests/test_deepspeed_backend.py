"""The DeepSpeed config dict is generated from our config tree, field by field; unsupported combinations
fail when the config loads; the package works without DeepSpeed installed."""
import subprocess
import sys

import pytest

from textcraftor_fast import load_config
from textcraftor_fast.config import ConfigError
from textcraftor_fast.parallel.deepspeed_engine import deepspeed_config


def _cfg(*overrides):
    return load_config("configs/tiny_random.toml", ["distributed.backend=deepspeed", *overrides])


def test_the_deepspeed_dict_follows_the_config_field_by_field():
    cfg = _cfg("train.batch_size=3", "train.gradient_accumulation_steps=5", "optim.max_grad_norm=0.25",
               "distributed.zero_stage=1", "train.mixed_precision=bf16")
    assert deepspeed_config(cfg, world_size=4) == {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 5,
        "train_batch_size": 3 * 5 * 4,
        "gradient_clipping": 0.25,
        "bf16": {"enabled": False},  # the encoder keeps fp32 master weights; bf16 is our autocast
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "zero_optimization": {"stage": 1, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@pytest.mark.parametrize("overrides, world, want", [
    (["train.batch_size=3", "train.gradient_accumulation_steps=5", "optim.max_grad_norm=0.25",
      "distributed.zero_stage=1", "train.mixed_precision=bf16"], 4, dict(micro=3, acc=5, total=60, clip=0.25,
                                                                         stage=1, untested=False)),
    (["optim.name=adamw8bit", "distributed.zero_stage=0", "train.batch_size=2"], 2,
     dict(micro=2, acc=1, total=4, clip=0.0, stage=0, untested=True)),
])
def test_deepspeed_reads_the_dict_as_meant(monkeypatch, overrides, world, want):
    """DeepSpeed's own parser, not a copy of our dict: a misspelt or misnested key is silently DeepSpeed's default
    there (its gradient_clipping default is 1.0), and an inconsistent train_batch_size fails its batch assertion."""
    pytest.importorskip("deepspeed")
    import deepspeed.comm as ds_comm
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    # No process group: DeepSpeedConfig asks deepspeed.comm for the rank and data-parallel world size.
    monkeypatch.setattr(ds_comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(ds_comm, "get_world_size", lambda group=None: world)
    ds = DeepSpeedConfig(deepspeed_config(_cfg(*overrides), world_size=world))
    assert ds.world_size == world
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (
        want["micro"], want["acc"], want["total"])
    assert ds.gradient_clipping == want["clip"]
    assert ds.zero_optimization_stage == want["stage"] and ds.zero_enabled == (want["stage"] > 0)
    assert not ds.bfloat16_config.enabled and not ds.float16_config.enabled  # fp32 master weights
    assert ds.zero_allow_untested_optimizer is want["untested"]
    assert ds.communication_data_type == torch.float32
    assert (ds.zero_config.overlap_comm, ds.zero_config.contiguous_gradients) == (False, True)
    assert ds.optimizer_name is None  # the client optimizer: no DeepSpeed optimizer section
    assert not ds.wall_clock_breakdown


def test_each_field_moves_with_its_key():
    base = deepspeed_config(_cfg(), world_size=2)
    assert base["gradient_clipping"] == 0.0  # optim.max_grad_norm unset: no clipping, as without DeepSpeed
    assert base["zero_optimization"]["stage"] == 2  # the default
    assert deepspeed_config(_cfg("distributed.zero_stage=0"), 2)["zero_optimization"]["stage"] == 0
    assert deepspeed_config(_cfg("train.batch_size=7"), 2)["train_batch_size"] == 7 * 2
    eight_bit = deepspeed_config(_cfg("optim.name=adamw8bit", "distributed.zero_stage=0"), 2)
    assert eight_bit["zero_allow_untested_optimizer"] is True  # bitsandbytes is outside ZeRO's tested list


@pytest.mark.parametrize("overrides, key, words", [
    (["distributed.zero_stage=3"], "distributed.zero_stage", "ZeRO-3 shards the text encoder's weights"),
    (["distributed.zero_stage=4"], "distributed.zero_stage", "expected one of 0, 1, 2, 3"),
    (["train.mixed_precision=fp16"], "train.mixed_precision", "'no' or 'bf16'"),
    (["optim.name=adamw8bit", "distributed.zero_stage=2"], "optim.name", "cannot be resharded"),
    (["distributed.backend=horovod"], "distributed.backend", "'deepspeed'"),
])
def test_unsupported_settings_fail_when_the_config_loads(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert key in str(err.value) and words in str(err.value)


def test_without_deepspeed_the_package_trains_and_the_backend_names_the_extra(tmp_path):
    # A fresh interpreter where `import deepspeed` fails, as on a machine without it.
    code = f"""
import sys
sys.modules["deepspeed"] = None
from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import train
fast = ["sampler.num_steps=2", "sampler.grad_steps=1", "train.batch_size=1", "train.steps=1",
        "train.progress_bar=false", "data.max_prompts=4", "output.dir='{tmp_path / "plain"}'"]
assert train(load_config("configs/tiny_random.toml", fast)).steps == 1
try:
    train(load_config("configs/tiny_random.toml", fast + ["distributed.backend=deepspeed",
                                                         "output.dir='{tmp_path / "ds"}'"]))
except ImportError as e:
    print("ERROR:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR: distributed.backend='deepspeed' needs DeepSpeed: pip install 'textcraftor-fast[deepspeed]'" \
        in proc.stdout
