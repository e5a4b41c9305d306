"""The config tree's sections: one frozen dataclass per TOML table, each field with its default (the paper's, see
``shared/paper/NOTES.md``) and a docstring, and each section's `validate`, which names the bad key, what was
expected and what was given. Derived values are properties, never written back."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ..registry import MODEL_KINDS


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""


def _check(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "pretrained"
    """'pretrained': load from `path`; 'tiny_random': random tiny SD-architecture models built in memory
    from `seed` (tests, smoke runs); a plugin's kind (the embedded tiny world's 'tiny_world'); or 'module:function'
    of a loader `f(model_config, seed) -> SDComponents` (textcraftor_fast.registry.MODEL_KINDS)."""
    path: str = ""
    """A local diffusers folder, or one .safetensors/.ckpt file in the original single-file layout (kind='pretrained')."""
    family: Literal["auto", "sd15", "sd2", "sdxl"] = "auto"
    """The model family (docs/model_families.md): 'auto' reads it off a diffusers folder's model_index.json or a single
    file's keys; set, it must match what the path holds (an error names both). kind='tiny_random' builds tiny random
    models of this family ('auto': sd15)."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the UNet predicts. 'auto': a diffusers folder's scheduler config; for a single file, the family's
    published default (SD2.x: v_prediction, SD2.1 at 768 px; SD2.1-base at 512 px predicts epsilon and has the same
    keys: set it). Said in the log."""
    resolution: int = 512
    """Image side in pixels; the latent side is resolution // vae_scale_factor (8 for SD). SD2.1: 768; SDXL: 1024."""
    text_encoder_path: str = ""
    """Optional: a fine-tuned text encoder (diffusers folder or .safetensors) to start from instead of the model's own
    (train.stage='unet': the frozen encoder the UNet is tuned under, e.g. an encoder-stage run's text_encoder/)."""

    def validate(self, prefix: str) -> None:
        _check(self.kind in MODEL_KINDS or ":" in self.kind, f"{prefix}.kind",
               f"one of {', '.join(map(repr, MODEL_KINDS.names()))} or 'module:function'", self.kind)
        _check(self.resolution >= 8 and self.resolution % 8 == 0, f"{prefix}.resolution",
               "a positive multiple of 8", self.resolution)
        _check(self.kind != "pretrained" or bool(self.path), f"{prefix}.path",
               "a diffusers folder or a .safetensors/.ckpt file when model.kind='pretrained' "
               "(or set model.kind='tiny_random')", self.path)


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 25
    """DDIM steps (paper: 25)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (paper: 7.5); 1.0 disables the unconditional branch."""
    eta: float = 0.0
    """DDIM eta; 0 is deterministic DDIM (paper)."""
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    """'trailing' gives 999, 959, ..., 39 for 25 steps, the official code's timesteps."""
    grad_steps: int = 5
    """K: the last K denoising steps carry gradients (paper: 5)."""
    random_grad_steps: bool = False
    """AlignProp-style randomised truncation: each step draws K uniformly from 1..grad_steps."""
    switch_step: int | None = None
    """Training (and evaluation during it): step index from which the trainable encoder's embeddings are used;
    None means num_steps - K (the original encoder conditions the no-grad steps). `generate` and `evaluate` do not
    read it: they take --switch-step, default 0, the tuned encoder at every step as in an exported pipeline."""
    draft_lv_samples: int = 0
    """DRaFT-LV: >0 re-noises the final sample this many times and backpropagates through one step each."""
    checkpoint: Literal["none", "step", "every_n", "auto"] = "step"
    """Gradient checkpointing of the K graph-carrying UNet calls: none, every call ('step'), every n-th call
    ('every_n'), or 'auto': as few calls as fit `train.memory_budget_gb`, judged from one UNet call's bytes
    saved for backward, measured at build (textcraftor_fast/memory/policy.py; no recomputation when it all fits)."""
    checkpoint_every: int = 2
    """n for checkpoint='every_n'."""
    checkpoint_unet_blocks: bool = False
    """A checkpointed UNet call keeps only its down/mid/up blocks' inputs and backward recomputes one block at a
    time, instead of the whole call's graph at once: the same recompute, the largest block's memory instead of the
    whole call's (docs/performance.md). Needs a diffusers UNet2DConditionModel-style UNet."""
    checkpoint_vae: bool | Literal["blocks", "auto"] = True
    """Checkpoint the VAE decode (the official code does not; its full-resolution activations are the largest
    single cost): true = the whole decode as one piece (backward recomputes the whole decoder graph at once);
    'blocks' = each decoder stage (mid block, each resnet and upsampler of the up blocks, output head) separately,
    so backward holds one stage's graph at a time; false = plain; 'auto' (only with checkpoint='auto') = plain,
    or 'blocks' when the memory budget needs it after every UNet call is checkpointed."""
    checkpoint_towers: bool | Literal["auto"] = False
    """Checkpoint the CLIP transformers on the gradient path one layer at a time: each reward tower's image side
    and the trainable text encoder (textcraftor_fast/memory/layers.py). A ViT-L/14 reward keeps every layer's
    activations per image for backward without it; with it, its layer inputs, for one more forward of each tower. 'auto'
    (only with checkpoint='auto'): only when the memory budget needs it after the UNet calls and the decoder."""
    train_uncond: bool = True
    """The unconditional embedding comes from the trainable encoder (paper); False keeps it frozen."""

    @property
    def effective_switch_step(self) -> int:
        return self.num_steps - self.grad_steps if self.switch_step is None else self.switch_step

    def validate(self, prefix: str) -> None:
        _check(self.num_steps >= 1, f"{prefix}.num_steps", "an integer >= 1", self.num_steps)
        _check(1 <= self.grad_steps <= self.num_steps, f"{prefix}.grad_steps",
               f"an integer in [1, num_steps={self.num_steps}]", self.grad_steps)
        _check(self.guidance_scale >= 1.0, f"{prefix}.guidance_scale", "a float >= 1.0", self.guidance_scale)
        _check(0.0 <= self.eta <= 1.0, f"{prefix}.eta", "a float in [0, 1]", self.eta)
        _check(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "an integer >= 1", self.checkpoint_every)
        _check(self.draft_lv_samples >= 0, f"{prefix}.draft_lv_samples", "an integer >= 0", self.draft_lv_samples)
        _check(not self.checkpoint_unet_blocks or self.checkpoint != "none", f"{prefix}.checkpoint_unet_blocks",
               f"false when {prefix}.checkpoint='none' (no UNet call is checkpointed)", self.checkpoint_unet_blocks)
        _check(self.checkpoint_vae != "auto" or self.checkpoint == "auto", f"{prefix}.checkpoint_vae",
               f"true, false or 'blocks' when {prefix}.checkpoint={self.checkpoint!r} ('auto' needs "
               f"{prefix}.checkpoint='auto')", self.checkpoint_vae)
        _check(self.checkpoint_towers != "auto" or self.checkpoint == "auto", f"{prefix}.checkpoint_towers",
               f"true or false when {prefix}.checkpoint={self.checkpoint!r} ('auto' needs {prefix}.checkpoint='auto')",
               self.checkpoint_towers)
        if self.switch_step is not None:
            _check(0 <= self.switch_step <= self.num_steps - self.grad_steps, f"{prefix}.switch_step",
                   f"an integer in [0, num_steps - grad_steps = {self.num_steps - self.grad_steps}] or unset",
                   self.switch_step)


