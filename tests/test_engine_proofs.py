"""Engine features each backed by a test that fails when the feature is removed (tiny random SD models)."""
import copy

import pytest
import torch

from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import Trainer
from textcraftor_fast.inference import mix_embeddings
from textcraftor_fast.models.text import encode
from textcraftor_fast.sampler import Embeddings

FAST = ["sampler.num_steps=3", "sampler.grad_steps=2", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=8", "output.overwrite=true"]
PROMPTS = ["a red circle above a blue square"]


def _trainer(tmp_path, *extra) -> Trainer:
    return Trainer(load_config("configs/tiny_random.toml", FAST + [f'output.dir="{tmp_path}"', *extra]))


def _grads(trainer: Trainer, prompts=PROMPTS, k: int = 2) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.generator.manual_seed(1234)  # the same x_T for every call
    loss, _ = trainer.forward(prompts, k)
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.text_encoder.named_parameters() if p.grad is not None}


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-8) for n in a)


def test_train_uncond_false_sends_no_gradient_through_the_unconditional_branch(tmp_path):
    frozen_uncond = _trainer(tmp_path / "f", "sampler.train_uncond=false")
    trained_uncond = _trainer(tmp_path / "t", "sampler.train_uncond=true")
    g_frozen, g_trained = _grads(frozen_uncond), _grads(trained_uncond)
    # Reference: the same forward with the trainable encoder's own uncond embedding, detached by hand
    # (at step 0 the trainable and original encoders are equal, so only the gradient path differs).
    ref = _trainer(tmp_path / "r", "sampler.train_uncond=true")
    embeddings = ref._trained_embeddings

    def detached_uncond(ids):
        both = embeddings(ids)  # cond and uncond from one encoder call
        return Embeddings(both.cond, both.uncond.detach())

    ref._trained_embeddings = detached_uncond
    g_ref = _grads(ref)
    assert _close(g_frozen, g_ref)
    assert not _close(g_frozen, g_trained)  # the uncond branch does carry gradient when trained


def test_random_k_draws_every_value_in_1_to_k_and_nothing_else(tmp_path):
    trainer = _trainer(tmp_path, "sampler.random_grad_steps=true", "sampler.grad_steps=3", "sampler.num_steps=4")
    draws = [trainer._grad_steps() for _ in range(300)]
    assert set(draws) == {1, 2, 3}
    fixed = _trainer(tmp_path / "fixed", "sampler.grad_steps=3", "sampler.num_steps=4")
    assert {fixed._grad_steps() for _ in range(20)} == {3}


def test_draft_lv_scores_n_samples_per_prompt(tmp_path):
    trainer = _trainer(tmp_path, "sampler.draft_lv_samples=3")
    seen = []
    real = trainer.rewards

    class Spy:
        def __call__(self, images, prompts):
            seen.append((images.shape[0], list(prompts), images.detach().clone()))
            return real(images, prompts)

        def __getattr__(self, name):
            return getattr(real, name)

    trainer.rewards = Spy()
    assert trainer._grad_steps() == 0  # DRaFT-LV: the chain runs without a graph
    loss, _ = trainer.forward(["a cat", "a dog"], trainer._grad_steps())
    n, prompts, images = seen[0]
    assert n == 6 and prompts == ["a cat", "a dog"] * 3
    assert not torch.equal(images[0], images[2])  # sample j of one prompt uses fresh noise
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in trainer.text_encoder.parameters())


def test_gradient_accumulation_is_the_mean_of_micro_batch_gradients(tmp_path):
    accum = _trainer(tmp_path / "a", "train.gradient_accumulation_steps=2")
    single = _trainer(tmp_path / "s")
    accum.train_step()  # .grad keeps the accumulated gradient (no clipping: max_grad_norm unset)
    got = {n: p.grad.clone() for n, p in accum.text_encoder.named_parameters()}
    micro = []
    for _ in range(2):  # the same prompts and noise draws, one micro-batch at a time
        single.optimizer.zero_grad(set_to_none=True)
        loss, _ = single.forward(single.stream.next_batch(), 2)
        single.optimizer_step.backward(loss, 1.0)
        micro.append({n: p.grad.clone() for n, p in single.text_encoder.named_parameters()})
    assert any(not torch.equal(micro[0][n], micro[1][n]) for n in got)  # two different micro-batches
    for n in got:
        torch.testing.assert_close(got[n], (micro[0][n] + micro[1][n]) / 2, rtol=1e-5, atol=1e-8, msg=n)


def test_bf16_frozen_towers_with_fp32_master_weights(tmp_path):
    trainer = _trainer(tmp_path, "train.mixed_precision=bf16")
    for name, module in [("unet", trainer.unet), ("vae", trainer.vae), ("original", trainer.original_encoder)]:
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    assert {p.dtype for p in trainer.text_encoder.parameters()} == {torch.float32}
    before = copy.deepcopy(trainer.text_encoder.state_dict())
    trainer.train_step()
    assert {p.grad.dtype for p in trainer.params} == {torch.float32}
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert state and {t.dtype for t in state} == {torch.float32}
    changed = [n for n, v in trainer.text_encoder.state_dict().items() if not torch.equal(v, before[n])]
    assert changed  # fp32 masters take updates smaller than bf16's resolution would allow


@pytest.mark.parametrize("weights", [[1.0], [0.25], [0.5, 0.5], [0.7, 0.6]])
def test_style_mixing_with_a_non_zero_base(weights):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 3, generator=g) + 2.0
    tuned = [torch.randn(1, 4, 3, generator=g) for _ in weights]
    want = base.clone()
    for e, w in zip(tuned, weights):  # the paper's mixing, by hand, element by element
        want = want + w * (e - base)
    got = mix_embeddings(base, tuned, weights)
    torch.testing.assert_close(got, want)
    if weights == [1.0]:
        torch.testing.assert_close(got, tuned[0])
    if weights == [0.25]:
        torch.testing.assert_close(got, 0.75 * base + 0.25 * tuned[0])


def _two_call_embeddings(trainer: Trainer):
    """The engine before the one-call change: cond and uncond from two separate encoder calls."""
    def embeddings(ids):
        cond = encode(trainer.text_encoder, ids)
        return Embeddings(cond, encode(trainer.text_encoder, trainer.uncond_ids))
    return embeddings


def test_the_trainable_encoder_runs_once_per_micro_batch_with_unchanged_results(tmp_path):
    # One call per micro-batch is what DeepSpeed ZeRO-2 (and DDP) allow; the collapse monitor's call runs
    # under no_grad outside the step. Two optimizer steps of two micro-batches each.
    extra = ("train.gradient_accumulation_steps=2", "train.batch_size=2")
    fused, split = _trainer(tmp_path / "one", *extra), _trainer(tmp_path / "two", *extra)
    split._trained_embeddings = _two_call_embeddings(split)
    calls = []
    fused.text_encoder.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    for _ in range(2):
        fused.train_step(), split.train_step()
    assert calls == [True] * 4  # 2 steps x 2 micro-batches, each one call with a graph
    for (name, a), b in zip(fused.text_encoder.named_parameters(), split.text_encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # batching changes only float rounding
    assert any(not torch.equal(a, b) for a, b in zip(fused.text_encoder.parameters(),
                                                      fused.original_encoder.parameters()))  # it did train
