"""The official TextCraftor training step as published, built from this engine's own pieces, so that the
baseline and ours share models, sampler, rewards and prompts and differ only where the official code differs.

What snap-research/textcraftor (train_textcraftor.py, pipelines/pipeline_stable_diffusion.py, aesthetic/app.py)
does, and how the baseline reproduces it:
- UNet: loaded with `from_pretrained` and never frozen (`--lr_unet 0` only keeps it out of the optimizer), so
  its weight gradients are computed every step and, as `optimizer.zero_grad()` clears only the optimizer's
  parameters, kept in `.grad` for the whole run -> `unet.requires_grad_(True)`; our `train_step` also zeroes
  only the encoder's gradients, so they accumulate here too.
- CLIP score (ViT-g), PickScore and HPSv2 towers: never frozen -> tower weights require grad. Each re-encodes
  the prompt every step: CLIP score and PickScore under `torch.no_grad()`, HPSv2 inside `hps_model(image,
  text)` in grad mode, so its text-side weight gradients are computed too -> `OfficialTower`.
- VAE and the aesthetic reward (CLIP ViT-L/14 + MLP) ARE frozen there (`vae.requires_grad_(False)`;
  `load_models` freezes both) -> left as ours; but the whole VAE stays loaded there, encoder half included
  (ours frees it: `drop_vae_encoder`) -> kept. Each reward loads its own CLIP model, text side included, even
  where it is SD1.5's text encoder (ours shares it: `share_text_transformers`) -> not shared.
- Host memory: nothing returns freed pages to the OS, so glibc keeps each phase's freed activations resident
  into the next one's peak (ours trims the heap at the step's boundaries on CPU: `host_memory`) -> no trims.
- `loop_unet_cus`: non-reentrant checkpoint of each UNet call of the last K steps; `decode_latents`: plain
  VAE decode; `autocast(dtype=float32)`; stock diffusers modules with SDPA; cond and uncond embeddings from
  the fine-tuned encoder -> OFFICIAL_OVERRIDES.
Not reproduced, as they cost little or nothing: the official encoders embed B copies of "" (ours: one row,
expanded); PickScore's B x B matrix mean (a reward option, `official_matrix_mean`); weight decay on every
parameter; DDP.
"""
from __future__ import annotations

from typing import Sequence
from unittest import mock

from torch import Tensor, nn

from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import Trainer
from textcraftor_fast.rewards.clip_score import ClipSimilarityReward
from textcraftor_fast.rewards.clip_tower import ClipTower
from textcraftor_fast.rewards.hpsv2 import HPSv2Reward

OFFICIAL_OVERRIDES = (
    "sampler.checkpoint=step",  # torch.utils.checkpoint(custom(unet), ..., use_reentrant=False), last K calls
    "sampler.checkpoint_vae=false",  # pipeline.decode_latents: plain vae.decode
    "sampler.checkpoint_towers=false",  # the towers and the text encoder run plain
    "sampler.train_uncond=true",  # uncond embedding from the fine-tuned encoder
    "train.mixed_precision=no",  # torch.autocast(dtype=torch.float32)
    "ops.backend=torch",  # stock diffusers modules (AttnProcessor2_0 = SDPA)
)


class OfficialTower(ClipTower):
    """A reward's CLIP tower as the official code runs it: weights require grad, and the prompt is re-encoded
    every step, under no_grad (CLIP score, PickScore) or in grad mode (HPSv2: text-side weight gradients too)."""

    def __init__(self, tower: ClipTower, keep_text_graph: bool) -> None:
        super().__init__(tower.model, tower.tokenizer, cache_size=0, mean=tower.mean, std=tower.std)
        self.keep_text_graph = keep_text_graph
        self.model.requires_grad_(True)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        if self.keep_text_graph:
            return self.encode_text(prompts)
        return super().text_features(prompts)  # cache_size=0: the text tower runs every step, under no_grad


def official_tower(reward: ClipSimilarityReward) -> OfficialTower:
    """Swap `reward`'s tower for the official one (HPSv2 keeps its text graph); returns the new tower."""
    reward.tower = OfficialTower(reward.tower, keep_text_graph=isinstance(reward, HPSv2Reward))
    return reward.tower


def apply_official_recipe(trainer: Trainer) -> dict[str, int]:
    """Give a built Trainer the official step's waste; returns the parameters now requiring grad, per module."""
    trainer.unet.requires_grad_(True)
    counts = {"unet": _numel(trainer.unet)}
    for name, reward in zip(trainer.rewards.names, trainer.rewards.rewards):
        if isinstance(reward, ClipSimilarityReward):
            counts[name] = _numel(official_tower(reward).model)
    return counts


def official_trainer(config: str, overrides: Sequence[str] = (), after: Sequence[str] = ()) -> Trainer:
    """A Trainer running the official step on the models, rewards and prompts `config` + `overrides` name; `after`
    overrides the official choices (a benchmark holding both arms to one precision: 'train.mixed_precision=bf16',
    where an fp32 SDXL UNet and its gradient would not fit)."""
    # Our engine's savings stay out (module docstring): with our heap trims this SD1.5 step peaked 0.35 GiB lower
    # (VmHWM over two steps, 2 threads: 15.83 GiB against 16.18 without).
    with mock.patch("textcraftor_fast.training.trainer.drop_vae_encoder", lambda vae: 0), \
            mock.patch("textcraftor_fast.training.trainer.share_text_transformers", lambda encoder, rewards: {}), \
            mock.patch("textcraftor_fast.training.trainer.trims_pay_off", lambda device, *models: False):
        trainer = Trainer(load_config(config, [*overrides, *OFFICIAL_OVERRIDES, *after]))
    apply_official_recipe(trainer)
    return trainer


def weight_grads(trainer: Trainer) -> dict[str, tuple[int, int, int]]:
    """Per frozen module: (parameters with a .grad, parameters with a non-zero .grad, bytes of .grad held).
    What the official step computes and keeps, which bytes saved for backward cannot see."""
    modules = {"unet": trainer.unet, "vae": trainer.vae,
               **{name: reward for name, reward in zip(trainer.rewards.names, trainer.rewards.rewards)}}
    return {name: _grad_stats(module) for name, module in modules.items()}


def _grad_stats(module: nn.Module) -> tuple[int, int, int]:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return len(grads), sum(bool(g.any()) for g in grads), sum(g.numel() * g.element_size() for g in grads)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
