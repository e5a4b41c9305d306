"""The text-encoder stage with encoder.method = 'lora' on tiny random SD models: what trains, no second encoder copy,
exact resume, and every option of the full stage either equal to the plain LoRA run or refused by name."""
import math

import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast import load_config
from textcraftor_fast.config import ConfigError
from textcraftor_fast.evaluation import Tuned
from textcraftor_fast.models.adapters import AdaptersDisabled
from textcraftor_fast.training.trainer import Trainer, train

FAST = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=8", "encoder.method=lora", "encoder.rank=4", "optim.lr=1e-2"]
LORA_FILE = "text_encoder_lora/pytorch_lora_weights.safetensors"


def cfg_for(tmp_path, *extra):
    return load_config("configs/tiny_random.toml", FAST + [f'output.dir="{tmp_path}"', *extra])


def _unique_bytes(*modules) -> int:
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def test_only_the_adapters_train_and_the_original_is_no_second_copy(tmp_path):
    lora = Trainer(cfg_for(tmp_path / "lora"))
    metrics = lora.train_step()
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    adapters = {n: p for n, p in lora.text_encoder.named_parameters() if ".lora_" in n}
    base = {n: p for n, p in lora.text_encoder.named_parameters() if ".lora_" not in n}
    assert [id(p) for p in lora.params] == [id(p) for p in adapters.values()]
    assert all(p.grad is not None and p.dtype == torch.float32 for p in adapters.values())
    assert all(p.grad is None and not p.requires_grad for p in base.values())
    assert isinstance(lora.original_encoder, AdaptersDisabled) and lora.original_encoder.model is lora.text_encoder
    # Memory: the encoder's parameters plus the adapters, once; the full stage holds the encoder twice.
    full = Trainer(cfg_for(tmp_path / "full", "encoder.method=full"))
    encoder_bytes = _unique_bytes(full.text_encoder)
    adapter_bytes = sum(p.numel() * 4 for p in adapters.values())
    assert _unique_bytes(lora.text_encoder, lora.original_encoder) == encoder_bytes + adapter_bytes
    assert _unique_bytes(full.text_encoder, full.original_encoder) == 2 * encoder_bytes
    assert adapter_bytes < 0.1 * encoder_bytes


def test_the_frozen_base_is_cast_and_the_adapters_stay_fp32(tmp_path):
    trainer = Trainer(cfg_for(tmp_path, "train.mixed_precision=bf16"))
    dtypes = {n: p.dtype for n, p in trainer.text_encoder.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "base_layer" in n} == {torch.bfloat16}
    assert trainer.train_step()["skipped"] == 0


def test_a_run_leaves_a_lora_that_evaluate_and_generate_load(tmp_path):
    result = train(cfg_for(tmp_path, "train.steps=2"))
    assert result.text_encoder == tmp_path / "text_encoder_lora"
    assert not (tmp_path / "text_encoder").exists()
    keys = load_file(str(tmp_path / LORA_FILE)).keys()
    assert keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)
    entry = Tuned.from_folder(tmp_path)
    assert entry.text_encoder == str(tmp_path) and entry.unet is None and entry.label == tmp_path.name
    # The UNet stage on the LoRA-tuned encoder (the paper's two stages stacked): it loads as a plain encoder.
    unet_stage = train(cfg_for(tmp_path / "unet", "train.stage=unet", "encoder.method=full", "train.steps=1",
                               f'model.text_encoder_path="{tmp_path}"'))
    assert (unet_stage.output_dir / "text_encoder" / "model.safetensors").is_file()


def test_export_rewrites_scales_and_merges_a_runs_lora_and_refuses_stacks_in_one_line(tmp_path, capsys):
    from textcraftor_fast import cli
    from textcraftor_fast.models import build_tiny_random, load_text_encoder
    from textcraftor_fast.models.encoder_lora import read_encoder_lora, stack_loras

    run = tmp_path / "run"
    train(cfg_for(run, "train.steps=2", "seed=3"))
    config = ["--config", "configs/tiny_random.toml", "--set", "seed=3"]
    assert cli.main(["export", *config, "--text-encoder", f"{run}:0.5", "--layout", "lora", "--out",
                     str(tmp_path / "half")]) == 0
    source, half = read_encoder_lora(run), read_encoder_lora(tmp_path / "half")
    assert half.state.keys() == source.state.keys()
    for key, value in source.state.items():  # the scale folded into the up matrices, the down ones as trained
        assert torch.equal(half.state[key], value * 0.5 if key.endswith("up.weight") else value), key
    assert cli.main(["export", *config, "--text-encoder", str(run), "--out", str(tmp_path / "merged")]) == 0
    base = build_tiny_random(seed=3).text_encoder
    merged, want = load_text_encoder(tmp_path / "merged"), stack_loras(base, [(run, 1.0)])
    assert merged.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in want.state_dict().items())
    q_proj = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], base.state_dict()[q_proj])
    capsys.readouterr()
    assert cli.main(["export", *config, "--text-encoder", f"{run}+{run}:0.5", "--layout", "lora", "--out",
                     str(tmp_path / "stack")]) == 2
    err = capsys.readouterr().err
    assert "stacks 2 LoRAs, and layout 'lora' writes one adapter" in err and err.count("\n") == 1, err


