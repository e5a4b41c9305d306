"""The UNet stage (train.stage = 'unet') on tiny random SD models: what gets gradients, checkpointing of UNet calls
with weight gradients, exact resume, what a run leaves behind, and the encoder stage untouched."""
import json

import pytest
import torch
from safetensors.torch import load_file

from textcraftor_fast import load_config
from textcraftor_fast.config import SamplerConfig
from textcraftor_fast.training.trainer import Trainer, train
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes
from textcraftor_fast.models import build_tiny_random
from textcraftor_fast.models.lora import add_lora
from textcraftor_fast.models.text import tokenize
from textcraftor_fast.rewards.simple import ColorfulnessReward
from textcraftor_fast.sampler import Embeddings, decode_latents, make_schedule, sample_latents

FAST = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=8", "train.stage=unet"]


def cfg_for(tmp_path, *extra):
    return load_config("configs/tiny_random.toml", FAST + [f'output.dir="{tmp_path}"', *extra])


def _frozen_towers(trainer):
    return [("text encoder", trainer.text_encoder), ("original encoder", trainer.original_encoder),
            ("vae", trainer.vae), ("rewards", trainer.rewards)]


def test_lora_only_the_adapters_get_gradients(tmp_path):
    trainer = Trainer(cfg_for(tmp_path))
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    lora = {n: p for n, p in trainer.unet.named_parameters() if ".lora_" in n}
    base = {n: p for n, p in trainer.unet.named_parameters() if ".lora_" not in n}
    # rank 4 on to_q/to_k/to_v/to_out.0 of every attention: A and B per projection.
    n_attention = sum(type(m).__name__ == "Attention" for m in trainer.unet.modules())
    assert n_attention > 0 and len(lora) == n_attention * 4 * 2  # A and B on to_q, to_k, to_v, to_out.0
    assert all(p.requires_grad and p.grad is not None for p in lora.values())
    assert any(p.grad.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None and not p.requires_grad for p in base.values())
    assert [id(p) for p in trainer.params] == [id(p) for p in lora.values()]
    for name, module in _frozen_towers(trainer):
        params = list(module.parameters())
        assert all(p.grad is None for p in params) and not any(p.requires_grad for p in params), name


def test_full_every_unet_weight_and_nothing_else_gets_gradients(tmp_path):
    trainer = Trainer(cfg_for(tmp_path, "unet.method=full"))
    trainer.train_step()
    unet = list(trainer.unet.parameters())
    assert all(p.requires_grad and p.grad is not None and p.dtype == torch.float32 for p in unet)
    assert len(trainer.params) == len(unet)
    for name, module in _frozen_towers(trainer):
        params = list(module.parameters())
        assert all(p.grad is None for p in params) and not any(p.requires_grad for p in params), name


