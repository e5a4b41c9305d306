"""`evaluate`: is a tuned text encoder (or UNet, or both) better than the original, on these prompts, by how much,
how surely?

For the original model and every tuned one (a tuned text encoder and/or a tuned UNet: entries.Tuned), every
configured reward (and the scores a registered prompt set adds: the tiny
world's judge accuracy per attribute) on a prompt set with paired seeds; the table holds means, paired differences and
95% intervals. Beside it: the interpolation curve (w = 0 ... 1) and the switch-step curve of each tuned
encoder, and a grid of pictures (prompts x encoders). Finished batches are cached on disk, so a killed
evaluation restarts where it stopped and gives the same table.

    result = evaluate(load_config("configs/sd15.toml"), ["outputs/run/text_encoder"], "outputs/eval",
                      EvalOptions(prompts="builtin:parti", max_prompts=200, seeds_per_prompt=2))
    evaluate(cfg, [Tuned.from_folder("outputs/enc"), Tuned.from_folder("outputs/unet"),
                   Tuned.from_folder("outputs/both")], "outputs/eval", EvalOptions(compare=(("both", "enc"),)))

Entries with a tuned UNet use it at every step of every variant (curves included); the interpolation and
switch-step curves move the text encoder alone, so an entry without one has none.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..config import TrainConfig
from . import report
from .cache import ScoreCache, fingerprint, weights_fingerprint
from ..inference import DEFAULT_SWITCH_STEP, conditioning, describe_switch, resolve_switch_step
from ..sampler import sample_images
from .core import EVAL_SEED0, Variant, reward_scorer, sample_set
from .entries import Tuned, as_tuned, run_name
from .prompts import eval_prompts, extra_scorers
from .result import EvalResult
from .stats import compare_paired, mean_ci, paired_diff

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Part of every cache key: bump it when a change to sampling or scoring changes the numbers, so an old cache
# is never read as the new code's result.
CACHE_VERSION = 2


@dataclass(frozen=True)
class EvalOptions:
    prompts: str = "builtin:parti"
    """A prompt file (.txt/.jsonl/.csv/.tsv/.parquet) or a registered set: 'builtin:parti', a plugin's (the tiny
    world's 'builtin:tiny_world[:validation]')."""
    field: str = "prompt"
    max_prompts: int | None = None
    seeds_per_prompt: int = 1
    """Noise seeds per prompt: sample k is (prompt k mod P, seed seed0 + k), the same for every encoder."""
    seed0: int = EVAL_SEED0
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    """Interpolation weights of the w-curve (e = w * tuned + (1 - w) * original); () skips it; w > 1 extrapolates."""
    switch_steps: tuple[int | float, ...] | None = None
    """Switch steps of the switch-step curve (tuned encoder from this step on), steps or fractions of the steps as
    `switch_step`; None: 0, n/4, n/2, 3n/4; () skips."""
    switch_step: int | float = DEFAULT_SWITCH_STEP
    """Where tuned encoders take over in the main table: 0 (default, as `generate` and an exported pipeline) at
    every step; an integer is that step, a float in [0, 1) a fraction of the steps, rounded down
    (inference.resolve_switch_step). Not the config's sampler.switch_step, which places the training chain's."""
    num_steps: int | None = None
    """DDIM steps; None: sampler.num_steps."""
    guidance_scale: float | None = None
    """CFG scale; None: sampler.guidance_scale."""
    batch_size: int = 8
    grid_prompts: int = 8
    """Rows of the picture grid: the first N prompts at their first seed."""
    device: str = "auto"
    progress: bool = True
    compare: tuple[tuple[str, str], ...] = ()
    """Extra paired comparisons (a, b) between evaluated models: a - b per sample, e.g. ('both', 'encoder')."""

    def __post_init__(self) -> None:
        for key, low in (("seeds_per_prompt", 1), ("batch_size", 1), ("grid_prompts", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"evaluate: {key} must be an integer >= {low}, got {getattr(self, key)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"evaluate: max_prompts must be >= 1 or unset, got {self.max_prompts}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encoder_name(path: str) -> str:
    """A column name for a tuned encoder: its run folder's name ('outputs/run1/text_encoder' -> 'run1')."""
    return run_name(Path(path))


def _entry_name(entry: str | Tuned) -> str:
    return entry.label if isinstance(entry, Tuned) else encoder_name(str(entry))


class _Evaluation:
    """The loaded models and settings of one evaluation, and the sampling/scoring of one variant."""

    def __init__(self, config: TrainConfig, entries: Sequence[Tuned], out_dir: Path, opts: EvalOptions):
        from ..models.loading import load_components
        from ..models import load_tuned_encoder
        from ..models.lora import load_unet
        from ..rewards import build_rewards
        from ..sampler import make_schedule

        self.opts, self.config = opts, config
        s = config.sampler
        self.num_steps = opts.num_steps or s.num_steps
        self.switch = resolve_switch_step(opts.switch_step, self.num_steps)  # a bad one fails before any loading
        self.device = _device(opts.device)
        comp = load_components(config.model, seed=config.seed)
        self.comp = comp
        self.unet = comp.unet.to(self.device).eval()
        self.vae = comp.vae.to(self.device).eval()
        self.original = comp.text_encoder.to(self.device).eval()
        # Per entry: its tuned encoder and its tuned UNet (a LoRA merged into a copy of the base), or None.
        self.tuned = [load_tuned_encoder(e.text_encoder, comp.text_encoder)
                      .to(self.device).eval() if e.text_encoder else None for e in entries]
        self.unets = [load_unet(e.unet, comp.unet).to(self.device).eval() if e.unet else None for e in entries]
        self.guidance = opts.guidance_scale if opts.guidance_scale is not None else s.guidance_scale
        self.schedule = make_schedule(comp.scheduler.config, self.num_steps, 0.0, s.timestep_spacing)
        side = config.model.resolution // comp.vae_scale_factor
        self.latent_shape = (comp.unet.config.in_channels, side, side)
        self.prompts = eval_prompts(opts.prompts, opts.field, opts.max_prompts)
        self.samples, self.seeds = sample_set(self.prompts, opts.seeds_per_prompt, opts.seed0)
        self.scorers = [reward_scorer(build_rewards(config.rewards, self.device)),
                        *extra_scorers(opts.prompts, config.model.kind)]
        self.grid_n = min(opts.grid_prompts, len(self.prompts))
        self.cache = ScoreCache(out_dir / "cache")
        # Keyed by weights, not paths: a retrained encoder at the same path is a new key, and adding an
        # encoder to an evaluation reuses every batch already scored for the others.
        self._hashes = [weights_fingerprint(e) if e is not None else None for e in self.tuned]
        self._unet_hashes = [weights_fingerprint(u) if u is not None else None for u in self.unets]
        self._base_key = {"version": CACHE_VERSION, "model": dataclasses.asdict(config.model),
                          "rewards": [dataclasses.asdict(r) for r in config.rewards],
                          "original": weights_fingerprint(self.original), "steps": self.num_steps, "cfg": self.guidance,
                          "spacing": s.timestep_spacing, "train_uncond": s.train_uncond,
                          "prompts": fingerprint(self.prompts), "spc": opts.seeds_per_prompt, "seed0": opts.seed0,
                          "batch": opts.batch_size, "grid": self.grid_n, "extra_scorers": len(self.scorers) - 1}
        self._memo: dict[str, dict[str, Tensor]] = {}

    def variant_key(self, v: Variant) -> str:
        # A base-UNet variant's key is what it was before tuned UNets existed: caches stay valid.
        unet = {} if v.unet is None else {"unet": self._unet_hashes[v.unet]}
        if v.encoder is None:  # the original encoder: weight and switch step do not apply
            return fingerprint({**self._base_key, "encoder": None, **unet})
        return fingerprint({**self._base_key, "encoder": self._hashes[v.encoder], "w": v.weight,
                            "switch": v.switch_step, **unet})

    def batches(self) -> range:
        return range(0, len(self.samples), self.opts.batch_size)

    @torch.no_grad()
    def _run_batch(self, v: Variant, start: int) -> dict[str, Tensor]:
        idx = range(start, min(start + self.opts.batch_size, len(self.samples)))
        prompts, seeds = [self.samples[i] for i in idx], [self.seeds[i] for i in idx]
        tuned = [self.tuned[v.encoder]] if v.encoder is not None else []
        frozen, mixed = conditioning(self.original, tuned, [v.weight], self.comp.tokenizer, prompts,
                                     self.config.sampler.train_uncond)
        unet = self.unets[v.unet] if v.unet is not None else self.unet
        images = sample_images(unet, self.vae, self.schedule, seeds, self.latent_shape, frozen, mixed,
                               self.guidance, v.switch_step)
        scores: dict[str, Tensor] = {}
        for scorer in self.scorers:
            scores.update(scorer(images, prompts))
        shown = [i - start for i in idx if i < self.grid_n]
        if shown:  # pictures only for the grid's samples: the cache stays a few bytes per sample
            scores["images"] = (images[shown].cpu() * 255).round().to(torch.uint8)
        return scores

    def run(self, v: Variant, bar) -> dict[str, Tensor]:
        """Per-sample scores of variant `v` over the whole sample set, from the cache where it has them."""
        key = self.variant_key(v)
        if key in self._memo:
            bar.update(len(self.batches()))
            return self._memo[key]
        parts = []
        for start in self.batches():
            bar.set_postfix_str(v.label, refresh=False)
            scores = self.cache.load(key, start)
            if scores is None:
                scores = self._run_batch(v, start)
                self.cache.save(key, start, scores)
            parts.append(scores)
            bar.update(1)
        merged = {k: torch.cat([p[k] for p in parts if k in p]) for k in parts[0]}
        self._memo[key] = merged
        return merged


def _variants(ev: _Evaluation, names: list[str]) -> tuple[list[Variant], dict[str, list[Variant]],
                                                           dict[str, list[Variant]]]:
    """(main variants: original + each tuned model as used; w-curve and switch-curve variants per model with a
    tuned encoder, with that model's UNet)."""
    opts, n = ev.opts, ev.num_steps
    switches = opts.switch_steps if opts.switch_steps is not None else (0, n // 4, n // 2, 3 * n // 4)
    switches = sorted({resolve_switch_step(s, n) for s in switches})  # 0.5 and 5 of 10 are one point
    if any(w > 1 or w < 0 for w in opts.weights):
        logger.warning("interpolation weights %s go outside [0, 1]: extrapolating past the tuned (or original) "
                       "embedding, where nothing was trained", [w for w in opts.weights if w > 1 or w < 0])
    parts = [(i if ev.tuned[i] is not None else None, i if ev.unets[i] is not None else None)
             for i in range(len(names))]
    main = [Variant("original")] + [Variant(name, enc, 1.0, ev.switch, unet) for name, (enc, unet) in zip(names, parts)]
    with_encoder = [(name, enc, unet) for name, (enc, unet) in zip(names, parts) if enc is not None]
    w_curves = {name: [Variant(f"{name} w={w:g}", enc, w, ev.switch, unet) for w in sorted(opts.weights)]
                for name, enc, unet in with_encoder}
    s_curves = {name: [Variant(f"{name} switch={s}", enc, 1.0, s, unet) for s in switches]
                for name, enc, unet in with_encoder}
    return main, w_curves, s_curves


def _curve_points(variants: list[Variant], scores: dict[str, dict[str, Tensor]], base: dict[str, Tensor],
                  metrics: list[str], axis: str) -> list[dict]:
    points = []
    for v in variants:
        s = scores[v.label]
        point: dict = {axis: v.weight if axis == "weight" else v.switch_step}
        for m in metrics:
            mean, hw = mean_ci(s[m])
            point[m] = {"mean": mean, "mean_hw": hw, **paired_diff(s[m], base[m])}  # half_width: the paired diff's
        points.append(point)
    return points


def evaluate(config: TrainConfig, text_encoders: Sequence[str | Tuned] = (), out_dir: str | Path = "outputs/evaluate",
             options: EvalOptions = EvalOptions(), names: Sequence[str] | None = None) -> EvalResult:
    """Paired evaluation of the original model and each tuned one on `options.prompts`: an entry is a tuned text
    encoder (a path: a text_encoder folder, a run folder holding text_encoder/, a checkpoint's encoder or one
    .safetensors) or a `Tuned` (a tuned encoder and/or a tuned UNet); writes table.md/.csv/.json, grid.png and the
    curves under `out_dir` (and its resumable cache) and returns them."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names) if names else [_entry_name(e) for e in text_encoders]
    if len(names) != len(text_encoders) or len(set(names) | {"original"}) != len(names) + 1:
        raise ValueError(f"need one distinct name per tuned encoder (and none called 'original'); got {names} "
                         f"for {len(text_encoders)} encoders: pass --name for each")
    unknown = [n for pair in options.compare for n in pair if n not in names and n != "original"]
    if unknown or any(len(pair) != 2 for pair in options.compare):
        raise ValueError(f"compare: each pair names two evaluated models ({', '.join(['original', *names])}); "
                         f"got {list(options.compare)}")
    entries = [as_tuned(e) for e in text_encoders]
    ev = _Evaluation(config, entries, out, options)
    main, w_curves, s_curves = _variants(ev, names)
    every = main + [v for vs in (*w_curves.values(), *s_curves.values()) for v in vs]
    cached_before = ev.cache.count()
    logger.info("Evaluating %d prompts x %d seeds = %d samples for %d encoder settings (%d batches cached); in the "
                "table, %s", len(ev.prompts), options.seeds_per_prompt, len(ev.samples), len(every), cached_before,
                describe_switch(ev.switch, ev.num_steps))
    bar = tqdm(total=len(every) * len(ev.batches()), desc="evaluate", unit="batch", disable=not options.progress,
               dynamic_ncols=True)
    scores = {v.label: ev.run(v, bar) for v in every}
    bar.close()
    base = scores["original"]
    metrics = [k for k in base if k != "images"]
    table = {name: compare_paired(base, scores[name], metrics) for name in names}
    curves = {name: {"weight": _curve_points(w_curves.get(name, []), scores, base, metrics, "weight"),
                     "switch_step": _curve_points(s_curves.get(name, []), scores, base, metrics, "switch_step")}
              for name in names}
    pairs = {f"{a} vs {b}": compare_paired(scores[b], scores[a], metrics) for a, b in options.compare}
    result = EvalResult(out, table, curves, scores, pairs=pairs)
    described = [e.describe() if isinstance(e, Tuned) else str(e) for e in text_encoders]
    info = {"prompts": options.prompts, "n_prompts": len(ev.prompts), "seeds_per_prompt": options.seeds_per_prompt,
            "n_samples": len(ev.samples), "num_steps": ev.num_steps, "guidance_scale": ev.guidance,
            "switch_step": ev.switch, "seed0": options.seed0, "encoders": dict(zip(names, described))}
    result.files = report.write_all(result, info, [ev.prompts[i] for i in range(ev.grid_n)], names)
    return result
