"""A frozen CLIP tower for rewards: loading (transformers folder or open_clip/OpenAI file), tokenizer, and
normalised image / text embeddings with the prompts' text embeddings cached.

Why a cache: the reward's text side depends only on the prompt string, never on the trainable encoder, so
its embedding needs no graph and can be computed once per unique prompt (no grad) and reused across steps;
the official code re-runs the text tower, with grad, every step. Towers are built on the meta device and
filled with `assign=True`, so loading a 1B-parameter tower does not first pay for a random init.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .checkpoints import check_state_dict, load_strict, read_state_dict, require_path
from .openclip_convert import (clean_openclip_state_dict, hf_clip_config, is_openai_state_dict,
                               openclip_state_shapes, openclip_to_transformers, resolve_arch)

logger = logging.getLogger(__name__)

# Shipped by the models package (SD1.5's CLIP BPE, padded with 49407 as the official code feeds every tower).
SD15_TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "sd15" / "tokenizer"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin",
                 "open_clip_model.safetensors")


def _at_least_fp32(t: Tensor) -> Tensor:
    # bf16/fp16 towers hand back fp32 scores; float64 (gradcheck) stays float64.
    return t.to(torch.promote_types(t.dtype, torch.float32))


class PromptEmbeddingCache:
    """LRU map prompt -> normalised text embedding (no grad), counting how often the text tower really runs."""

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self._store: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get_many(self, prompts: Sequence[str], compute: Callable[[list[str]], Tensor]) -> Tensor:
        """Embeddings (B, E) for `prompts`; missing unique prompts are computed in one `compute` call."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        self.misses += len(missing)
        self.hits += len(prompts) - sum(1 for p in prompts if p in missing)
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        rows = [fresh[p] if p in fresh else self._store[p] for p in prompts]
        if self.max_size > 0:
            for p in prompts:  # most recently used last
                self._store[p] = fresh.get(p, self._store.get(p))
                self._store.move_to_end(p)
            while len(self._store) > self.max_size:
                self._store.popitem(last=False)
        return torch.stack(rows)


class ClipTower(nn.Module):
    """A frozen transformers CLIPModel (or CLIPVisionModelWithProjection) returning L2-normalised embeddings.

    image_features: differentiable w.r.t. the pixels; the tower's weights never get gradients.
    text_features: cached per prompt, computed under no_grad (counted in `text_forward_calls`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, cache_size: int = 4096,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 weight_files: Sequence[Path] = ()) -> None:
        super().__init__()
        self.model = model
        # The files the weights came from (.safetensors only): rewards/shared_text.py reads them to compare.
        self.weight_files = [Path(f) for f in weight_files if Path(f).suffix == ".safetensors"]
        self.tokenizer = tokenizer
        self.cache = PromptEmbeddingCache(cache_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.text_forward_calls = 0
        self.model.eval().requires_grad_(False)

    @property
    def image_size(self) -> int:
        return int(self._vision_config.image_size)

    @property
    def _vision_config(self):
        cfg = self.model.config
        return getattr(cfg, "vision_config", cfg)

    @property
    def has_text(self) -> bool:
        return hasattr(self.model, "text_model")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def image_features(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) normalised pixels -> (B, E) unit-norm image embeddings (fp32, or fp64 for a fp64 tower)."""
        out = self.model.vision_model(pixel_values=pixels.to(self.dtype))
        emb = self.model.visual_projection(out.pooler_output)  # (B, E)
        return F.normalize(_at_least_fp32(emb), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """(B, E) unit-norm fp32 text embeddings of `prompts` (no grad; cached per prompt)."""
        device = self.model.visual_projection.weight.device
        return self.cache.get_many(prompts, self._encode_text).to(device)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        # inference_mode(False): an embedding cached during an inference_mode evaluation must stay usable in a
        # later training step (inference tensors cannot be saved for backward). It also turns grad mode back
        # on, so no_grad goes inside it.
        with torch.inference_mode(False), torch.no_grad():
            return self.encode_text(prompts)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(B, E) unit-norm fp32 text embeddings, uncached, in the caller's grad mode (the official code's HPSv2
        keeps this graph: benchmarks/baseline_official.py)."""
        if not self.has_text:
            raise RuntimeError("this CLIP tower was loaded without its text side")
        if self.tokenizer is None:
            raise ConfigError("this CLIP tower has no tokenizer: pass options.tokenizer_path (a CLIP tokenizer folder)")
        self.text_forward_calls += 1
        max_len = int(self.model.config.text_config.max_position_embeddings)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids.to(self.model.visual_projection.weight.device)
        # No attention mask, as the official code: the causal mask hides the padding from the EOT token.
        out = self.model.text_model(input_ids=ids.clone())
        return F.normalize(_at_least_fp32(self.model.text_projection(out.pooler_output)), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def resolve_tokenizer(folder: Path | None, tokenizer_path: str = "") -> Any:
    """The tokenizer: `tokenizer_path` if given, else the model folder's own, else the shipped SD1.5 one."""
    from transformers import CLIPTokenizer

    candidates = [Path(tokenizer_path).expanduser()] if tokenizer_path else []
    if tokenizer_path and not candidates[0].is_dir():
        raise FileNotFoundError(f"tokenizer_path '{candidates[0]}' is not a folder with vocab.json/merges.txt")
    if folder is not None and folder.is_dir():
        candidates += [folder, folder / "tokenizer"]
    candidates.append(SD15_TOKENIZER)
    for c in candidates:
        if (c / "vocab.json").is_file() or (c / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(str(c), local_files_only=True)
    raise ConfigError(f"no CLIP tokenizer found in {', '.join(map(str, candidates))}; pass options.tokenizer_path")


def _folder_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a transformers folder: the shards of model.safetensors.index.json, else the first
    of _WEIGHT_FILES present."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoint
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"CLIP folder '{folder}' holds none of {', '.join(_WEIGHT_FILES)} "
                            "(or model.safetensors.index.json)")