@dataclass(frozen=True)
class RewardConfig:
    name: str = "brightness"
    """Registered reward name (see textcraftor_fast.rewards.REWARDS) or 'module:callable' for a custom one."""
    weight: float = 1.0
    """gamma_i in L = -sum_i gamma_i R_i."""
    path: str = ""
    """Local checkpoint file or folder of the reward model (nothing is downloaded)."""
    clip_path: str = ""
    """Backbone CLIP for heads that need one (the aesthetic MLP scores a CLIP ViT-L/14 image embedding)."""
    resize: Literal["adaptive_avg", "bicubic"] = "adaptive_avg"
    """Resize to the tower's input size: official adaptive average pooling, or antialiased bicubic."""
    clamp_min: float | None = None
    """Clamp the reward from below before weighting (bounds a hackable reward)."""
    clamp_max: float | None = None
    """Clamp the reward from above before weighting."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the reward's constructor."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.name), f"{prefix}.name", "a reward name", self.name)
        if self.clamp_min is not None and self.clamp_max is not None:
            _check(self.clamp_min <= self.clamp_max, f"{prefix}.clamp_min", f"<= clamp_max={self.clamp_max}",
                   self.clamp_min)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    """Optimizer: torch AdamW (fused), or bitsandbytes' 8-bit AdamW (blockwise-quantised moments: about a quarter
    of AdamW's state for the CLIP-L encoder) or its paged variant (state in CUDA unified memory, evicted to host
    under memory pressure; on CPU the same as adamw8bit). Tensors under 4096 elements keep 32-bit state
    (bitsandbytes' default)."""
    lr: float = 1e-6
    """Learning rate (paper: 1e-6, no schedule)."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    """Clip the global grad norm to this value; None disables (the official code does not clip)."""
    warmup_steps: int = 0
    """Linear warm-up steps for the learning rate."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: 'constant' (paper) or 'cosine' decay to 0 at train.steps (late updates shrink, so where
    a run ends depends less on its last few batches)."""
    step_in_backward: bool = False
    """Step each tensor as soon as backward has its gradient and free that gradient at once: the encoder's
    gradients (0.46 GiB in fp32 for CLIP-L) never exist together. The same update (AdamW is elementwise per
    tensor); one process only, without max_grad_norm, gradient accumulation or fp16; the NaN guard then skips a
    tensor, not the step (docs/performance.md)."""

    def validate(self, prefix: str) -> None:
        _check(self.lr > 0, f"{prefix}.lr", "a float > 0", self.lr)
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "a float >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
               "two floats in [0, 1)", self.betas)
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, f"{prefix}.max_grad_norm",
               "a float > 0 or unset", self.max_grad_norm)
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "an integer >= 0", self.warmup_steps)


def _check_lora(section: Any, prefix: str, targets: str) -> None:
    """The LoRA keys [unet] and [encoder] share: rank, alpha, target_modules."""
    _check(section.rank >= 1, f"{prefix}.rank", "an integer >= 1", section.rank)
    _check(section.alpha is None or section.alpha > 0, f"{prefix}.alpha", "a float > 0 or unset (alpha = rank)",
           section.alpha)
    _check(len(section.target_modules) >= 1 and all(bool(m) for m in section.target_modules),
           f"{prefix}.target_modules", f"a non-empty list of {targets}", section.target_modules)


# The attention projections diffusers' LoRA training scripts adapt (train_text_to_image_lora.py), which every
# diffusers LoRA loader expects to find in an SD1.5 UNet LoRA.
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass(frozen=True)
class UNetConfig:
    """The UNet stage (train.stage = 'unet'): how the UNet is fine-tuned."""

    method: Literal["lora", "full"] = "lora"
    """'lora': low-rank adapters (peft) on `target_modules`, the base UNet frozen; 'full': every UNet weight, fp32
    master weights (train.mixed_precision autocasts the compute)."""
    rank: int = 4
    """LoRA rank r (diffusers' scripts: 4)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. Unset: alpha = rank (scale 1, as diffusers' scripts)."""
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module names (peft suffix match) that get adapters: the attention projections by default."""
    init: Literal["gaussian", "kaiming"] = "gaussian"
    """Initialisation of LoRA's down matrix (the up matrix starts at zero, so the first step is the base model):
    'gaussian' N(0, 1/r) as diffusers' scripts, 'kaiming' peft's default."""

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    def validate(self, prefix: str) -> None:
        _check_lora(self, prefix, "module names such as " + str(list(DEFAULT_LORA_TARGETS)))


