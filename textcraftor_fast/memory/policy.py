"""The memory-budget checkpoint policy (sampler.checkpoint = 'auto'): recompute only what the budget needs.

Checkpointing trades memory for a recomputed forward. 'auto' measures, once at build, what each piece of a
training step keeps for backward (`memory.saved_tensor_bytes`, parameters excluded, at the training batch
size) and checkpoints as few of the K graph-carrying UNet calls as fit `train.memory_budget_gb`; only when
every call is checkpointed and the step still does not fit does the VAE decoder go per stage
(sampler.checkpoint_vae = 'auto'), and only then the CLIP transformers one layer at a time
(sampler.checkpoint_towers = 'auto': E and R below become their checkpointed sizes, plus one recomputed layer in
the rewards' backward). UNet calls go first because one costs a UNet forward to recompute while the decoder at
512 px costs about three (paper/NOTES.md's FLOP model).

Peak memory of a step on top of the loaded weights, as autograd frees it (backward runs in reverse order,
and the checkpointed calls are the earliest ones, so their recompute comes after every later graph is gone):
    start of backward:  fixed + E + p*U + c*Uc + [c > 0]*M + V_kept + max(R, V_recompute)
    checkpointed calls: fixed + E + c*Uc + M + U
with fixed = encoder gradients + optimizer state, E = the text encoder's graph, U = one plain UNet call's
saved bytes, Uc = a checkpointed call's latent input, M = the embeddings every checkpointed call keeps
(shared), p + c = K, V_kept / V_recompute = the decode's kept bytes and its largest recompute (per its mode),
R = the rewards' graph. Activation gradients in flight are left to the margin (CUDA default budget) or to the
user's budget. tests/test_memory_policy.py checks the kept bytes against a real step's.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from ..config import SamplerConfig
from .layers import checkpoint_each_layer, transformer_layers
from .saved_bytes import saved_tensor_bytes
from ..sampler import DDIMSchedule, guided_ddim_step, vae_decoder_stages

logger = logging.getLogger(__name__)

CUDA_MARGIN = 0.10
"""Share of the device's total memory kept free by the default CUDA budget (allocator fragmentation,
activation gradients in flight, the CUDA context's later growth)."""
_STATE_BYTES_PER_PARAM = {"adamw": 8.0, "adamw8bit": 2.04, "paged_adamw8bit": 2.04}  # two fp32 moments; bitsandbytes' 8-bit pair
_GIB = 2 ** 30

VaeMode = bool | str  # False (plain), True (one piece) or "blocks"


@dataclass(frozen=True)
class StepProfile:
    """Bytes one training step keeps for backward, piece by piece, measured at the training batch size."""

    encoder: int  # the trainable text encoder's graph (batch prompts + the unconditional one)
    unet_call: int  # one graph-carrying CFG UNet call + DDIM update, plain
    unet_call_checkpointed: int  # the same call checkpointed, which keeps only its inputs: here its latent
    # (with sampler.checkpoint_unet_blocks, its blocks' inputs)
    embeddings: int  # cond + uncond embeddings, which every checkpointed call keeps, shared
    vae_stages: tuple[int, ...]  # each decoder stage, plain (vae_decoder_stages order)
    vae_stage_inputs: int  # the stages' inputs: what per-stage checkpointing keeps
    vae_input: int  # the latents: what a one-piece checkpoint keeps
    rewards: int  # the image post-processing and the reward towers' graphs
    fixed: int  # encoder gradients + optimizer state
    # The same two with the CLIP transformers checkpointed per layer (memory/layers.py), and how many layers
    # that wraps; equal to the plain ones (and 0 layers) when sampler.checkpoint_towers is not 'auto'.
    encoder_checkpointed: int = 0
    rewards_checkpointed: int = 0
    tower_layers: int = 0

    def vae_kept(self, mode: VaeMode) -> int:
        if mode == "blocks":
            return self.vae_stage_inputs
        return self.vae_input if mode else sum(self.vae_stages)

    def vae_recompute(self, mode: VaeMode) -> int:
        if mode == "blocks":
            return max(self.vae_stages)
        return sum(self.vae_stages) if mode else 0

    def kept(self, calls: int, plain_calls: int, vae: VaeMode, towers: bool = False) -> int:
        """Bytes saved for backward at the end of the forward, `plain_calls` of `calls` UNet calls plain, the CLIP
        transformers checkpointed per layer when `towers`."""
        ckpt = calls - plain_calls
        shared = self.embeddings if ckpt else 0
        encoder, rewards = (self.encoder_checkpointed, self.rewards_checkpointed) if towers else (self.encoder,
                                                                                                  self.rewards)
        return (encoder + plain_calls * self.unet_call + ckpt * self.unet_call_checkpointed + shared
                + self.vae_kept(vae) + rewards)

    def tower_layer_recompute(self) -> int:
        """One recomputed layer's graph, what a checkpointed tower's backward adds (the layers' mean)."""
        return (self.rewards - self.rewards_checkpointed) // max(1, self.tower_layers)

    def peak(self, calls: int, plain_calls: int, vae: VaeMode, towers: bool = False) -> int:
        """Estimated peak bytes of the step (the module docstring's two phases)."""
        ckpt = calls - plain_calls
        kept = self.kept(calls, plain_calls, vae, towers)
        rewards = self.rewards_checkpointed if towers else self.rewards
        # The rewards' backward frees their graph before the decoder recomputes.
        start = kept + max(self.tower_layer_recompute() if towers else 0, self.vae_recompute(vae) - rewards)
        encoder = self.encoder_checkpointed if towers else self.encoder
        recompute = encoder + self.embeddings + ckpt * self.unet_call_checkpointed + self.unet_call
        return self.fixed + max(start, recompute if ckpt else 0)