@pytest.fixture(scope="module")
def lora_tiny():
    comp = build_tiny_random(seed=0)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.eval().requires_grad_(False)
    add_lora(comp.unet, 4, 4.0, ("to_k", "to_q", "to_v", "to_out.0"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero up matrices: every adapter weight then gets a gradient
        for n, p in comp.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return comp


def _embed(comp, prompts):
    ids = comp.tokenizer(prompts, padding="max_length", max_length=comp.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return comp.text_encoder(ids)[0]


def _lora_step(comp, policy: str, k: int, ckpt_vae: bool = True):
    """(bytes saved for backward, LoRA gradients) of one UNet-stage step through the sampler."""
    cfg = SamplerConfig(num_steps=8, grad_steps=k, checkpoint=policy, checkpoint_vae=ckpt_vae)
    schedule = make_schedule(comp.scheduler.config, 8)
    prompts = ["a red circle", "a blue square"]
    emb = Embeddings(_embed(comp, prompts), _embed(comp, [""]))
    params = {n: p for n, p in comp.unet.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None

    def run():
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        lat = sample_latents(comp.unet, schedule, x_T, emb, emb, cfg, k)
        return ColorfulnessReward()(decode_latents(comp.vae, lat, ckpt_vae), prompts)

    nbytes, reward = saved_tensor_bytes(run)
    reward.sum().backward()
    return nbytes, {n: p.grad.clone() for n, p in params.items()}


def test_checkpointed_unet_calls_give_the_plain_lora_gradients(lora_tiny):
    _, plain = _lora_step(lora_tiny, "none", 3, ckpt_vae=False)
    _, ckpt = _lora_step(lora_tiny, "step", 3)
    assert plain.keys() == ckpt.keys() and all(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_saved_bytes_stay_flat_in_k_with_weight_gradients(lora_tiny):
    ck = {k: _lora_step(lora_tiny, "step", k)[0] for k in (1, 8)}
    plain = {k: _lora_step(lora_tiny, "none", k)[0] for k in (1, 2)}
    # With every UNet call checkpointed, a graph step keeps its input latent alone: 2 x 4 x 8 x 8 fp32 = 2 KiB.
    assert ck[8] - ck[1] == 7 * 2 * 4 * 8 * 8 * 4, ck
    assert plain[2] - plain[1] > 0.5 * ck[1], (plain, ck)  # without checkpointing each step keeps a UNet call


def _lora_weights(path):
    return load_file(str(path / "unet_lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_bit_for_bit(tmp_path, method):
    common = [f"unet.method={method}", "train.checkpointing_steps=2"]
    straight = train(cfg_for(tmp_path / "a", "train.steps=4", *common))
    train(cfg_for(tmp_path / "b", "train.steps=2", *common))
    resumed = train(cfg_for(tmp_path / "b", "train.steps=4", 'train.resume_from_checkpoint="latest"', *common))
    folder = "unet_lora/pytorch_lora_weights.safetensors" if method == "lora" else \
        "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(straight.checkpoint / folder)), load_file(str(resumed.checkpoint / folder))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["reward"] for m in resumed.history] == [m["reward"] for m in straight.history]
    assert [m["step"] for m in resumed.history] == [1, 2, 3, 4]


def test_a_run_leaves_the_lora_and_the_encoder_it_was_tuned_under(tmp_path):
    from textcraftor_fast.models import export_text_encoder

    tuned = build_tiny_random(seed=3).text_encoder  # stands for an encoder-stage result
    encoder = export_text_encoder(tuned, tmp_path / "enc" / "text_encoder")
    result = train(cfg_for(tmp_path / "run", "train.steps=1", f'model.text_encoder_path="{encoder}"'))
    assert result.unet == tmp_path / "run" / "unet_lora" and result.text_encoder == tmp_path / "run" / "text_encoder"
    assert (result.unet / "pytorch_lora_weights.safetensors").is_file()
    assert load_file(str(result.text_encoder / "model.safetensors")).keys() == \
        load_file(str(encoder / "model.safetensors")).keys()
    for k, v in load_file(str(encoder / "model.safetensors")).items():
        assert torch.equal(load_file(str(result.text_encoder / "model.safetensors"))[k], v), k
    assert sorted(p.name for p in result.checkpoint.iterdir()) == [
        "config.toml", "manifest.json", "optimizer.pt", "rng.json", "rng.safetensors", "state.json", "unet_lora"]
    assert 'stage = "unet"' in (result.checkpoint / "config.toml").read_text()
    base_only = train(cfg_for(tmp_path / "base", "train.steps=1"))
    assert base_only.text_encoder is None and not (tmp_path / "base" / "text_encoder").exists()


def test_on_a_tuned_encoder_the_unet_stage_samples_as_evaluation_does(tmp_path):
    # evaluate/generate sample a tuned encoder with the unconditional embedding (and any steps before the switch
    # step) from the base model's encoder, as the encoder stage trained it: the UNet stage must train under that
    # same CFG, not under the tuned encoder's "" embedding.
    from textcraftor_fast.models import export_text_encoder

    base, tuned = build_tiny_random(seed=0).text_encoder, build_tiny_random(seed=3).text_encoder
    encoder = export_text_encoder(tuned, tmp_path / "enc" / "text_encoder")
    trainer = Trainer(cfg_for(tmp_path / "run", f'model.text_encoder_path="{encoder}"'))
    for name, p in base.state_dict().items():  # the "original" encoder is the base model's, the trained-under one tuned
        assert torch.equal(trainer.original_encoder.state_dict()[name], p), name
    for name, p in tuned.state_dict().items():
        assert torch.equal(trainer.text_encoder.state_dict()[name], p), name
    with torch.no_grad():
        empty = tokenize(trainer.tokenizer, [""])
        assert torch.equal(trainer.frozen_uncond, base(empty)[0])
        assert not torch.allclose(trainer.frozen_uncond, tuned(empty)[0])
    assert trainer.stage.evaluated()[0] is trainer.text_encoder  # evaluated as both stages against the base model


def test_an_encoder_stage_checkpoint_does_not_resume_a_unet_stage(tmp_path):
    train(load_config("configs/tiny_random.toml", FAST[:-1] + [f'output.dir="{tmp_path}"', "train.steps=1"]))
    with pytest.raises(Exception, match="unet_lora/pytorch_lora_weights.safetensors.*another train.stage"):
        Trainer(cfg_for(tmp_path, "train.steps=2", f'train.resume_from_checkpoint="{tmp_path}/checkpoints/step-000001"'))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1


NO_PEFT = """
import sys
sys.modules["peft"] = None  # what an environment without peft looks like to `import peft` and to find_spec
from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import train
fast = {fast!r} + ["train.steps=1", "output.overwrite=true"]
result = train(load_config("configs/tiny_random.toml", fast + ['output.dir="{out}/encoder"']))
print("encoder stage:", result.text_encoder)
try:
    train(load_config("configs/tiny_random.toml", fast + ["train.stage=unet", 'output.dir="{out}/unet"']))
except ImportError as e:
    print("unet stage:", e)
"""


def test_without_peft_the_encoder_stage_trains_and_lora_names_the_extra(tmp_path):
    import os
    import subprocess
    import sys

    script = NO_PEFT.format(fast=FAST[:-1], out=tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"encoder stage: {tmp_path / 'encoder' / 'text_encoder'}" in proc.stdout
    assert "unet stage: unet.method='lora' needs the peft package: pip install 'textcraftor-fast[lora]'" in proc.stdout


@pytest.mark.parametrize("method", ["lora", "full"])
def test_evaluation_during_training_compares_against_the_base_unet(tmp_path, method):
    trainer = Trainer(cfg_for(tmp_path, f"unet.method={method}", "train.eval_every=1", 'data.eval_path="builtin:parti"',
                              "data.eval_max_prompts=2"))
    try:
        before, _ = trainer.evaluator(*trainer.stage.evaluated())  # no update yet: the base UNet itself
        trainer.train_step()
        after, grid = trainer.evaluator(*trainer.stage.evaluated())
        base_again, _ = trainer.evaluator(None, trainer.stage.base_unet)  # what the differences are taken against
    finally:
        trainer.close()
    assert all(v == 0.0 for k, v in before.items() if k.endswith("_diff"))
    assert after["eval/reward_diff"] != 0.0 and not torch.equal(grid[:2], grid[2:])
    assert all(v == 0.0 for k, v in base_again.items() if k.endswith("_diff"))