# The CLIP text transformer's attention projections: what diffusers' DreamBooth-LoRA script adapts in a text encoder
# (and what TexForce's released encoder LoRAs adapt); "fc1", "fc2" add the MLP.
ENCODER_NAMES = ("text_encoder", "text_encoder_2")
"""The text encoders a model may have, by their diffusers folder names (SDXL has both)."""
DEFAULT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class EncoderConfig:
    """The text-encoder stage (train.stage = 'text_encoder'): how the encoder is fine-tuned (docs/encoder_lora.md)."""

    method: Literal["full", "lora"] = "full"
    """'full': every encoder weight, fp32 master weights, a frozen copy as the original encoder (the paper);
    'lora': low-rank adapters (peft) on `target_modules`, the base frozen in the autocast dtype and, with the
    adapters switched off, the original encoder itself (no second copy)."""
    rank: int = 16
    """LoRA rank r (TexForce's text-encoder LoRAs: 16)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. Unset: alpha = rank (scale 1)."""
    target_modules: tuple[str, ...] = DEFAULT_ENCODER_LORA_TARGETS
    """Module names (peft suffix match) that get adapters: the attention projections; add 'fc1', 'fc2' for the MLP."""
    init: Literal["gaussian", "kaiming"] = "gaussian"
    """Initialisation of LoRA's down matrix (the up matrix starts at zero, so the first step is the base model)."""

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    train: tuple[str, ...] = ()
    """Which of the model's text encoders learn: 'text_encoder' and/or 'text_encoder_2' (SDXL's OpenCLIP ViT-bigG);
    empty: all of them. The others stay frozen in the autocast dtype (docs/model_families.md)."""

    def validate(self, prefix: str) -> None:
        _check_lora(self, prefix, "CLIP module names such as " + str([*DEFAULT_ENCODER_LORA_TARGETS, "fc1", "fc2"]))
        bad = [n for n in self.train if n not in ENCODER_NAMES]
        _check(not bad and len(set(self.train)) == len(self.train), f"{prefix}.train",
               f"a list of distinct names from {list(ENCODER_NAMES)} (empty: every encoder of the model)", list(self.train))


