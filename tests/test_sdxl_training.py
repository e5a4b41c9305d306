"""TextCraftor on SDXL (tiny random SDXL-architecture models): each encoder choice trains only what it names, its
checkpoints resume bit for bit, the unconditional branch is the pipeline's zeros, and what SDXL does not support yet
is refused by name. SD2.x (one encoder, v-prediction) trains through the SD1.5 path."""
import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast import load_config
from textcraftor_fast.config import ConfigError
from textcraftor_fast.models.conditioner import SDXLConditioner
from textcraftor_fast.training.monitor import SpikeMonitor
from textcraftor_fast.training.trainer import Trainer, train

FAST = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=8", "output.overwrite=false", "model.family=sdxl"]
CHOICES = {"encoder 1": ["text_encoder"], "encoder 2": ["text_encoder_2"], "both": []}


def cfg_for(tmp_path, *extra):
    return load_config("configs/tiny_random.toml", FAST + [f'output.dir="{tmp_path}"', *extra])


def _train_list(names):
    return "encoder.train=[" + ", ".join(f'"{n}"' for n in names) + "]"


@pytest.mark.parametrize("choice", CHOICES)
def test_only_the_chosen_encoders_get_gradients_and_the_rest_is_shared(tmp_path, choice):
    trainer = Trainer(cfg_for(tmp_path, _train_list(CHOICES[choice])))
    assert isinstance(trainer.text_encoder, SDXLConditioner)
    trained = CHOICES[choice] or ["text_encoder", "text_encoder_2"]
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    for name, part in trainer.text_encoder.encoders().items():
        original = getattr(trainer.original_encoder, name)
        if name in trained:
            grads = [p.grad for p in part.parameters() if p.grad is not None]
            assert grads and any(g.abs().max() > 0 for g in grads), name
            assert all(p.dtype == torch.float32 for p in part.parameters()), name  # fp32 master weights
            assert original is not part  # its own frozen copy conditions the early steps
        else:
            assert all(p.grad is None and not p.requires_grad for p in part.parameters()), name
            assert original is part  # a frozen encoder is held once
    assert not any(p.requires_grad for p in trainer.original_encoder.parameters())
    assert {id(p) for p in trainer.params} == {id(p) for n in trained
                                               for p in getattr(trainer.text_encoder, n).parameters()}


