"""Helpers for the reward tests (a uniquely named module, so it cannot clash with another conftest): tiny
same-class CLIP towers written to disk in the published layouts, and a tiny CLIP BPE tokenizer.

Everything is built here (no downloads, no dependence on the SD1.5 tokenizer shipped elsewhere) and small
enough that a whole reward runs in milliseconds on CPU.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from textcraftor_fast.rewards.openclip_convert import OpenClipArch, openclip_state_shapes  # noqa: E402

# OpenAI CLIP's normalisation, literal from clip/clip.py `_transform` (the towers' expected preprocessing).
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

VOCAB = 64  # 26 letters, 26 letters</w>, padding ids, then <|startoftext|>=62, <|endoftext|>=63 (the max id,
# as 49407 is in the real vocabulary: open_clip pools at tokens.argmax())


def tiny_arch(embed_dim: int = 8, quick_gelu: bool = False) -> OpenClipArch:
    return OpenClipArch("tiny", embed_dim=embed_dim, image_size=14, patch_size=7, vision_width=16, vision_layers=2,
                        vision_heads=2, vision_mlp=32, text_width=16, text_layers=2, text_heads=2, text_mlp=32,
                        context_length=12, vocab_size=VOCAB, quick_gelu=quick_gelu)


def random_openclip_state_dict(arch: OpenClipArch, with_text: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with open_clip's key names (norm weights near 1, the rest small)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in openclip_state_shapes(arch, with_text).items():
        t = torch.randn(shape, generator=g) * 0.2
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            t = 1.0 + 0.1 * t
        if key == "logit_scale":
            t = torch.tensor(4.6052)  # log(100), as trained CLIPs end up
        sd[key] = t
    return sd


def write_tokenizer_files(folder: Path) -> Path:
    import json

    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    for i in range(52, VOCAB - 2):
        vocab[f"<unused{i}>"] = i
    vocab["<|startoftext|>"] = VOCAB - 2
    vocab["<|endoftext|>"] = VOCAB - 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 12, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def save_hf_clip(folder: Path, arch: OpenClipArch, tokenizer_dir: Path | None, seed: int = 0) -> Path:
    """A transformers CLIPModel folder (config.json + model.safetensors [+ tokenizer]) of a tiny arch."""
    import shutil

    from textcraftor_fast.rewards.clip_tower import openclip_model_from_state_dict

    model = openclip_model_from_state_dict(random_openclip_state_dict(arch, seed=seed), "auto", True, "memory",
                                           quick_gelu=arch.quick_gelu, vision_heads=arch.vision_heads,
                                           text_heads=arch.text_heads)
    model.config.text_config.eos_token_id = VOCAB - 1  # the folder's own convention: first EOT id
    model.save_pretrained(str(folder))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


PROMPTS = ["a red cat", "a blue dog", "a red cat"]