@dataclass(frozen=True)
class DataConfig:
    path: str = "builtin:parti"
    """Prompt source: .txt (one a line), .jsonl, .csv, .parquet, or 'builtin:parti' / 'builtin:tiny_world'."""
    field: str = "prompt"
    """Field / column holding the prompt in .jsonl/.csv/.parquet (matched case-insensitively)."""
    shuffle: bool = True
    """Deterministic shuffle by seed and epoch."""
    max_prompts: int | None = None
    """Use only the first N prompts (after de-duplication)."""
    on_bad_line: Literal["error", "skip"] = "error"
    """A prompt-file line that is not UTF-8 text: 'error' stops with its file and line number; 'skip' drops it
    (the skipped line numbers are reported in one warning)."""
    eval_path: str = ""
    """Held-out prompts for evaluation during training (train.eval_every): a prompt file, 'builtin:parti' or
    'builtin:tiny_world[:validation]' (the tiny world's held-out captions); empty: none."""
    eval_max_prompts: int = 16
    """Evaluate on the first N distinct prompts of data.eval_path."""
    eval_seeds_per_prompt: int = 1
    """Paired noise seeds per evaluation prompt (the same seeds at every evaluation)."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.path), f"{prefix}.path", "a prompt file or 'builtin:parti'", self.path)
        _check(self.eval_max_prompts >= 1, f"{prefix}.eval_max_prompts", "an integer >= 1", self.eval_max_prompts)
        _check(self.eval_seeds_per_prompt >= 1, f"{prefix}.eval_seeds_per_prompt", "an integer >= 1",
               self.eval_seeds_per_prompt)
        _check(self.max_prompts is None or self.max_prompts >= 1, f"{prefix}.max_prompts",
               "an integer >= 1 or unset", self.max_prompts)


@dataclass(frozen=True)
class LoopConfig:
    stage: Literal["text_encoder", "unet"] = "text_encoder"
    """What is fine-tuned: 'text_encoder' (TextCraftor: the CLIP text encoder, everything else frozen) or 'unet' (the
    UNet, as [unet] says, under the frozen encoder at model.text_encoder_path; the paper's second stage)."""
    steps: int = 10_000
    """Optimizer steps (paper: 10K)."""
    batch_size: int = 4
    """Prompts per device per micro-step (paper: 4)."""
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype for the frozen towers and the sampler; the text encoder keeps fp32 master weights."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    """Write a metrics line every N steps."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every N steps (and always at the end)."""
    checkpoints_total_limit: int | None = 3
    """Keep at most this many step checkpoints (oldest deleted first); None keeps all."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder, or 'latest' for the newest under output.dir/checkpoints."""
    nan_guard: bool = True
    """Skip an optimizer step whose loss or gradients are not finite (and log it) instead of corrupting weights."""
    max_nan_skips: int = 20
    """Abort after this many consecutive non-finite steps."""
    progress_bar: bool = True
    eval_every: int = 0
    """Every N steps (and at the last), a paired evaluation of the encoder being trained against the original on
    data.eval_path, logged as eval/<metric> (mean) and eval/<metric>_diff (paired difference); 0: never."""
    embedding_anchor: float = 0.0
    """Weight of mean((e_tuned - e_original)^2) over the batch's conditional embeddings, added to the loss:
    keeps the tuned encoder near the original, which the paper's interpolation shows is a safe anchor.
    0 (the paper) turns it off."""
    memory_budget_gb: float | None = None
    """GiB a training step may use on top of the loaded models (activations kept for backward, one recompute,
    encoder gradients, optimizer state), for sampler.checkpoint='auto'. Unset: on CUDA the device's free
    memory after loading minus 10% of its total; on CPU unlimited (no recomputation)."""

    def validate(self, prefix: str) -> None:
        for key in ("steps", "batch_size", "gradient_accumulation_steps", "log_every", "checkpointing_steps"):
            value = getattr(self, key)
            _check(value >= 1, f"{prefix}.{key}", "an integer >= 1", value)
        _check(self.embedding_anchor >= 0, f"{prefix}.embedding_anchor", "a float >= 0", self.embedding_anchor)
        _check(self.eval_every >= 0, f"{prefix}.eval_every", "an integer >= 0 (0: no evaluation)", self.eval_every)
        _check(self.memory_budget_gb is None or self.memory_budget_gb > 0, f"{prefix}.memory_budget_gb",
               "a float > 0 (GiB) or unset", self.memory_budget_gb)
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               f"{prefix}.checkpoints_total_limit", "an integer >= 1 or unset", self.checkpoints_total_limit)


