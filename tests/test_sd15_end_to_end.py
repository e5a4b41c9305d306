"""The SD1.5 path end to end: random weights in the exact SD1.5 architecture, written as one original-layout
.safetensors file, loaded through the real single-file loader, and trained for a step at reduced resolution."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the random-model writers live there

from random_towers import write_random_sd15  # noqa: E402
from textcraftor_fast import load_config  # noqa: E402
from textcraftor_fast.training.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    # fp16 on disk halves the 4 GB write; the loader reads it back as fp32 master weights.
    return write_random_sd15(tmp_path_factory.mktemp("sd15") / "sd15.safetensors")


@pytest.mark.slow(minutes=2)  # the file: writing and loading a 2 GB SD1.5 file, two steps at SD1.5 size
def test_sd15_architecture_trains_one_step(sd15_file, tmp_path):
    cfg = load_config(None, ["model.kind=pretrained", f'model.path="{sd15_file}"', "model.resolution=64",
                             "sampler.num_steps=3", "sampler.grad_steps=2", "train.batch_size=1",
                             'rewards=[{name="colorfulness"}]', f'output.dir="{tmp_path}"', "train.progress_bar=false",
                             "data.max_prompts=4"])
    trainer = Trainer(cfg)
    assert sum(p.numel() for p in trainer.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in trainer.text_encoder.parameters()) == 123_060_480
    assert trainer.latent_shape[1:] == (8, 8) and trainer.schedule.timesteps == [999, 666, 332]
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    assert all(p.grad is None for p in trainer.unet.parameters())
    assert all(p.grad is not None for p in trainer.text_encoder.parameters())


@pytest.mark.slow
def test_sd15_architecture_unet_stage_lora_step(sd15_file, tmp_path):
    # The UNet stage at SD1.5 size: diffusers' default LoRA (rank 4 on to_q/to_k/to_v/to_out.0), the UNet call
    # checkpointed, one optimizer step; only the adapters move.
    cfg = load_config(None, ["model.kind=pretrained", f'model.path="{sd15_file}"', "model.resolution=64",
                             "sampler.num_steps=2", "sampler.grad_steps=1", "train.batch_size=1",
                             "train.stage=unet", 'rewards=[{name="colorfulness"}]', f'output.dir="{tmp_path}"',
                             "train.progress_bar=false", "data.max_prompts=4"])
    trainer = Trainer(cfg)
    lora = {n: p for n, p in trainer.unet.named_parameters() if p.requires_grad}
    # 16 attention blocks x 2 attentions x 4 projections, A (4 x in) and B (out x 4) each.
    assert len(lora) == 16 * 2 * 4 * 2 and all(".lora_" in n for n in lora)
    assert sum(p.numel() for p in lora.values()) == 797_184
    before = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    assert all(p.grad is not None for p in lora.values())
    assert all(p.grad is None for p in trainer.text_encoder.parameters())
    assert all(p.grad is None for n, p in trainer.unet.named_parameters() if n not in lora)
    assert any(not torch.equal(p, before[n]) for n, p in lora.items() if n in before)
