"""Text-encoder LoRA (encoder.method = 'lora'): peft adapters on the CLIP text transformer, stored as diffusers'
pipeline LoRA files, merged into plain encoders for every other use.

    add_encoder_lora(encoder, rank=16, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))
    save_encoder_lora(encoder, folder)        # folder/pytorch_lora_weights.safetensors: pipe.load_lora_weights(folder)
    load_encoder_lora_state(encoder, folder)  # the same adapters' weights back, strict and exact (resume)
    merged_encoder(encoder)                   # a plain CLIPTextModel with W + (alpha / r) B A folded in
    stack_loras(base, [(folder, 0.7), ...])   # a plain encoder W + sum_i s_i (alpha_i / r_i) B_i A_i

The file is what diffusers' DreamBooth-LoRA script writes for a text encoder (`convert_state_dict_to_diffusers(
get_peft_model_state_dict(text_encoder))` through `save_lora_weights(text_encoder_lora_layers=...)`): keys
`text_encoder.text_model.<module>.lora_linear_layer.down/up.weight`, the LoraConfig as metadata. transformers 5's
CLIPTextModel has no `text_model.` level; diffusers strips it when loading into such a model, and older
transformers need it, so the file keeps it (as save_text_encoder_folder keeps it for full weights). A UNet LoRA can
share the file (`unet.*` keys): `save_encoder_lora(..., **lora.unet_lora_parts(unet))` writes both as diffusers does.

Stacking is linear in weight space, as diffusers' `set_adapters([a, b], [wa, wb])` computes it: every adapted
linear layer applies W x + sum_i w_i (alpha_i / r_i) B_i A_i x. Merging folds that sum into W once, so a stacked
or scaled encoder costs nothing at sampling time and loads without peft.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .adapters import ADAPTER, LORA_WEIGHTS, lora_file, lora_parts, require_peft

logger = logging.getLogger(__name__)

PREFIX = "text_encoder"  # StableDiffusionLoraLoaderMixin.text_encoder_name: the key prefix of an encoder LoRA
LORA_DIR = "text_encoder_lora"  # where a run and its checkpoints keep the encoder's adapters
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # what diffusers' loader adapts in CLIP
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_DOWN, _UP = ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"


def add_encoder_lora(encoder: nn.Module, rank: int, alpha: float, target_modules: Sequence[str],
                     init: str = "gaussian") -> int:
    """Freeze `encoder` and inject LoRA adapters (adapter 'default') into its layers named by `target_modules`
    (peft suffix match); returns the number of adapter parameters, the only ones with requires_grad. The up
    matrices start at zero: the adapted encoder computes exactly what the base does until the first update."""
    peft = require_peft("encoder.method='lora'")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                             init_lora_weights="gaussian" if init == "gaussian" else True)
    encoder.requires_grad_(False)
    try:
        peft.inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"encoder.target_modules={list(target_modules)}: {e}; a CLIP text encoder's linear layers are "
                         f"{', '.join(CLIP_TARGETS)}") from None
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def has_encoder_lora(encoder: nn.Module) -> bool:
    return ADAPTER in (getattr(encoder, "peft_config", None) or {})


def encoder_lora_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in diffusers' format, `text_model.<module>.lora_linear_layer.down/up.weight`."""
    require_peft("exporting a text-encoder LoRA")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder, adapter_name=ADAPTER))
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def _adapter_metadata(encoder: nn.Module) -> dict:
    return encoder.peft_config[ADAPTER].to_dict()