@dataclass(frozen=True)
class DistributedConfig:
    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    """'auto' and 'ddp' average gradients over ranks when launched by torchrun (WORLD_SIZE > 1), else one
    process; 'none' always runs one process; 'deepspeed' wraps the text encoder and its optimizer in a
    DeepSpeed engine (ZeRO stage `zero_stage`; launched by `deepspeed` or torchrun; docs/distributed.md)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (backend='deepspeed' only): 0 replicates the optimizer state, 1 shards it over
    ranks, 2 shards it and the gradients; 3 (sharded weights) is refused at start-up (docs/distributed.md)."""
    timeout_s: int = 1800
    """Collective/barrier timeout: a hung rank fails loudly instead of blocking forever."""

    def validate(self, prefix: str) -> None:
        _check(self.timeout_s >= 1, f"{prefix}.timeout_s", "an integer >= 1 (seconds)", self.timeout_s)
        # Why not ZeRO-3: it shards the encoder's weights, but the collapse monitor, the evaluator and every
        # save read the full weights on rank 0 outside the engine; the encoder (123M parameters, 0.5 GB in
        # fp32) fits on any GPU, and ZeRO-2 already shards the 1 GB of AdamW state and the gradients.
        _check(self.zero_stage != 3, f"{prefix}.zero_stage", "0, 1 or 2 (ZeRO-3 shards the text encoder's "
               "weights, which the collapse monitor, evaluation and checkpoint export read whole on rank 0; "
               "ZeRO-2 already shards its optimizer state and gradients)", self.zero_stage)


