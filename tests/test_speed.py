"""The speed options of [ops] (textcraftor_fast/ops/speed.py): TF32, channels-last and torch.compile change how the
models run, not the encoder gradient a step computes. The reference is the same step with every option off
(stock eager PyTorch, contiguous weights); compile runs real inductor on CPU, through the sampler's checkpointed
UNet calls, on tiny random SD models and a small random CLIP-score tower."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from random_towers import write_random_clip  # noqa: E402
from textcraftor_fast import load_config  # noqa: E402
from textcraftor_fast.training.trainer import Trainer  # noqa: E402
from textcraftor_fast.ops.speed import set_tf32  # noqa: E402

PROMPTS = ["a red circle above a blue square"]


def _trainer(tmp_path: Path, *extra: str) -> Trainer:
    tower = tmp_path / "clip"
    if not tower.exists():
        write_random_clip(tower)
    return Trainer(load_config("configs/tiny_random.toml", [
        "sampler.num_steps=3", "sampler.grad_steps=2", "sampler.checkpoint=step", "sampler.checkpoint_vae=true",
        "model.resolution=16", "train.batch_size=1", "train.progress_bar=false", "data.max_prompts=2",
        "ops.backend=torch", f'rewards=[{{name="clip_score", path="{tower}"}}]', "output.overwrite=true",
        f'output.dir="{tmp_path / "run"}"', *extra]))


def _encoder_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.generator.manual_seed(1234)
    loss, _ = trainer.forward(PROMPTS, 2)
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.text_encoder.named_parameters()}


def _assert_same_gradient(ours: dict, ref: dict, tolerance: float) -> None:
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 0 and ours.keys() == ref.keys()
    for name in ref:
        err = (ours[name] - ref[name]).abs().max().item()
        assert err <= tolerance * scale, f"{name}: max diff {err:.3e} (grad scale {scale:.3e})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _encoder_grads(_trainer(tmp_path_factory.mktemp("ref")))


def test_channels_last_weights_give_the_contiguous_gradient(tmp_path, reference):
    trainer = _trainer(tmp_path, "ops.channels_last=true")
    for module in (trainer.unet, trainer.vae):
        convs = [p for p in module.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in convs if p.shape[2:] != (1, 1))
    assert trainer.speed["channels_last"] > 0
    _assert_same_gradient(_encoder_grads(trainer), reference, 1e-5)


@pytest.mark.slow
def test_compile_gives_the_eager_gradient_through_checkpointed_calls(tmp_path, reference):
    # aot_eager_decomp_partition: dynamo's capture, inductor's decompositions and its forward/backward partition,
    # which is what meets the sampler's non-reentrant checkpointing, without inductor's code generation. On CPU,
    # torch 2.13's inductor code gives this tiny UNet an encoder gradient 3.8% off eager's while its forward and a
    # lone UNet call's gradients agree to 1e-6 (docs/performance.md); the engine warns on CPU + inductor.
    torch._dynamo.reset()
    trainer = _trainer(tmp_path, "train.compile=true",  # train.compile: the alias of ops.compile
                       "ops.compile_backend=aot_eager_decomp_partition")
    assert trainer.cfg.ops.compile
    assert trainer.speed["compiled"] == ["unet", "vae.decoder", "reward tower 0"]
    for module in (trainer.unet, trainer.vae.decoder, trainer.rewards.rewards[0].tower.model.vision_model):
        assert module._compiled_call_impl is not None  # what nn.Module.compile() sets; __call__ then runs it
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    grads = _encoder_grads(trainer)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # dynamo really captured frames in the step
    # Decompositions reorder float sums: the same gradient to float rounding.
    _assert_same_gradient(grads, reference, 1e-4)


def test_a_compile_backend_torch_does_not_know_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="ops.compile_backend.*inductor.*got 'inductr'"):
        load_config("configs/tiny_random.toml", ["ops.compile=true", "ops.compile_backend=inductr"])


def test_tf32_sets_torch_flags_on_cuda_only():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        set_tf32(True, torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        set_tf32(True, torch.device("cuda"))  # flags only: no CUDA device needs to exist
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        set_tf32(False, torch.device("cuda"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_train_allow_tf32_is_an_alias_of_ops_tf32():
    assert load_config("configs/tiny_random.toml", ["train.allow_tf32=false"]).ops.tf32 is False
