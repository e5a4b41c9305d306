"""open_clip / OpenAI CLIP checkpoints -> transformers `CLIPModel`, by a key map checked against open_clip's source.

Why: `import open_clip` pulls torchvision, which does not import beside the CPU torch wheel, and the `hpsv2`
package cannot import offline. Every published tower we need (OpenAI ViT-L/14, LAION ViT-H-14 / ViT-g-14,
HPSv2's ViT-H-14) is the same pre-norm ViT + causal text transformer, which transformers' `CLIPModel`
implements, so we convert the weights once at load time instead of depending on open_clip.

open_clip layout (mlfoundations/open_clip `src/open_clip/model.py` class CLIP, `transformer.py`
VisionTransformer / ResidualAttentionBlock; OpenAI's `clip/model.py` writes the same names):
  visual.conv1.weight (W, 3, P, P)               visual.class_embedding (W,)
  visual.positional_embedding (G*G+1, W)        visual.ln_pre.{weight,bias}
  visual.transformer.resblocks.{i}.ln_1 / attn.in_proj_weight (3W, W) / attn.in_proj_bias (3W,) /
      attn.out_proj / ln_2 / mlp.c_fc (M, W) / mlp.c_proj (W, M)          (nn.MultiheadAttention: q, k, v stacked)
  visual.ln_post.{weight,bias}                  visual.proj (W, E)  used as x @ proj
  token_embedding.weight (V, Wt)                positional_embedding (L, Wt)
  transformer.resblocks.{i}.* (as above)        ln_final.{weight,bias}
  text_projection (Wt, E)  used as x @ proj     logit_scale ()
Non-parameters some writers add (`attn_mask`, OpenAI's `input_resolution`, `context_length`, `vocab_size`)
are dropped. Text pooling in open_clip is `tokens.argmax(-1)` (the first end-of-text id 49407), which
transformers reproduces with the legacy `eos_token_id=2` path. Sizes: open_clip `model_configs/*.json`,
checked against its `docs/model_profile.csv` parameter counts in the tests.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import Tensor

from ..config import ConfigError

# Keys that are not weights; written by some open_clip versions (attn_mask) and by OpenAI's state dict.
IGNORED_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class OpenClipArch:
    """One CLIP ViT architecture, in open_clip's terms (see model_configs/<name>.json)."""

    name: str
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = False
    """OpenAI's weights were trained with QuickGELU; LAION's ViT-H/g with exact GELU."""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


ARCHS: dict[str, OpenClipArch] = {
    # OpenAI ViT-L/14 (the aesthetic head's backbone): vision 1024x24 (head_width 64), text 768x12.
    "ViT-L-14": OpenClipArch("ViT-L-14", 768, 224, 14, 1024, 24, 16, 4096, 768, 12, 12, 3072, quick_gelu=True),
    # LAION ViT-H-14 (HPSv2, PickScore): vision 1280x32, head_width 80 -> 16 heads; text 1024x24.
    "ViT-H-14": OpenClipArch("ViT-H-14", 1024, 224, 14, 1280, 32, 16, 5120, 1024, 24, 16, 4096),
    # LAION ViT-g-14 (CLIP score in the paper): vision 1408x40, head_width 88, mlp_ratio 4.3637 -> 6144.
    "ViT-g-14": OpenClipArch("ViT-g-14", 1024, 224, 14, 1408, 40, 16, 6144, 1024, 24, 16, 4096),
}


def get_arch(name: str) -> OpenClipArch:
    if name not in ARCHS:
        raise ConfigError(f"unknown CLIP architecture '{name}'; valid: {', '.join(ARCHS)} or 'auto' "
                          "(inferred from the checkpoint's shapes)")
    return ARCHS[name]


def _block_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.ln_1.weight": (width,), f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.attn.in_proj_weight": (3 * width, width), f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width), f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,), f"{prefix}.ln_2.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (mlp, width), f"{prefix}.mlp.c_fc.bias": (mlp,),
        f"{prefix}.mlp.c_proj.weight": (width, mlp), f"{prefix}.mlp.c_proj.bias": (width,),
    }


