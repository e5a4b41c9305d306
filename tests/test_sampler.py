"""The differentiable sampler against diffusers, and the checkpoint policies against the plain graph."""
import collections
import dataclasses

import pytest
import torch

from textcraftor_fast.config import SamplerConfig
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes
from textcraftor_fast.models import build_tiny_random
from textcraftor_fast.rewards.simple import ColorfulnessReward
from textcraftor_fast.sampler import (Embeddings, decode_latents, make_schedule, sample_latents, unet_blocks,
                                     vae_decoder_stages)

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")


@pytest.fixture(scope="module")
def tiny():
    comp = build_tiny_random(seed=0)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.eval().requires_grad_(False)
    return comp


def _embed(comp, prompts):
    ids = comp.tokenizer(prompts, padding="max_length", max_length=comp.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return comp.text_encoder(ids)[0]


def test_paper_timesteps():
    # The official code's 25 steps are 999, 959, ..., 39 (= diffusers' "trailing" spacing).
    assert make_schedule(SD15_SCHEDULER, 25).timesteps == list(range(999, 38, -40))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_no_grad_trajectory_equals_diffusers_ddim_loop(tiny, eta):
    from diffusers import DDIMScheduler

    cfg = SamplerConfig(num_steps=6, guidance_scale=7.5, eta=eta)
    schedule = make_schedule(tiny.scheduler.config, cfg.num_steps, eta)
    prompts = ["a red circle", "a blue square"]
    emb = Embeddings(_embed(tiny, prompts), _embed(tiny, [""]))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noises = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(6)]
    it = iter(noises)
    ours = sample_latents(tiny.unet, schedule, x_T, emb, None, cfg, noise_fn=lambda x: next(it))

    sched = DDIMScheduler.from_config(tiny.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(cfg.num_steps)
    x = x_T * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = tiny.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([emb.uncond.expand(2, -1, -1),
                                                                                 emb.cond])).sample
            u, c = out.chunk(2)
            x = sched.step(u + 7.5 * (c - u), t, x, eta=eta, variance_noise=noises[i] if eta > 0 else None).prev_sample
    assert sched.timesteps.tolist() == schedule.timesteps
    assert torch.equal(ours, x), (ours - x).abs().max()  # bit for bit, as the README claims


def _encoder_grad(tiny, cfg, k):
    enc = tiny.text_encoder
    enc.requires_grad_(True)
    enc.zero_grad(set_to_none=True)
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        frozen = Embeddings(_embed(tiny, prompts), _embed(tiny, [""]))
    trainable = Embeddings(_embed(tiny, prompts), _embed(tiny, [""]))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    lat = sample_latents(tiny.unet, make_schedule(tiny.scheduler.config, cfg.num_steps), x_T, frozen, trainable, cfg, k)
    img = decode_latents(tiny.vae, lat, cfg.checkpoint_vae)
    g_out = torch.randn(img.shape, generator=torch.Generator().manual_seed(4))  # random grad_output, not .sum()
    (img * g_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.requires_grad_(False)
    return grads


@pytest.mark.parametrize("policy,ckpt_vae,unet_blocks", [
    ("step", True, False), ("every_n", False, False), ("step", False, False), ("step", "blocks", False),
    ("step", "blocks", True), ("every_n", True, True)])
def test_checkpointed_and_plain_give_the_same_encoder_gradient(tiny, policy, ckpt_vae, unet_blocks):
    base = SamplerConfig(num_steps=6, grad_steps=4, checkpoint="none", checkpoint_vae=False)
    plain = _encoder_grad(tiny, base, 4)
    ckpt = _encoder_grad(tiny, dataclasses.replace(base, checkpoint=policy, checkpoint_vae=ckpt_vae,
                                                   checkpoint_unet_blocks=unet_blocks), 4)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    assert any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_unet_blocks_are_recomputed_one_at_a_time_never_the_whole_call(tiny):
    """Backward re-runs each block of each checkpointed call once; as one piece (the default) it re-runs the whole
    UNet call, and with checkpoint_unet_blocks never (so no recompute holds more than one block's graph)."""
    blocks = unet_blocks(tiny.unet)
    assert len(blocks) == len(tiny.unet.down_blocks) + 1 + len(tiny.unet.up_blocks) > 3
    recomputed: list[str] = []
    in_backward = lambda: torch._C._current_graph_task_id() != -1
    # A checkpoint recomputes through the block's own forward, not its __call__: its first resnet's hook sees it.
    named = [("unet", tiny.unet), *((f"block{i}", b.resnets[0]) for i, b in enumerate(blocks))]
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: recomputed.append(name) if in_backward()
                                           else None) for name, m in named]
    try:
        counts = {}
        for per_block in (False, True):
            recomputed.clear()
            cfg = SamplerConfig(num_steps=6, grad_steps=3, checkpoint="step", checkpoint_vae=False,
                                checkpoint_unet_blocks=per_block)
            _encoder_grad(tiny, cfg, 3)
            counts[per_block] = collections.Counter(recomputed)
    finally:
        for h in handles:
            h.remove()
    each_block = {f"block{i}": 3 for i in range(len(blocks))}
    assert counts[False] == {"unet": 3, **each_block}
    assert counts[True] == each_block
    # the switch is off again after each call: a later plain call (checkpoint='auto') checkpoints nothing
    assert all(getattr(b, "_textcraftor_checkpoint") is False for b in blocks)