@dataclass(frozen=True)
class MemoryPlan:
    """What the sampler and decode checkpoint. plain_unet_calls None: sampler.checkpoint decides per call."""

    plain_unet_calls: int | None
    vae: VaeMode
    towers: bool | None = None  # CLIP transformers per layer; None: sampler.checkpoint_towers as configured
    estimate_bytes: int | None = None
    budget_bytes: int | None = None
    profile: StepProfile | None = None  # what the estimate was made from ('auto' only)

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.estimate_bytes is None or self.estimate_bytes <= self.budget_bytes


@dataclass(frozen=True)
class StepProbe:
    """The models and shapes of a training step, for measuring it once at build."""

    text_encoder: nn.Module
    prompt_ids: Tensor  # (B + 1, L) the batch's ids and the unconditional one's
    unet: nn.Module
    vae: nn.Module
    rewards: nn.Module
    schedule: DDIMSchedule
    sampler: SamplerConfig
    latent_shape: tuple[int, int, int, int]  # (B, C, h, w)
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    fused_step: bool = False
    towers: tuple[nn.Module, ...] = ()  # the transformers checkpoint_towers='auto' may checkpoint per layer


def training_state_bytes(params: Sequence[Tensor], optimizer: str, step_in_backward: bool = False) -> int:
    """Gradients + optimizer state of the trainable parameters (allocated at the first step, after build). With
    optim.step_in_backward one gradient exists at a time: the largest."""
    per_param = _STATE_BYTES_PER_PARAM.get(optimizer, 8.0)
    state = sum(p.numel() * per_param for p in params)
    grads = [p.numel() * p.element_size() for p in params]
    return int(state + (max(grads, default=0) if step_in_backward else sum(grads)))


def resolve_budget(budget_gb: float | None, device: torch.device) -> int | None:
    """Bytes a step may use: the configured GiB; unset, the CUDA device's free memory minus the margin; None
    (unlimited) on CPU, where swapping is slow but not fatal and RSS is shared with other programs anyway."""
    if budget_gb is not None:
        return int(budget_gb * _GIB)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, free - int(CUDA_MARGIN * total))
    return None


