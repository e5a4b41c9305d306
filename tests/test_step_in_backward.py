"""optim.step_in_backward: each tensor steps inside backward and its gradient is freed at once. The expected
weights come from torch's own optimizer path (backward, then one step over every tensor)."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from textcraftor_fast.training.steppers import StepInBackward
from textcraftor_fast.config import ConfigError
from textcraftor_fast.training.trainer import Trainer, train
from textcraftor_fast.memory.policy import training_state_bytes
from tests.test_engine import NAN_REWARD, cfg_for
from tests.test_stages import cfg_for as stage_cfg_for


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 1))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(step))
    return model(ids).square().mean()


def _adamw(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        bnb = pytest.importorskip("bitsandbytes")
        # min_8bit_size=0: the small test tensors get 8-bit (blockwise) state too, as CLIP-L's large ones do.
        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1, min_8bit_size=0)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_the_weights_and_state_are_the_usual_steps_bit_for_bit(optimizer):
    usual, fused = _model(), _model()
    usual_opt, fused_opt = _adamw(usual, optimizer), _adamw(fused, optimizer)
    stepper = StepInBackward(fused_opt, list(fused.parameters()), nan_guard=True)
    for step in range(3):
        usual_opt.zero_grad(set_to_none=True)
        loss = _loss(usual, step)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(usual.parameters(), float("inf")))
        usual_opt.step()
        stepper.begin()
        _loss(fused, step).backward()
        assert stepper.stepped == 7 and stepper.skipped == 0  # embedding, 2 x linear, norm: 7 tensors
        assert math.isclose(stepper.grad_norm, norm, rel_tol=1e-6)
    for (name, a), b in zip(usual.named_parameters(), fused.parameters()):
        assert torch.equal(a, b), name
        assert b.grad is None, name
    for p, q in zip(usual.parameters(), fused.parameters()):  # the state dicts are filled in different orders
        a, b = usual_opt.state[p], fused_opt.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_at_most_one_gradient_exists_during_backward():
    model = _model()
    params = list(model.parameters())
    alive = []
    # Registered first, so it runs before the stepper's hook: it sees the gradient just accumulated.
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    StepInBackward(torch.optim.AdamW(params, lr=1e-2, fused=True), params, nan_guard=True)
    _loss(model, 0).backward()
    assert alive == [1] * len(params)
    assert all(p.grad is None for p in params)


def test_a_non_finite_gradient_leaves_that_tensor_and_its_state_untouched():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    stepper = StepInBackward(opt, list(model.parameters()), nan_guard=True)
    _loss(model, 0).backward()  # every tensor has state now
    bad = model[1].weight
    before = {id(p): p.detach().clone() for p in model.parameters()}
    exp_avg = opt.state[bad]["exp_avg"].clone()
    bad.register_hook(lambda g: torch.full_like(g, float("inf")))
    stepper.begin()
    _loss(model, 1).backward()
    assert stepper.skipped == 1 and stepper.stepped == 6
    assert torch.equal(bad, before[id(bad)]) and torch.equal(opt.state[bad]["exp_avg"], exp_avg)
    assert not torch.equal(model[4].weight, before[id(model[4].weight)])


# The UNet stage's LoRA tensors are used by every graph-carrying UNet call (checkpointed): each tensor's hook must
# fire once, after the last call's gradient has been added, or it would step on a partial gradient.
@pytest.mark.parametrize("config", [cfg_for, stage_cfg_for], ids=["text_encoder", "unet_lora"])
def test_training_matches_the_usual_step_and_reports_its_norm(tmp_path, config):
    usual = Trainer(config(tmp_path / "a"))
    fused = Trainer(config(tmp_path / "b", "optim.step_in_backward=true"))
    for _ in range(2):
        a, b = usual.train_step(), fused.train_step()
        assert b["skipped"] == 0 and a["loss"] == b["loss"]
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5)
    assert usual.params and len(usual.params) == len(fused.params)
    for p, q in zip(usual.params, fused.params):
        assert torch.equal(p, q)
        assert q.grad is None


def test_a_resumed_run_continues_exactly(tmp_path):
    on = ["optim.step_in_backward=true", "train.checkpointing_steps=1"]
    straight = train(cfg_for(tmp_path / "a", *on, "train.steps=2"))
    train(cfg_for(tmp_path / "b", *on, "train.steps=1"))
    resumed = train(cfg_for(tmp_path / "b", *on, "train.steps=2", 'train.resume_from_checkpoint="latest"'))
    a, b = load_file(straight.text_encoder / "model.safetensors"), load_file(resumed.text_encoder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_non_finite_loss_skips_the_whole_step(tmp_path):
    trainer = Trainer(cfg_for(tmp_path, f'rewards=[{{name="{NAN_REWARD}"}}]', "optim.step_in_backward=true"))
    before = copy.deepcopy(trainer.text_encoder.state_dict())
    assert trainer.train_step()["skipped"] == 1
    for key, value in trainer.text_encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("override, key", [
    ("optim.max_grad_norm=1.0", "optim.max_grad_norm"),
    ("train.gradient_accumulation_steps=2", "train.gradient_accumulation_steps"),
    ("train.mixed_precision=fp16", "train.mixed_precision"),
    ("distributed.backend=deepspeed", "distributed.backend"),
])
def test_what_needs_every_gradient_first_is_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'.*step_in_backward"):
        cfg_for(tmp_path, "optim.step_in_backward=true", override)


def test_the_budget_counts_one_gradient():
    params = [torch.zeros(10, 3), torch.zeros(7)]  # 37 fp32 elements, the largest tensor 30
    assert training_state_bytes(params, "adamw") == 37 * (4 + 8)
    assert training_state_bytes(params, "adamw", step_in_backward=True) == 37 * 8 + 30 * 4