def save_encoder_lora(encoder: nn.Module | EncoderLora, folder: str | Path, dtype: torch.dtype | None = None,
                      **unet_lora: dict) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` as diffusers' training scripts do: the encoder's adapters
    (a peft-adapted encoder, or an `EncoderLora` read from a file) with its LoraConfig as metadata; `dtype` casts the
    written tensors. `unet_lora` (`unet_lora_layers=..., unet_lora_adapter_metadata=...`: lora.unet_lora_parts) puts a
    UNet's adapters in the same file. Loads with `pipe.load_lora_weights(folder)`."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from .tensors import to_saveable

    if isinstance(encoder, EncoderLora):
        state, metadata = encoder.state, encoder.metadata
    else:
        state, metadata = encoder_lora_state(encoder), _adapter_metadata(encoder)
    folder = Path(folder)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, text_encoder_lora_layers=to_saveable(state, dtype), safe_serialization=True,
        text_encoder_lora_adapter_metadata=metadata, **unet_lora)
    logger.info("Saved the text-encoder LoRA (%d tensors%s) to %s", len(state), " and the UNet's" if unet_lora else "",
                folder)
    return folder


# ------------------------------------------------------------------------------------------------- reading files

@dataclass(frozen=True)
class EncoderLora:
    """A text-encoder LoRA read from a file: `state` in diffusers' format (keys without the `text_encoder.`
    prefix), `metadata` its LoraConfig as a dict (rank, alpha, patterns), `path` the file."""

    state: dict[str, torch.Tensor]
    metadata: dict
    path: Path

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name without `text_model.`: (down (r, in), up (out, r))}."""
        found = {}
        for key, down in self.state.items():
            if key.endswith(_DOWN):
                name = key[: -len(_DOWN)]
                found[name.removeprefix("text_model.")] = (down, self.state[name + _UP])
        return found

    def scaling(self, module: str, rank: int) -> float:
        """alpha / r of `module`, as peft computes it from the LoraConfig (its patterns match name suffixes)."""
        def pattern(key: str, default):
            for suffix, value in (self.metadata.get(key) or {}).items():
                if module == suffix or module.endswith("." + suffix):
                    return value
            return default

        r = pattern("rank_pattern", rank)
        alpha = pattern("alpha_pattern", self.metadata.get("lora_alpha", r))
        if self.metadata.get("use_dora"):
            raise ValueError(f"'{self.path}' is a DoRA adapter (use_dora): merging DoRA is not supported")
        return float(alpha) / (float(r) ** 0.5 if self.metadata.get("use_rslora") else float(r))


def _down_up(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every key in diffusers' down/up naming: diffusers' converter renames only the attention projections, so its
    own files keep peft's lora_A/lora_B names for fc1/fc2."""
    return {k.replace(".lora_A.weight", _DOWN).replace(".lora_B.weight", _UP): v for k, v in state.items()}


def find_encoder_lora(path: Path) -> Path | None:
    """The encoder-LoRA file of `path`: a LoRA folder or file with `text_encoder.*` keys, or a run or checkpoint
    folder's text_encoder_lora/; None when `path` holds none."""
    for candidate in (path, path / LORA_DIR):
        if PREFIX in lora_parts(candidate):
            return lora_file(candidate)
    return None


def read_encoder_lora(path: str | Path) -> EncoderLora:
    """The text-encoder part of a LoRA file (or of a folder or run holding one), in diffusers' format; peft-format
    keys (`lora_A`/`lora_B`, e.g. files saved by peft) are converted. Anything else is a ValueError."""
    from safetensors import safe_open

    from .tensors import load_safetensors

    file = find_encoder_lora(Path(path))
    if file is None:
        raise FileNotFoundError(f"'{path}' holds no text-encoder LoRA (a {LORA_WEIGHTS} with {PREFIX}.* keys, or a "
                                f"run folder with {LORA_DIR}/)")
    state = _down_up({k.removeprefix(PREFIX + "."): v for k, v in load_safetensors(file).items()
                       if k.startswith(PREFIX + ".")})
    odd = [k for k in state if not k.endswith((_DOWN, _UP))]
    if odd:
        raise ValueError(f"'{file}': text-encoder LoRA keys in a format other than diffusers' or peft's (e.g. "
                         f"{odd[:2]}); convert the file with diffusers' pipe.load_lora_weights + save_lora_weights")
    with safe_open(str(file), framework="pt") as f:
        raw = json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))
    metadata = {k.removeprefix(PREFIX + "."): v for k, v in raw.items() if k.startswith(PREFIX + ".")}
    return EncoderLora(state, metadata, file)


def load_encoder_lora_state(encoder: nn.Module, folder: str | Path) -> None:
    """Load a saved encoder LoRA into `encoder`'s existing adapter, bit for bit; every adapter weight must be in
    the file and every tensor of the file must have an adapter weight to go to (a ValueError names a few)."""
    require_peft("loading a text-encoder LoRA")
    from diffusers.utils import convert_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    lora = read_encoder_lora(folder)
    state = convert_state_dict_to_peft({k.removeprefix("text_model."): v for k, v in lora.state.items()})
    expected = {k: v.shape for k, v in get_peft_model_state_dict(encoder, adapter_name=ADAPTER).items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k])} here" for k in sorted(expected)
              if k in state and state[k].shape != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"'{lora.path}' does not match the encoder's LoRA adapters (rank / target modules differ?): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:2]}")
    set_peft_model_state_dict(encoder, state, adapter_name=ADAPTER)


# ------------------------------------------------------------------------------------------------------ merging

def plain_copy(encoder: nn.Module) -> nn.Module:
    """A copy of `encoder` without adapters: every peft layer replaced by its base layer (weights unchanged)."""
    plain = copy.deepcopy(encoder)
    for name, module in list(plain.named_modules()):
        if hasattr(module, "get_base_layer") and module is not module.get_base_layer():
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, attr, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in plain.__dict__:
            delattr(plain, attr)
    return plain


@torch.no_grad()
def add_deltas(encoder: nn.Module, lora: EncoderLora, scale: float = 1.0) -> int:
    """W += scale * (alpha / r) * up @ down for every module `lora` adapts (in place, in float32 then cast back, as
    peft merges); returns the number of modules. A module the encoder lacks or a shape mismatch is a ValueError."""
    modules = dict(encoder.named_modules())
    if hasattr(encoder, "text_model"):  # transformers < 5 keeps the transformer under `text_model.`
        modules = {k.removeprefix("text_model."): v for k, v in modules.items()}
    adapted = lora.modules()
    missing = [name for name in adapted if not isinstance(modules.get(name), nn.Linear)]
    if missing:
        raise ValueError(f"'{lora.path}' adapts layers this text encoder does not have (e.g. {missing[:2]}): the LoRA "
                         "was trained for another model")
    for name, (down, up) in adapted.items():
        weight = modules[name].weight
        delta = up.float() @ down.float()
        if delta.shape != weight.shape:
            raise ValueError(f"'{lora.path}': the LoRA of {name} is {tuple(delta.shape)}, the layer "
                             f"{tuple(weight.shape)}: the LoRA was trained for another model")
        weight += (scale * lora.scaling(name, down.shape[0]) * delta).to(weight.device, weight.dtype)
    return len(adapted)


def merged_encoder(encoder: nn.Module) -> nn.Module:
    """A plain copy of a LoRA-adapted `encoder` with its adapters folded into the weights (fp32 while folding)."""
    lora = EncoderLora(_down_up(encoder_lora_state(encoder)), _adapter_metadata(encoder), Path("<in memory>"))
    plain = plain_copy(encoder)
    dtype = next(plain.parameters()).dtype
    plain.float()
    add_deltas(plain, lora)
    return plain.to(dtype).requires_grad_(False)


def stack_loras(base: nn.Module, loras: Sequence[tuple[str | Path, float]]) -> nn.Module:
    """A plain fp32 copy of `base` with every (LoRA, scale) of `loras` added: diffusers' set_adapters in weight
    space (scale 1 = the LoRA as trained; 0.5 half its update; two styles summed)."""
    encoder = copy.deepcopy(base).float().requires_grad_(False)
    for path, scale in loras:
        lora = read_encoder_lora(path)
        n = add_deltas(encoder, lora, scale)
        logger.info("Applied the text-encoder LoRA %s x %g (%d layers)", lora.path, scale, n)
    return encoder


def parse_lora_stack(spec: str) -> list[tuple[str, float]] | None:
    """'a' / 'a:0.7' / 'a:0.7+b:0.5' -> [(path, scale), ...] when every part is an encoder LoRA; None when
    `spec` names something else (a full encoder folder or file). A path that exists is never split."""
    parts = [spec] if Path(spec).exists() else spec.split("+")
    stack = []
    for part in parts:
        path, scale = part, 1.0
        if not Path(part).exists() and ":" in part:
            head, _, tail = part.rpartition(":")
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass
        if find_encoder_lora(Path(path)) is None:
            if (len(parts) > 1 or path != spec) and not Path(path).exists():
                raise FileNotFoundError(f"'{spec}': '{path}' does not exist (expected a text-encoder LoRA folder or "
                                        "a run holding text_encoder_lora/)")
            if len(parts) > 1 or path != spec:
                raise ValueError(f"'{spec}': '{path}' is not a text-encoder LoRA; scales and '+' stacking apply to "
                                 f"LoRA folders (mix full encoders with weights instead)")
            return None
        stack.append((path, scale))
    return stack


def as_plain_encoder(encoder: nn.Module | EncoderLora, base: nn.Module) -> nn.Module:
    """A plain encoder for the layouts that hold full weights: adapters merged, an `EncoderLora` added to `base`."""
    if isinstance(encoder, EncoderLora):
        plain = copy.deepcopy(base).float().requires_grad_(False)
        add_deltas(plain, encoder)
        return plain
    return merged_encoder(encoder) if has_encoder_lora(encoder) else encoder


def read_lora_for_export(spec: str) -> EncoderLora:
    """The one encoder LoRA `spec` names, its scale folded into the up matrices (layout 'lora' writes it again)."""
    stack = parse_lora_stack(spec)
    if stack is None:
        raise ValueError(f"layout 'lora' needs a text-encoder LoRA; '{spec}' is a full encoder: export it with layout "
                         "'diffusers', 'pipeline' or 'single_file'")
    if len(stack) > 1:
        raise ValueError(f"'{spec}' stacks {len(stack)} LoRAs, and layout 'lora' writes one adapter: export the stack "
                         "merged (layout 'diffusers'), or load them together with set_adapters")
    path, scale = stack[0]
    lora = read_encoder_lora(path)
    if scale == 1.0:
        return lora
    state = {k: v * scale if k.endswith(_UP) else v for k, v in lora.state.items()}
    return EncoderLora(state, lora.metadata, lora.path)


def resolved_spec(spec: str) -> str:
    """`spec` with every path made absolute (what an image's settings record): 'a:0.5+b' -> '/abs/a:0.5+/abs/b:1'."""
    stack = parse_lora_stack(spec)
    if stack is None:
        return str(Path(spec).resolve())
    return "+".join(f"{Path(path).resolve()}:{scale:g}" for path, scale in stack)