def test_unet_blocks_need_a_diffusers_unet():
    with pytest.raises(ValueError, match=r"checkpoint_unet_blocks needs .*Linear lacks down_blocks.*"
                                         r"checkpoint_unet_blocks=false"):
        unet_blocks(torch.nn.Linear(2, 2))


def _step_bytes(tiny, policy, k):
    cfg = SamplerConfig(num_steps=8, grad_steps=k, checkpoint=policy, checkpoint_vae=True)
    schedule = make_schedule(tiny.scheduler.config, 8)
    reward = ColorfulnessReward()
    enc = tiny.text_encoder
    enc.requires_grad_(True)
    prompts = ["a red circle", "a blue square"]

    def run():
        with torch.no_grad():
            frozen = Embeddings(_embed(tiny, prompts), _embed(tiny, [""]))
        trainable = Embeddings(_embed(tiny, prompts), _embed(tiny, [""]))
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        lat = sample_latents(tiny.unet, schedule, x_T, frozen, trainable, cfg, k)
        return reward(decode_latents(tiny.vae, lat, True), prompts)

    try:
        return saved_tensor_bytes(run)[0]
    finally:
        enc.requires_grad_(False)


def test_saved_bytes_are_flat_in_k_with_checkpointing_and_linear_without(tiny):
    ck = {k: _step_bytes(tiny, "step", k) for k in (1, 8)}
    assert ck[8] < 1.05 * ck[1], ck
    plain = {k: _step_bytes(tiny, "none", k) for k in (1, 2, 8)}
    per_step = plain[2] - plain[1]
    assert per_step > 0.5 * (ck[1])  # one UNet call's activations are a big share of a step
    # linear: 8 steps keep about 7 more steps' worth than 1 step does
    assert abs((plain[8] - plain[1]) - 7 * per_step) < 0.1 * 7 * per_step, plain


def test_decoder_stages_are_the_decode_bit_for_bit(tiny):
    vae = tiny.vae
    per_layer = sum(len(b.resnets) + len(b.upsamplers or ()) for b in vae.decoder.up_blocks)
    assert len(vae_decoder_stages(vae)) == 2 + per_layer > 2 + len(vae.decoder.up_blocks)  # up blocks split
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = z
        for stage in vae_decoder_stages(vae):
            x = stage(x)
        assert torch.equal(x, vae.decode(z).sample)


def test_per_stage_vae_checkpointing_same_gradient_fewer_bytes(tiny):
    vae = tiny.vae
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    grad_out = torch.randn(2, 3, 32, 32, generator=g)  # random grad_output, not .sum()
    runs = {}
    for mode in (False, True, "blocks"):
        lat = latents.clone().requires_grad_()
        nbytes, image = saved_tensor_bytes(lambda: decode_latents(vae, lat, mode))
        image.backward(grad_out)
        runs[mode] = (nbytes, image.detach(), lat.grad)
    plain_bytes, plain_image, plain_grad = runs[False]
    for mode in (True, "blocks"):
        nbytes, image, grad = runs[mode]
        assert torch.equal(image, plain_image)
        torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)
    # Exact: per stage, only its input is kept; then the clamp's input (the image). Plain keeps 6.6x that here
    # (this tiny VAE is mostly resnets, each now a stage; SD1.5's decoder at 128 px: 78 vs 356 MiB).
    z = latents / vae.config.scaling_factor
    inputs, x = 0, z
    with torch.no_grad():
        for stage in vae_decoder_stages(vae):
            inputs += x.numel() * x.element_size()
            x = stage(x)
    image_bytes = plain_image.numel() * plain_image.element_size()
    assert runs["blocks"][0] == inputs + image_bytes
    assert runs[True][0] == z.numel() * z.element_size() + image_bytes
    assert runs["blocks"][0] * 5 < plain_bytes


def test_stages_need_a_diffusers_decoder():
    with pytest.raises(ValueError, match=r"checkpoint_vae='blocks' needs .*Linear lacks .*checkpoint_vae=true"):
        vae_decoder_stages(torch.nn.Linear(2, 2))
