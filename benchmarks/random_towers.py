"""Random-weight CLIP reward towers for the benchmarks and the baseline test: the real transformers CLIPModel
class at a chosen size, written as a folder the reward loaders read (`path = <folder>` in a [[rewards]] entry),
so a benchmark loads its towers exactly as a user's config does. No tokenizer is written: the towers use
the SD1.5 one shipped in the package (vocab 49408, 77 positions), as the official code feeds every tower.
"""
from __future__ import annotations

from pathlib import Path

import torch


def write_random_clip(folder: Path, *, width: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32,
                      patch_size: int = 8, embed_dim: int = 32, seed: int = 0) -> Path:
    """A CLIPModel (text and vision towers of `width` x `layers`) with random weights, saved to `folder`."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                 projection_dim=embed_dim)
    config = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
                        projection_dim=embed_dim)
    with torch.random.fork_rng(devices=[]):  # a fixed tower without moving the caller's RNG stream
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(folder))
    return Path(folder)