@dataclass(frozen=True)
class OpsConfig:
    backend: Literal["auto", "torch", "triton", "cpp"] = "auto"
    """Op implementations swapped into the UNet and VAE: 'triton' = our fused GroupNorm+SiLU, GEGLU and flash
    attention kernels (CUDA); 'cpp' = the native library built by `make ext` (fused GroupNorm+SiLU, and the
    sampler's fused CFG-DDIM step; docs/native_ops.md); 'torch' = stock PyTorch; 'auto' = triton GroupNorm+SiLU
    and GEGLU on an Ampere+ GPU when Triton is installed, with attention left to SDPA (faster on H100,
    docs/kernels.md), cpp on CPU when the native library is built, else torch."""
    attention: Literal["auto", "sdpa", "triton"] = "auto"
    """UNet/VAE attention: 'auto' = triton when backend='triton', else SDPA; 'sdpa' or 'triton' force one."""
    gemm_conv_max_pixels: int = 64
    """On the CPU (any backend but an explicit 'torch'): a UNet/VAE convolution with a weight of 1 MiB or more whose
    output map has at most this many pixels (64: 8x8) runs as one GEMM on the unfolded input, not through oneDNN,
    which reorders the whole weight into a fresh buffer on every call (SD1.5 at a 16x16 latent: the UNet's deep
    blocks, on 2x2, 4x4 and 8x8 maps; docs/performance.md). 0: never. No effect on CUDA."""
    channels_last: bool = False
    """channels_last (NHWC) memory format for the UNet and VAE weights, so their convolutions run NHWC: faster
    with cuDNN on tensor-core GPUs, usually slower on CPU."""
    compile: bool = False
    """torch.compile the UNet, the VAE decoder and the reward towers' vision sides (in place): fuses their
    pointwise ops. Works with the sampler's non-reentrant checkpointing; the first step pays the compile time
    (minutes at SD1.5 size). Alias: train.compile."""
    compile_backend: str = "inductor"
    """torch.compile's backend when ops.compile: 'inductor' (generated kernels), or any registered one
    (torch._dynamo.list_backends(); 'aot_eager_decomp_partition' runs inductor's decompositions and partition
    without its code generation: a check when a compiled run's numbers look wrong, docs/performance.md)."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions run as TF32 on tensor cores (10-bit mantissa; the paper's runs on
    A100 used it). Process-wide (torch.backends flags), as diffusers' --allow_tf32. false: strict fp32. No
    effect on CPU."""

    def validate(self, prefix: str) -> None:
        _check(self.gemm_conv_max_pixels >= 0, f"{prefix}.gemm_conv_max_pixels", "an integer >= 0 (0: off)",
               self.gemm_conv_max_pixels)
        if self.compile:  # torch._dynamo is imported only when compiling: it costs seconds
            import torch._dynamo

            choices = torch._dynamo.list_backends(exclude_tags=())
            _check(self.compile_backend in choices, f"{prefix}.compile_backend",
                   "one of " + ", ".join(choices), self.compile_backend)


Reporter = Literal["jsonl", "tensorboard", "wandb", "none"]


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "outputs/run"
    """Run folder: metrics.jsonl, checkpoints/, final text encoder."""
    report_to: Reporter | tuple[Reporter, ...] = "jsonl"
    """Where metrics go, one name or a list (diffusers' spelling, e.g. ["tensorboard", "wandb"]): 'jsonl'
    (metrics.jsonl, written with every choice but 'none'), 'tensorboard' (also event files under
    output.dir/tensorboard: every metric, and a picture grid at each evaluation; needs the tensorboard extra),
    'wandb' (also a Weights & Biases run under output.dir/wandb: every metric, the config, and the picture grid at
    each evaluation; needs the wandb extra; WANDB_MODE=offline keeps it on disk, `wandb sync` uploads it later),
    'none' (nothing; resume then restarts the metric history). Only rank 0 reports."""
    wandb_project: str = "textcraftor-fast"
    """W&B project of the run (report_to 'wandb'); the run is named after output.dir's folder."""
    overwrite: bool = False
    """Start a fresh run in a folder that already holds checkpoints (deleting them). Off by default so a
    forgotten --resume never destroys a run."""

    @property
    def reporters(self) -> tuple[str, ...]:
        """report_to as a tuple."""
        return (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)

    def validate(self, prefix: str) -> None:
        choices = typing.get_args(Reporter)
        for i, name in enumerate(self.reporters):
            key = f"{prefix}.report_to" if isinstance(self.report_to, str) else f"{prefix}.report_to.{i}"
            _check(name in choices, key, "one of " + ", ".join(map(repr, choices)), name)
        _check(len(self.reporters) >= 1, f"{prefix}.report_to", "a reporter name or a non-empty list of them",
               self.report_to)
        _check("none" not in self.reporters or len(self.reporters) == 1, f"{prefix}.report_to",
               "'none' alone ('none' turns off every reporter, metrics.jsonl included)", self.report_to)
        _check(len(set(self.reporters)) == len(self.reporters), f"{prefix}.report_to", "each reporter once",
               self.report_to)
        _check("wandb" not in self.reporters or bool(self.wandb_project), f"{prefix}.wandb_project",
               "a W&B project name with report_to 'wandb'", self.wandb_project)