def _model_tensors(*modules: nn.Module) -> list[Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def measure_step(probe: StepProbe, fixed_bytes: int) -> StepProfile:
    """Run each piece of one step once, forward only, and count what it saves for backward."""
    s, b = probe.sampler, probe.latent_shape[0]
    ignore = _model_tensors(probe.text_encoder, probe.unet, probe.vae, probe.rewards)
    step = probe.schedule.steps[-1]
    decode_batch = b * max(1, s.draft_lv_samples)
    device = probe.prompt_ids.device
    with probe.autocast():
        encode = lambda: probe.text_encoder(probe.prompt_ids)[0]  # noqa: E731
        encoder, emb = saved_tensor_bytes(encode, ignore)
        encoder_ckpt = _checkpointed_bytes(probe.towers, encode, ignore) if probe.towers else encoder
        cond, uncond = emb[:b].detach().requires_grad_(), emb[b:].detach().requires_grad_()
        noise = torch.Generator(device).manual_seed(0)  # not the global RNG: a probe must not shift the run's draws
        x = torch.randn(probe.latent_shape, generator=noise, device=device).requires_grad_()

        def call(checkpointed: bool | str) -> Tensor:
            return guided_ddim_step(probe.unet, step, x, cond, uncond, s.guidance_scale,
                                    probe.schedule.prediction_type, None, checkpointed, probe.fused_step)

        unet_call, latents = saved_tensor_bytes(lambda: call(False), ignore)
        # With checkpoint_unet_blocks a checkpointed call keeps its blocks' inputs; its recompute is still counted
        # as a whole call's graph (U) where one block's is alive: an over-estimate (SD1.5's largest block: U / 3).
        unet_ckpt, _ = saved_tensor_bytes(lambda: call("blocks" if s.checkpoint_unet_blocks else True), ignore)
        embeddings = sum(e.numel() * e.element_size() for e in (cond, uncond))
        z = latents.detach().to(probe.vae.dtype).repeat(decode_batch // b, 1, 1, 1)
        stages, stage_inputs, out = [], 0, z
        for stage in vae_decoder_stages(probe.vae):
            out = out.detach().requires_grad_()  # frees the previous stage's graph: one stage alive at a time
            stage_inputs += out.numel() * out.element_size()
            nbytes, out = saved_tensor_bytes(lambda: stage(out), ignore)
            stages.append(nbytes)
        images = out.detach().requires_grad_()
        prompts = [""] * decode_batch
        score = lambda: probe.rewards((images.float() / 2 + 0.5).clamp(0, 1), prompts)  # noqa: E731
        rewards, _ = saved_tensor_bytes(score, ignore)
        rewards_ckpt = _checkpointed_bytes(probe.towers, score, ignore) if probe.towers else rewards
    tower_layers = sum(len(transformer_layers(m)) for m in probe.towers)
    return StepProfile(encoder, unet_call, unet_ckpt - embeddings, embeddings, tuple(stages), stage_inputs,
                       z.numel() * z.element_size(), rewards, fixed_bytes, encoder_ckpt, rewards_ckpt, tower_layers)


def _checkpointed_bytes(towers: Sequence[nn.Module], fn: Callable[[], object], ignore: list[Tensor]) -> int:
    """saved_tensor_bytes of fn() with the layers of `towers` checkpointed, left plain again afterwards."""
    checkpoint_each_layer(*towers)
    try:
        return saved_tensor_bytes(fn, ignore)[0]
    finally:
        checkpoint_each_layer(*towers, enabled=False)


def choose_plan(profile: StepProfile, calls: int, budget: int | None, vae: VaeMode,
                towers: bool | str = False) -> MemoryPlan:
    """The plan with the fewest UNet calls checkpointed that fits, then the decoder per stage (vae 'auto'), then
    the CLIP transformers per layer (towers 'auto'); with no budget, no recomputation; when nothing fits, the
    leanest plan (its estimate says so)."""
    vae_modes: list[VaeMode] = [False, "blocks"] if vae == "auto" else [vae]
    tower_modes = [False, True] if towers == "auto" else [bool(towers)]
    if budget is None:
        return MemoryPlan(calls, vae_modes[0], tower_modes[0],
                          profile.peak(calls, calls, vae_modes[0], tower_modes[0]), None, profile)
    for on in tower_modes:
        for mode in vae_modes:
            for plain in range(calls, -1, -1):
                estimate = profile.peak(calls, plain, mode, on)
                if estimate <= budget:
                    return MemoryPlan(plain, mode, on, estimate, budget, profile)
    leanest = (0, vae_modes[-1], tower_modes[-1])
    return MemoryPlan(*leanest, profile.peak(calls, *leanest), budget, profile)


def _gib(n: int) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _describe(plan: MemoryPlan, calls: int) -> str:
    vae = {False: "plain", True: "checkpointed whole", "blocks": "checkpointed per stage"}[plan.vae]
    profile = plan.profile
    assert plan.plain_unet_calls is not None and plan.estimate_bytes is not None and profile is not None
    towers = "" if not profile.tower_layers else (
        ", CLIP transformers " + ("checkpointed per layer" if plan.towers else "plain"))
    budget = _gib(plan.budget_bytes) if plan.budget_bytes is not None else "none (CPU, train.memory_budget_gb unset)"
    return (f"Memory policy (checkpoint=auto): {calls - plan.plain_unet_calls} of {calls} UNet calls checkpointed, "
            f"VAE decode {vae}{towers}; estimated peak {_gib(plan.estimate_bytes)}, budget {budget} (per UNet call "
            f"{_gib(profile.unet_call)} plain / {_gib(profile.unet_call_checkpointed)} checkpointed, VAE "
            f"{_gib(sum(profile.vae_stages))}, rewards {_gib(profile.rewards)}, encoder {_gib(profile.encoder)}, "
            f"gradients + optimizer state {_gib(profile.fixed)})")


def apply_memory_policy(cfg: SamplerConfig, budget_gb: float | None, device: torch.device, probe: StepProbe,
                        fixed_bytes: int) -> MemoryPlan:
    """The step's checkpoint plan: from the config as written, or for checkpoint='auto' measured and fitted to
    the budget (one INFO line says the choice, the estimate and the budget; a WARNING when nothing fits)."""
    if cfg.checkpoint != "auto":
        return MemoryPlan(None, cfg.checkpoint_vae, bool(cfg.checkpoint_towers))
    budget = resolve_budget(budget_gb, device)  # before the probe, whose blocks the CUDA allocator keeps cached
    profile = measure_step(probe, fixed_bytes)
    calls = cfg.draft_lv_samples if cfg.draft_lv_samples > 0 else cfg.grad_steps
    plan = choose_plan(profile, calls, budget, cfg.checkpoint_vae, cfg.checkpoint_towers)
    logger.info(_describe(plan, calls))
    if not plan.fits:
        hints = "" if cfg.checkpoint_vae in ("auto", "blocks") else ", set sampler.checkpoint_vae='auto'"
        hints += "" if cfg.checkpoint_towers in ("auto", True) else ", sampler.checkpoint_towers='auto'"
        logger.warning("Memory policy: even with every UNet call checkpointed the step is estimated at %s, over "
                       "the %s budget: lower train.batch_size, use train.mixed_precision=bf16%s or raise "
                       "train.memory_budget_gb", _gib(plan.estimate_bytes or 0), _gib(plan.budget_bytes or 0),
                       hints)
    return plan