def _read_folder_weights(folder: Path) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for f in _folder_weight_files(folder):
        sd.update(read_state_dict(f))
    return sd


def _materialise_position_ids(model: nn.Module) -> nn.Module:
    # Non-persistent buffers are not in any checkpoint, so after a meta-device build they must be recreated
    # (left alone when the weights are meta too: architecture checks).
    if next(model.parameters()).is_meta:
        return model
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand((1, -1)), persistent=False)
    return model


def _build_on_meta(config: Any, with_text: bool) -> nn.Module:
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    with torch.device("meta"):
        return CLIPModel(config) if with_text else CLIPVisionModelWithProjection(config)


def hf_model_from_state_dict(config: Any, sd: dict[str, Tensor], with_text: bool, source: str) -> nn.Module:
    """A transformers CLIP model from its own-layout state dict, strictly (meta tensors work too).

    Older transformers saved the `position_ids` buffers (now non-persistent): those keys are dropped; a
    vision-only load drops the text side of a full CLIPModel file."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if not with_text:
        sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    model = _build_on_meta(config, with_text)
    load_strict(model, sd, source, f"transformers {type(model).__name__} from config.json", assign=True)
    return _materialise_position_ids(model)


def _load_hf_folder(folder: Path, with_text: bool) -> tuple[nn.Module, tuple, tuple]:
    from transformers import CLIPConfig, CLIPVisionConfig

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder '{folder}' has no config.json (expected a transformers CLIPModel folder)")
    full = json.loads((folder / "config.json").read_text()).get("model_type", "clip") == "clip"
    if with_text or not full:
        config = (CLIPConfig if with_text else CLIPVisionConfig).from_pretrained(str(folder), local_files_only=True)
    else:  # the image tower of a full CLIPModel folder: its projection size lives at the top level
        clip = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        config = clip.vision_config
        config.projection_dim = clip.projection_dim
    model = hf_model_from_state_dict(config, _read_folder_weights(folder), with_text, str(folder))
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():  # the tower's own normalisation, when its folder says
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return model, mean, std


def openclip_model_from_state_dict(sd: dict[str, Tensor], arch_name: str, with_text: bool, source: str,
                                   quick_gelu: bool | None = None, vision_heads: int | None = None,
                                   text_heads: int | None = None) -> nn.Module:
    """A transformers CLIP model (built on meta, filled by assignment) from an open_clip-layout state dict,
    checked strictly against `arch_name` ('auto': inferred). Works on meta tensors too (architecture tests)."""
    openai = is_openai_state_dict(sd)  # before cleaning: the marker is one of the keys it drops
    sd = clean_openclip_state_dict(sd, with_text)
    arch = resolve_arch(arch_name, sd, with_text, quick_gelu, vision_heads, text_heads, openai=openai)
    label = f"open_clip {arch.name}" + ("" if with_text else " image tower")
    # Check in open_clip's own key names first: they are the names the user's file holds.
    check_state_dict(openclip_state_shapes(arch, with_text), sd, source, label)
    model = _build_on_meta(hf_clip_config(arch, with_text), with_text)
    load_strict(model, openclip_to_transformers(sd), source, label, assign=True)
    return _materialise_position_ids(model)


def load_clip_tower(path: str | Path, *, arch: str = "auto", with_text: bool = True,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    tokenizer_path: str = "", tokenizer: Any = None, cache_size: int = 4096,
                    quick_gelu: bool | None = None, vision_heads: int | None = None,
                    text_heads: int | None = None, what: str = "CLIP tower") -> ClipTower:
    """Load a frozen CLIP tower from a transformers folder or an open_clip/OpenAI checkpoint file.

    `arch` names the open_clip architecture a file must match ('auto' infers it); folders carry their config.
    `dtype` (e.g. bf16 on GPU) applies to the tower's weights; embeddings come back in fp32.
    """
    p = require_path(path, what)
    if p.is_dir():
        model, mean, std = _load_hf_folder(p, with_text)
    else:
        model = openclip_model_from_state_dict(read_state_dict(p), arch, with_text, str(p), quick_gelu,
                                               vision_heads, text_heads)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # open_clip's ViT-L/H/g checkpoints all use OpenAI's
    model = model.to(device=device, dtype=dtype)
    if with_text and tokenizer is None:
        tokenizer = resolve_tokenizer(p if p.is_dir() else None, tokenizer_path)
    logger.info("Loaded %s from %s (%s, %s, text side: %s)", what, p, type(model).__name__, dtype, with_text)
    files = _folder_weight_files(p) if p.is_dir() else [p]
    return ClipTower(model, tokenizer, cache_size=cache_size, mean=mean, std=std, weight_files=files)


# Options every CLIP-tower reward accepts in `[[rewards]] options = {...}`.
TOWER_OPTIONS: dict[str, Any] = {
    "arch": None,            # open_clip architecture a checkpoint file must match ('auto': infer from shapes)
    "quick_gelu": None,      # override the activation (OpenAI weights: QuickGELU; LAION: GELU)
    "vision_heads": None,    # head counts, only for unusual 'auto' architectures
    "text_heads": None,
    "tokenizer_path": "",    # a CLIP tokenizer folder (default: the model folder's own, else SD1.5's)
    "cache_size": 4096,      # prompts kept in the text-embedding LRU cache (0 disables caching)
}


def tower_from_options(path: str, opts: dict[str, Any], *, default_arch: str, with_text: bool,
                       device: torch.device | str, dtype: torch.dtype, what: str) -> ClipTower:
    """load_clip_tower with the TOWER_OPTIONS subset of a reward's validated options."""
    return load_clip_tower(
        path, arch=opts["arch"] or default_arch, with_text=with_text, device=device, dtype=dtype,
        tokenizer_path=opts["tokenizer_path"], cache_size=int(opts["cache_size"]), quick_gelu=opts["quick_gelu"],
        vision_heads=opts["vision_heads"], text_heads=opts["text_heads"], what=what)


def reward_vision_towers(rewards: nn.Module) -> list[nn.Module]:
    """The image sides of the CLIP towers inside `rewards` (what runs on every step's images)."""
    towers = [m for m in rewards.modules() if isinstance(m, ClipTower)]
    return [t.model.vision_model for t in towers if hasattr(t.model, "vision_model")]
