"""The sampler against references that share nothing with it: diffusers' DDIMScheduler.step and a
hand-written step-by-step loop with separate (unbatched) cond/uncond calls and the CFG formula spelled out.

A deterministic toy UNet stands in for the real one: its output depends on x, t and the conditioning, so a
wrong embedding at any step, a wrong guidance formula or a wrong timestep changes the result.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from textcraftor_fast.ops import native
from textcraftor_fast.config import SamplerConfig
from textcraftor_fast.sampler import Embeddings, ddim_update, make_schedule, sample_latents

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")


def _diffusers(prediction_type: str, num_steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type},
                                      timestep_spacing="trailing")
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_update_is_diffusers_step_bit_for_bit(prediction_type, eta):
    n = 6
    ours = make_schedule({**SD15_SCHEDULER, "prediction_type": prediction_type}, n, eta)
    ref = _diffusers(prediction_type, n)
    assert ours.timesteps == ref.timesteps.tolist() and ours.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, step in enumerate(ours.steps):
        model_output = torch.randn(x.shape, generator=g)
        noise = torch.randn(x.shape, generator=g)  # shared: the same variance noise on both sides
        got, _ = ddim_update(step, x, model_output, prediction_type, noise if eta > 0 else None)
        want = ref.step(model_output, ref.timesteps[i], x, eta=eta,
                        variance_noise=noise if eta > 0 else None).prev_sample
        assert torch.equal(got, want), f"step {i}: max diff {(got - want).abs().max().item():.3e}"
        x = want


class ToyUNet(nn.Module):
    """out = tanh(a * x + b * mean(emb) + c * t / 1000) per sample; differentiable in x and emb."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = 0.9, 1.7, 0.3

    def forward(self, x, t, encoder_hidden_states):
        e = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]  # (B, 1, 1, 1)
        return SimpleNamespace(sample=torch.tanh(self.a * x + self.b * e + self.c * float(t) / 1000))


def _hand_loop(unet, sched, x_T, frozen, trainable, scale, switch, k):
    """Reference: diffusers' step; cond and uncond as separate calls; out = u + s (c - u)."""
    n = len(sched.timesteps)
    x = x_T * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        emb = frozen if i < switch else trainable
        with torch.set_grad_enabled(i >= n - k):
            u = unet(x, t, encoder_hidden_states=emb.uncond.expand(x.shape[0], -1, -1)).sample
            c = unet(x, t, encoder_hidden_states=emb.cond).sample
            x = sched.step(u + scale * (c - u), t, x, eta=0.0).prev_sample
    return x


# fused: the native CFG-DDIM step (ops.backend = cpp), equal to the torch path to float rounding, not bit for bit.
FUSED = [False, pytest.param(True, marks=pytest.mark.skipif(not native.available(),
                                                            reason="native library not built (`make ext`)"))]


@pytest.mark.parametrize("fused", FUSED, ids=["torch", "native"])
@pytest.mark.parametrize("checkpoint", ["step", "none"])
@pytest.mark.parametrize("k,switch", [(2, 0), (2, 3), (2, None), (1, 5), (3, 1)])
def test_switch_step_and_truncation_match_a_hand_written_loop(k, switch, checkpoint, fused):
    n, scale = 6, 7.5
    g = torch.Generator().manual_seed(1)
    frozen = Embeddings(torch.randn(2, 5, 3, generator=g), torch.randn(1, 5, 3, generator=g))
    # Distinct trainable embeddings (in training they start equal to the frozen ones; that hides mistakes).
    trainable = Embeddings((frozen.cond + torch.randn(2, 5, 3, generator=g)).requires_grad_(True),
                           (frozen.uncond + torch.randn(1, 5, 3, generator=g)).requires_grad_(True))
    x_T = torch.randn(2, 4, 3, 3, generator=g)
    cfg = SamplerConfig(num_steps=n, grad_steps=k, guidance_scale=scale, switch_step=switch, checkpoint=checkpoint)
    ours = sample_latents(ToyUNet(), make_schedule(SD15_SCHEDULER, n), x_T, frozen, trainable, cfg, fused_step=fused)
    ref_switch = n - k if switch is None else switch
    want = _hand_loop(ToyUNet(), _diffusers("epsilon", n), x_T, frozen, trainable, scale, ref_switch, k)
    tol = 1e-5 if fused else 1e-6
    torch.testing.assert_close(ours, want, rtol=tol, atol=tol)
    # The gradient reaches the trainable embeddings through the last k steps only, as in the reference.
    w = torch.randn(ours.shape, generator=g)
    got = torch.autograd.grad((ours * w).sum(), [trainable.cond, trainable.uncond])
    exp = torch.autograd.grad((want * w).sum(), [trainable.cond, trainable.uncond])
    for a, b in zip(got, exp):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=tol / 10)


def test_no_trainable_embeddings_means_a_frozen_no_grad_chain():
    g = torch.Generator().manual_seed(2)
    frozen = Embeddings(torch.randn(1, 5, 3, generator=g), torch.randn(1, 5, 3, generator=g))
    x_T = torch.randn(1, 4, 3, 3, generator=g)
    cfg = SamplerConfig(num_steps=4, grad_steps=2)
    ours = sample_latents(ToyUNet(), make_schedule(SD15_SCHEDULER, 4), x_T, frozen, None, cfg)
    want = _hand_loop(ToyUNet(), _diffusers("epsilon", 4), x_T, frozen, None, 7.5, 4, 0)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