@pytest.mark.parametrize("choice", CHOICES)
def test_three_steps_checkpoint_and_resume_bit_for_bit(tmp_path, choice):
    names = CHOICES[choice] or ["text_encoder", "text_encoder_2"]
    chosen = _train_list(CHOICES[choice])
    straight = train(cfg_for(tmp_path / "a", chosen, "train.steps=3", "train.checkpointing_steps=2"))
    train(cfg_for(tmp_path / "b", chosen, "train.steps=2", "train.checkpointing_steps=2"))
    resumed = train(cfg_for(tmp_path / "b", chosen, "train.steps=3", "train.checkpointing_steps=2",
                            'train.resume_from_checkpoint="latest"'))
    assert resumed.steps == 3 and resumed.text_encoder == tmp_path / "b"
    assert [m["reward"] for m in resumed.history] == [m["reward"] for m in straight.history]
    for name in ("text_encoder", "text_encoder_2"):
        assert (straight.checkpoint / name).is_dir() == (name in names), name  # only what trains is saved
        assert (tmp_path / "a" / name).is_dir() == (name in names), name
    for name in names:
        a = load_file(str(straight.checkpoint / name / "model.safetensors"))
        b = load_file(str(resumed.checkpoint / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_the_tuned_encoders_drop_in_through_model_text_encoder_path(tmp_path):
    run = train(cfg_for(tmp_path / "run", _train_list(["text_encoder_2"]), "train.steps=1"))
    trainer = Trainer(cfg_for(tmp_path / "next", f'model.text_encoder_path="{run.text_encoder}"', "train.stage=unet",
                              "unet.method=lora"))
    tuned = load_file(str(run.text_encoder / "text_encoder_2" / "model.safetensors"))
    got = trainer.text_encoder.text_encoder_2.state_dict()
    assert all(torch.equal(got[k], v) for k, v in tuned.items())
    assert trainer.train_step()["skipped"] == 0  # the UNet stage under the tuned SDXL encoders


def test_the_unconditional_branch_is_zeros_whatever_train_uncond_says(tmp_path, caplog):
    with caplog.at_level("INFO"):
        trainer = Trainer(cfg_for(tmp_path, "sampler.train_uncond=true"))
    assert "sampler.train_uncond has no effect" in caplog.text
    emb = trainer._trained_embeddings(torch.stack([trainer.uncond_ids[0]] * 2))
    assert not emb.uncond[:, :-1].any() and not emb.uncond.requires_grad
    assert emb.cond.requires_grad


@pytest.mark.parametrize("extra,key", [
    (["encoder.method=lora"], "encoder.method"),
    (["model.family=sd15", _train_list(["text_encoder_2"])], "encoder.train"),
])
def test_what_is_not_supported_is_refused_by_name(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Trainer(cfg_for(tmp_path, *extra))


def test_sd2_trains_its_encoder_as_lora_too(tmp_path):
    trainer = Trainer(cfg_for(tmp_path, "model.family=sd2", "encoder.method=lora"))
    assert trainer.train_step()["grad_norm"] > 0
    assert all("lora" in n for n, p in trainer.text_encoder.named_parameters() if p.requires_grad)


def test_sd2_trains_with_v_prediction(tmp_path):
    assert Trainer(cfg_for(tmp_path / "probe", "model.family=sd2")).schedule.prediction_type == "v_prediction"
    result = train(cfg_for(tmp_path, "model.family=sd2", "train.steps=2"))
    assert result.history[-1]["skipped"] == 0 and result.history[-1]["grad_norm"] > 0
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()


# What works for SD1.5 works for SDXL: one step of each option set on tiny SDXL (encoder 2 trained, the larger one).
@pytest.mark.parametrize("extra", [
    ["sampler.checkpoint=auto", "sampler.checkpoint_vae=auto", "sampler.checkpoint_towers=auto"],
    ["sampler.checkpoint=every_n", "train.mixed_precision=bf16"],
    ["sampler.checkpoint_unet_blocks=true", "sampler.checkpoint_vae=blocks", "sampler.checkpoint_towers=true"],
    ["sampler.random_grad_steps=true", "train.gradient_accumulation_steps=2", "train.embedding_anchor=0.1"],
    ["sampler.draft_lv_samples=2"],
    ["optim.step_in_backward=true"],
    ["optim.name=adamw8bit"],
    ["ops.backend=cpp"],
    ["train.eval_every=1", 'data.eval_path="builtin:parti"', "data.eval_max_prompts=2",
     'output.report_to=["jsonl", "tensorboard"]'],
], ids=["auto", "every_n-bf16", "blocks", "random-k-accumulation-anchor", "draft-lv", "step-in-backward", "adamw8bit",
        "native-ops", "evaluation-tensorboard"])
def test_the_sd15_options_run_on_sdxl(tmp_path, extra):
    trainer = Trainer(cfg_for(tmp_path, _train_list(["text_encoder_2"]), *extra))
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss"])) and metrics["skipped"] == 0
    if "train.eval_every=1" in extra:
        trainer.step = 1
        trainer._report(metrics, 0, SpikeMonitor())
        assert any(k.endswith("_diff") for k in metrics), metrics  # evaluated: tuned vs original
        assert "emb_cos" in metrics


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_on_one_process_equals_the_plain_run(tmp_path, stage):
    chosen = _train_list(["text_encoder_2"])
    plain = train(cfg_for(tmp_path / "plain", chosen, "train.steps=2"))
    zero = train(cfg_for(tmp_path / "zero", chosen, "train.steps=2", "distributed.backend=deepspeed",
                         f"distributed.zero_stage={stage}"))
    assert [m["reward"] for m in zero.history] == [m["reward"] for m in plain.history]
    a = load_file(str(plain.checkpoint / "text_encoder_2" / "model.safetensors"))
    b = load_file(str(zero.checkpoint / "text_encoder_2" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


def test_the_nan_guard_keeps_both_encoders(tmp_path):
    from tests.test_engine import NAN_REWARD

    trainer = Trainer(cfg_for(tmp_path, f'rewards=[{{name="{NAN_REWARD}"}}]'))
    before = {k: v.clone() for k, v in trainer.text_encoder.state_dict().items()}
    assert trainer.train_step()["skipped"] == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.text_encoder.state_dict().items())


def test_the_shipped_sdxl_recipe_runs_on_tiny_sdxl(tmp_path):
    # configs/sdxl.toml's sampler and memory options, the model and rewards swapped for tiny ones.
    cfg = load_config("configs/sdxl.toml", ["model.kind=tiny_random", "model.resolution=32",
                                            'rewards=[{name="brightness"}]',
                                            "sampler.num_steps=4", "sampler.grad_steps=2", "train.progress_bar=false",
                                            f'output.dir="{tmp_path}"', "data.max_prompts=4",
                                            "train.gradient_accumulation_steps=1"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.text_encoder, SDXLConditioner) and not trainer.train_uncond
    assert trainer.train_step()["grad_norm"] > 0


@pytest.mark.slow
def test_two_ranks_zero_2_train_sdxl_as_one_process_does(tmp_path):
    """Two ranks x batch 1 under torchrun and DeepSpeed ZeRO-2 (tests/ds_worker.py) against one process x batch 2:
    the same losses, and encoder 2's weights within test_distributed's tolerance for a reordered all-reduce."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.ds_worker import BASE
    from tests.faults.launch import free_port
    from tests.test_distributed import ENV, WORKER, assert_same_training

    sdxl = ["model.family=sdxl", 'encoder.train=["text_encoder_2"]']
    reference = Trainer(load_config("configs/tiny_random.toml", BASE + sdxl + [
        "train.steps=2", "train.batch_size=2", f'output.dir="{tmp_path / "one"}"']))
    losses = [m["loss"] for m in reference.train().history]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), WORKER, str(tmp_path / "two"), "z2:2:2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**ENV, "DS_WORKER_SET": ";".join(sdxl)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = load_file(str(tmp_path / "two" / "z2" / "rank0.safetensors"))
    want = reference.text_encoder.state_dict()
    for key, value in want.items():
        assert_same_training(got[key], value, key)
    assert json.loads((tmp_path / "two" / "z2" / "rank0.json").read_text())["losses"] == pytest.approx(losses, abs=1e-6)
    assert Path(tmp_path / "two" / "z2" / "text_encoder_2" / "model.safetensors").is_file()