def openclip_state_shapes(arch: OpenClipArch, with_text: bool = True) -> dict[str, tuple[int, ...]]:
    """The {key: shape} dict open_clip's `CLIP(...).state_dict()` holds for `arch` (see the module docstring)."""
    w, e = arch.vision_width, arch.embed_dim
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (arch.grid ** 2 + 1, w),
        "visual.proj": (w, e),
        "visual.conv1.weight": (w, 3, arch.patch_size, arch.patch_size),
        "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
    }
    for i in range(arch.vision_layers):
        shapes.update(_block_shapes(f"visual.transformer.resblocks.{i}", w, arch.vision_mlp))
    shapes.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)})
    if with_text:
        t = arch.text_width
        shapes.update({"positional_embedding": (arch.context_length, t), "text_projection": (t, e),
                       "logit_scale": (), "token_embedding.weight": (arch.vocab_size, t)})
        for i in range(arch.text_layers):
            shapes.update(_block_shapes(f"transformer.resblocks.{i}", t, arch.text_mlp))
        shapes.update({"ln_final.weight": (t,), "ln_final.bias": (t,)})
    return shapes


def clean_openclip_state_dict(sd: Mapping[str, Tensor], with_text: bool = True) -> dict[str, Tensor]:
    """Drop non-weight keys (and the text side when only the image tower is wanted)."""
    out = {k: v for k, v in sd.items() if k.split(".")[-1] not in IGNORED_KEYS}
    if not with_text:
        out = {k: v for k, v in out.items() if k.startswith("visual.")}
    return out


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _default_vision_heads(width: int) -> int:
    # OpenAI / open_clip B and L towers use 64-wide heads; LAION's H (80), g (88) and bigG (104) use 16 heads.
    return 16 if width in (1280, 1408, 1664) else max(1, width // 64)


def infer_arch(sd: Mapping[str, Tensor], with_text: bool = True, quick_gelu: bool = False,
               vision_heads: int | None = None, text_heads: int | None = None) -> OpenClipArch:
    """Read an architecture off an open_clip-layout state dict's shapes (head counts are not in the shapes:
    the defaults follow open_clip's configs; pass them for anything unusual)."""
    try:
        conv = sd["visual.conv1.weight"]
        w, p = conv.shape[0], conv.shape[-1]
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        embed = sd["visual.proj"].shape[1]
        v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        if with_text:
            vocab, t = sd["token_embedding.weight"].shape
            ctx = sd["positional_embedding"].shape[0]
            t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        else:
            vocab, t, ctx, t_mlp = 49408, 1, 77, 1
    except KeyError as e:
        raise ConfigError(f"cannot infer a CLIP ViT architecture: the checkpoint has no key {e} (is it an "
                          f"open_clip / OpenAI CLIP ViT state dict? first keys: {sorted(sd)[:5]})") from None
    return OpenClipArch(
        name="auto", embed_dim=embed, image_size=grid * p, patch_size=p, vision_width=w,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_heads=vision_heads or _default_vision_heads(w), vision_mlp=v_mlp,
        text_width=t, text_layers=_count_blocks(sd, "transformer.resblocks.") if with_text else 0,
        text_heads=text_heads or max(1, t // 64), text_mlp=t_mlp, context_length=ctx, vocab_size=vocab,
        quick_gelu=quick_gelu)


def is_openai_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """OpenAI's CLIP state dicts carry a top-level `input_resolution` entry (open_clip's and LAION's do not).
    Read it BEFORE `clean_openclip_state_dict`, which drops it with the other non-weight keys."""
    return "input_resolution" in sd


def resolve_arch(name: str, sd: Mapping[str, Tensor], with_text: bool, quick_gelu: bool | None = None,
                 vision_heads: int | None = None, text_heads: int | None = None,
                 openai: bool | None = None) -> OpenClipArch:
    """A named architecture (checked strictly later) or 'auto' (inferred); `quick_gelu` None keeps the default:
    the named arch's own, or for 'auto' QuickGELU exactly when the file is OpenAI's (`openai`, which callers
    read off the raw state dict with `is_openai_state_dict`; None reads it off `sd`)."""
    if name == "auto":
        openai = is_openai_state_dict(sd) if openai is None else openai
        qg = openai if quick_gelu is None else quick_gelu
        return infer_arch(sd, with_text, qg, vision_heads, text_heads)
    arch = get_arch(name)
    changes = {k: v for k, v in dict(quick_gelu=quick_gelu, vision_heads=vision_heads,
                                     text_heads=text_heads).items() if v is not None}
    return replace(arch, **changes) if changes else arch


def hf_clip_config(arch: OpenClipArch, with_text: bool = True):
    """The transformers CLIPConfig (or CLIPVisionConfig when with_text=False) of `arch`."""
    from transformers import CLIPConfig, CLIPVisionConfig

    act = "quick_gelu" if arch.quick_gelu else "gelu"  # open_clip's nn.GELU is the exact (erf) GELU
    vision = dict(hidden_size=arch.vision_width, intermediate_size=arch.vision_mlp,
                  num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                  image_size=arch.image_size, patch_size=arch.patch_size, hidden_act=act, layer_norm_eps=1e-5,
                  projection_dim=arch.embed_dim)
    if not with_text:
        return CLIPVisionConfig(**vision)
    text = dict(vocab_size=arch.vocab_size, hidden_size=arch.text_width, intermediate_size=arch.text_mlp,
                num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
                max_position_embeddings=arch.context_length, hidden_act=act, layer_norm_eps=1e-5,
                projection_dim=arch.embed_dim,
                # eos_token_id=2 selects transformers' legacy pooling `input_ids.argmax(-1)`: open_clip's own rule.
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.embed_dim)


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_DIRECT = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# Parameters used as `x @ P` in open_clip; nn.Linear stores the transpose.
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def _convert_block(tower: str, i: str, rest: str, v: Tensor) -> list[tuple[str, Tensor]]:
    base = f"{tower}.encoder.layers.{i}"
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_"):]  # weight | bias; nn.MultiheadAttention stacks q, k, v on dim 0
        q, k, val = v.chunk(3, dim=0)
        return [(f"{base}.self_attn.{n}_proj.{kind}", t.contiguous()) for n, t in (("q", q), ("k", k), ("v", val))]
    module, _, param = rest.rpartition(".")
    if module not in _BLOCK_MAP:
        raise ConfigError(f"open_clip key '{'visual.' if tower == 'vision_model' else ''}transformer.resblocks."
                          f"{i}.{rest}' has no transformers equivalent (layer scale / custom blocks are not supported)")
    return [(f"{base}.{_BLOCK_MAP[module]}.{param}", v)]


def openclip_to_transformers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and split / transpose) an open_clip-layout state dict into transformers CLIPModel keys."""
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        if key in _DIRECT:
            out[_DIRECT[key]] = v
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = v.t().contiguous()
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            out.update(_convert_block(tower, m.group(2), m.group(3), v))
        else:
            raise ConfigError(f"open_clip key '{key}' has no transformers CLIPModel equivalent")
    return out


_HF_BLOCK = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj")


def transformers_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `openclip_to_transformers`: transformers CLIPModel keys (or any subset of them, such as a
    CLIPTextModelWithProjection's) -> open_clip names, q/k/v stacked back into `attn.in_proj_*`."""
    direct = {v: k for k, v in _DIRECT.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK_MAP.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # open_clip in_proj name -> {"q": ..., "k": ..., "v": ...}
    for key, v in sd.items():
        if key in direct:
            out[direct[key]] = v
        elif key in transposed:
            out[transposed[key]] = v.t().contiguous()
        elif (m := _HF_BLOCK.match(key)) and (m.group(3) in block or _HF_QKV.fullmatch(m.group(3))):
            tower, i, module, param = m.groups()
            base = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{i}"
            if q := _HF_QKV.fullmatch(module):
                qkv.setdefault(f"{base}.attn.in_proj_{param}", {})[q.group(1)] = v
            else:
                out[f"{base}.{block[module]}.{param}"] = v
        else:
            raise ConfigError(f"transformers key '{key}' has no open_clip equivalent")
    for name, parts in qkv.items():
        if len(parts) != 3:
            raise ConfigError(f"open_clip's '{name}' stacks q, k and v; the state dict has only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def meta_openclip_state_dict(arch: OpenClipArch, with_text: bool = True) -> dict[str, Tensor]:
    """Meta tensors with open_clip's key names and shapes for `arch` (tests and docs; costs no memory)."""
    return {k: torch.empty(s, device="meta") for k, s in openclip_state_shapes(arch, with_text).items()}
