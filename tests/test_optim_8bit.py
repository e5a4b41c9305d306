"""bitsandbytes' 8-bit AdamW (plain and paged), real, on CPU: state size for the CLIP-L text encoder, AdamW's
update, exact resume through a checkpoint, and a clear error when a checkpoint's optimizer is another one."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

from textcraftor_fast import load_config  # noqa: E402
from textcraftor_fast.training.checkpoints import CheckpointError  # noqa: E402
from textcraftor_fast.config import OptimConfig  # noqa: E402
from textcraftor_fast.training.trainer import train  # noqa: E402
from textcraftor_fast.memory.saved_bytes import optimizer_state_bytes  # noqa: E402
from textcraftor_fast.training.optim import build_optimizer  # noqa: E402

FAST = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=8", "train.checkpointing_steps=2"]
CPU = torch.device("cpu")


def _one_step(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-4), CPU)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()  # state is allocated at the first step
    return opt


def test_8bit_state_of_the_clip_l_encoder_is_a_quarter_of_adamws():
    from transformers import CLIPTextConfig, CLIPTextModel

    import textcraftor_fast.models as models

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(Path(models.__file__).parent / "sd15" / "text_encoder"))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    assert n == 123_060_480  # CLIP ViT-L/14's text tower
    # By hand. torch AdamW: two fp32 moments per element and a fp32 step count per tensor. bitsandbytes: tensors
    # of >= 4096 elements keep two uint8 moments, one fp32 absmax per block of 256 elements for each, and two
    # 256-entry fp32 code books; smaller tensors (biases, LayerNorms) keep two fp32 moments.
    big = [p.numel() for p in params if p.numel() >= 4096]
    small = [p.numel() for p in params if p.numel() < 4096]
    expected_fp32 = 8 * n + 4 * len(params)
    expected_8bit = sum(2 * k + 2 * 4 * math.ceil(k / 256) + 2 * 256 * 4 for k in big) + sum(8 * k for k in small)
    fp32 = optimizer_state_bytes(_one_step(model, "adamw"))
    eight = optimizer_state_bytes(_one_step(model, "adamw8bit"))
    assert (fp32, eight) == (expected_fp32, expected_8bit)
    assert eight <= 0.30 * fp32  # measured: 250.8 MB vs 984.5 MB, 25.5%


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_updates_follow_torch_adamw(name):
    # Three steps on one 64 x 1024 weight (8-bit state) with decoupled weight decay: the update is torch
    # AdamW's up to the moments' 8-bit rounding (dynamic code, blocks of 256).
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(64, 1024, generator=gen)
    grads = [torch.randn(64, 1024, generator=gen) * 1e-2 for _ in range(3)]
    moved = {}
    for opt_name in ("adamw", name):
        layer = torch.nn.Linear(1024, 64, bias=False)
        layer.weight.data.copy_(w0)
        opt = build_optimizer(layer, OptimConfig(name=opt_name, lr=1e-2, weight_decay=0.1), CPU)
        for g in grads:
            layer.weight.grad = g.clone()
            opt.step()
        moved[opt_name] = layer.weight.detach() - w0
    ref, got = moved["adamw"], moved[name]
    assert ref.abs().mean() > 1e-2  # three steps of about lr each: the comparison is not of zeros
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    assert (got.sign() == ref.sign()).float().mean() > 0.99


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_state_saves_and_resumes_exactly(tmp_path, name):
    def cfg(folder, *extra):
        return load_config("configs/tiny_random.toml", FAST + [f"optim.name={name}", "optim.lr=1e-3",
                                                               f'output.dir="{folder}"', *extra])

    straight = train(cfg(tmp_path / "a", "train.steps=4"))
    train(cfg(tmp_path / "b", "train.steps=2"))
    resumed = train(cfg(tmp_path / "b", "train.steps=4", 'train.resume_from_checkpoint="latest"'))
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    # 8-bit moments were saved (bitsandbytes >= 0.48 nests them under one key of each parameter's state)
    nested = [s.get("__bnb_optimizer_quant_state__", s) for s in state["state"].values()]
    assert any(s["state1"].dtype == torch.uint8 for s in nested if "state1" in s)
    a = load_file(str(straight.checkpoint / "text_encoder" / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "text_encoder" / "model.safetensors"))
    moved = load_file(str(tmp_path / "b" / "checkpoints" / "step-000002" / "text_encoder" / "model.safetensors"))
    assert any(not torch.equal(moved[k], a[k]) for k in a)  # steps 3-4 changed the weights
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in straight.history]


def test_a_checkpoint_of_another_optimizer_is_refused_by_name(tmp_path):
    base = FAST + [f'output.dir="{tmp_path}"']
    train(load_config("configs/tiny_random.toml", base + ["train.steps=2", "optim.name=adamw8bit"]))
    with pytest.raises(CheckpointError, match=r"holds 'adamw8bit' optimizer state .* optim\.name='adamw'; "
                                              r"resume with --set optim\.name=adamw8bit"):
        train(load_config("configs/tiny_random.toml", base + ["train.steps=4", 'train.resume_from_checkpoint="latest"']))


@pytest.mark.slow
def test_8bit_adamw_as_deepspeeds_client_optimizer_trains_as_without_it(tmp_path):
    # ZeRO stage 0 (1 and 2 are refused for 8-bit state: tests/test_deepspeed_backend.py), one process: DeepSpeed
    # steps our bitsandbytes optimizer; the weights and losses are those of the run without DeepSpeed.
    pytest.importorskip("deepspeed")
    base = FAST + ["train.steps=3", "optim.name=adamw8bit", "optim.lr=1e-3"]
    plain = train(load_config("configs/tiny_random.toml", base + [f'output.dir="{tmp_path / "plain"}"']))
    ds = train(load_config("configs/tiny_random.toml", base + [
        f'output.dir="{tmp_path / "ds"}"', "distributed.backend=deepspeed", "distributed.zero_stage=0"]))
    a = load_file(str(tmp_path / "plain" / "text_encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "ds" / "text_encoder" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in ds.history] == [m["loss"] for m in plain.history]