def _default_rewards() -> tuple[RewardConfig, ...]:
    return (RewardConfig(),)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rewards: tuple[RewardConfig, ...] = field(default_factory=_default_rewards)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def validate(self) -> None:
        _check(len(self.rewards) >= 1, "rewards", "at least one [[rewards]] entry", self.rewards)
        for name in ("model", "sampler", "optim", "data", "train", "distributed", "unet", "encoder", "ops", "output"):
            getattr(self, name).validate(name)
        for i, reward in enumerate(self.rewards):
            reward.validate(f"rewards.{i}")
        if self.distributed.backend == "deepspeed":
            # DeepSpeed's fp16 mode keeps fp16 weights and its own loss scaler; we keep fp32 master weights.
            _check(self.train.mixed_precision != "fp16", "train.mixed_precision",
                   "'no' or 'bf16' with distributed.backend='deepspeed'", self.train.mixed_precision)
            # ZeRO-1/2 hand the optimizer one flat partition per rank: 8-bit state is quantised per block of
            # that partition and cannot be gathered into a checkpoint that resumes on another rank count.
            _check(self.optim.name == "adamw" or self.distributed.zero_stage == 0, "optim.name",
                   "'adamw' with distributed.zero_stage 1 or 2 (8-bit state quantised per ZeRO partition cannot "
                   "be resharded; use distributed.zero_stage=0, where 8-bit state is already ~4x smaller)",
                   self.optim.name)
            # DeepSpeedEncoder wraps the text encoder; a UNet (LoRA or full) under ZeRO is not built yet.
            _check(self.train.stage == "text_encoder", "train.stage",
                   "'text_encoder' with distributed.backend='deepspeed' (train the UNet stage with "
                   "distributed.backend='ddp')", self.train.stage)
        if self.optim.step_in_backward:
            # Each tensor steps inside backward, before the others have gradients: nothing global can run first.
            for key, ok, valid, value in (
                    ("optim.max_grad_norm", self.optim.max_grad_norm is None,
                     "unset (clipping needs every gradient's norm before any step)", self.optim.max_grad_norm),
                    ("train.gradient_accumulation_steps", self.train.gradient_accumulation_steps == 1,
                     "1 (each backward steps)", self.train.gradient_accumulation_steps),
                    ("train.mixed_precision", self.train.mixed_precision != "fp16",
                     "'no' or 'bf16' (fp16's loss scaler unscales all gradients first)", self.train.mixed_precision),
                    ("distributed.backend", self.distributed.backend != "deepspeed",
                     "'auto', 'none' or 'ddp' on one process (DeepSpeed steps its own way)",
                     self.distributed.backend)):
                _check(ok, key, f"{valid} with optim.step_in_backward=true", value)
        # The UNet stage's encoder is frozen: an encoder LoRA from an encoder-stage run goes in model.text_encoder_path.
        _check(self.encoder.method == "full" or self.train.stage == "text_encoder", "encoder.method",
               "'full' with train.stage='unet' (the encoder is frozen there; give a tuned encoder or encoder LoRA as "
               "model.text_encoder_path)", self.encoder.method)
        _check(self.train.eval_every == 0 or bool(self.data.eval_path), "data.eval_path",
               "a prompt file or built-in set when train.eval_every > 0 (e.g. 'builtin:parti')", self.data.eval_path)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