def _adapters(trainer):
    return [p.detach().clone() for p in trainer.params]


@pytest.mark.parametrize("option", [["sampler.checkpoint_towers=true"], ["optim.step_in_backward=true"],
                                    ["sampler.checkpoint=none", "sampler.checkpoint_vae=false"]],
                         ids=["checkpoint_towers", "step_in_backward", "no_checkpointing"])
def test_memory_and_step_options_train_the_same_adapters(tmp_path, option):
    torch.manual_seed(0)
    plain = Trainer(cfg_for(tmp_path / "a"))
    torch.manual_seed(0)
    other = Trainer(cfg_for(tmp_path / "b", *option))
    for _ in range(2):
        a, b = plain.train_step(), other.train_step()
        assert b["skipped"] == 0 and math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6)
    moved = [not torch.equal(p, q) for p, q in zip(_adapters(plain), _adapters(other))]
    for p, q in zip(_adapters(plain), _adapters(other)):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)
    assert len(moved) == len(plain.params) > 0


@pytest.mark.slow
def test_deepspeed_zero2_trains_the_adapters_as_one_process_does(tmp_path):
    pytest.importorskip("deepspeed")
    plain = train(cfg_for(tmp_path / "plain", "train.steps=2"))
    ds = train(cfg_for(tmp_path / "ds", "train.steps=2", "distributed.backend=deepspeed", "distributed.zero_stage=2"))
    a, b = load_file(str(plain.output_dir / LORA_FILE)), load_file(str(ds.output_dir / LORA_FILE))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("step", [[], ["optim.step_in_backward=true"]], ids=["plain", "step_in_backward"])
def test_a_non_finite_loss_skips_the_step_and_keeps_the_adapters(tmp_path, step):
    from tests.test_engine import NAN_REWARD

    trainer = Trainer(cfg_for(tmp_path, f'rewards=[{{name="{NAN_REWARD}"}}]', *step))
    before = _adapters(trainer)
    assert trainer.train_step()["skipped"] == 1
    assert all(torch.equal(p, q) for p, q in zip(before, _adapters(trainer)))


def test_8bit_adamw_trains_the_adapters(tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(cfg_for(tmp_path, "optim.name=adamw8bit"))
    before = _adapters(trainer)
    assert trainer.train_step()["skipped"] == 0
    assert any(not torch.equal(p, q) for p, q in zip(before, _adapters(trainer)))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_continues_bit_for_bit_from_adapters_and_their_state(tmp_path, optimizer):
    common = [f"optim.name={optimizer}", "train.checkpointing_steps=2"]
    straight = train(cfg_for(tmp_path / "a", "train.steps=4", *common))
    train(cfg_for(tmp_path / "b", "train.steps=2", *common))
    checkpoint = tmp_path / "b" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        ["text_encoder_lora", "optimizer.pt", "rng.safetensors", "rng.json", "state.json", "config.toml",
         "manifest.json"])
    resumed = train(cfg_for(tmp_path / "b", "train.steps=4", 'train.resume_from_checkpoint="latest"', *common))
    a, b = load_file(str(straight.checkpoint / LORA_FILE)), load_file(str(resumed.checkpoint / LORA_FILE))
    moved = load_file(str(checkpoint / LORA_FILE))
    assert any(not torch.equal(moved[k], a[k]) for k in a)  # steps 3-4 changed the adapters
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in straight.history]


def test_a_full_encoder_checkpoint_does_not_resume_a_lora_run(tmp_path):
    train(cfg_for(tmp_path, "encoder.method=full", "train.steps=1"))
    with pytest.raises(Exception, match="text_encoder_lora/pytorch_lora_weights.safetensors.*encoder.method"):
        Trainer(cfg_for(tmp_path, "train.steps=2",
                        f'train.resume_from_checkpoint="{tmp_path}/checkpoints/step-000001"'))


@pytest.mark.parametrize("overrides, key, words", [
    (["train.stage=unet"], "encoder.method", "model.text_encoder_path"),
    (["encoder.rank=0"], "encoder.rank", "an integer >= 1"),
    (["encoder.method=dora"], "encoder.method", "'full', 'lora'"),
])
def test_bad_encoder_settings_fail_when_the_config_loads(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, *overrides)
    assert key in str(err.value) and words in str(err.value)
