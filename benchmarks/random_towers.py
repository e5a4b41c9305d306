"""Random-weight models for the benchmarks and the baseline test, written where the real loaders read them, so a
benchmark loads its models exactly as a user's config does (no real weights exist here):
- `write_random_clip`: the real transformers CLIPModel class at a chosen size, as a reward folder (`path = <folder>`
  in a [[rewards]] entry). No tokenizer is written: the towers use the SD1.5 one shipped in the package (vocab
  49408, 77 positions), as the official code feeds every tower. `VIT_L14` is OpenAI CLIP ViT-L/14's shape.
- `write_random_sd15`: the exact SD1.5 architecture as one original-layout .safetensors file (`model.path`).
- `write_sd15_in_child`: both, with the ViT-L/14 tower's text half set to the SD1.5 file's text encoder, as for the
  published pair (SD1.5's text encoder is OpenAI CLIP ViT-L/14's text transformer).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# OpenAI CLIP ViT-L/14 (the SD1.5 text encoder's CLIP; the aesthetic predictor's tower): 428M parameters.
VIT_L14 = dict(width=1024, layers=24, heads=16, image_size=224, patch_size=14, embed_dim=768,
               text_width=768, text_layers=12, text_heads=12)


def write_random_clip(folder: Path, *, width: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32,
                      patch_size: int = 8, embed_dim: int = 32, text_width: int | None = None,
                      text_layers: int | None = None, text_heads: int | None = None, seed: int = 0,
                      text_from: torch.nn.Module | None = None) -> Path:
    """A CLIPModel with random weights, saved to `folder`: a vision tower of `width` x `layers` and a text tower
    of the same size unless `text_*` say otherwise; `text_from` (a CLIPTextModel) gives the text transformer its
    architecture and weights (`text_*` are then ignored)."""
    from transformers import CLIPConfig, CLIPModel

    def tower(w: int, n: int, h: int) -> dict:
        return dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=n, num_attention_heads=h,
                    projection_dim=embed_dim)

    text = tower(text_width or width, text_layers or layers, text_heads or heads)
    if text_from is not None:  # its architecture too (activation, pooling token), not only its sizes
        text = {**text_from.config.to_dict(), "projection_dim": embed_dim}
    config = CLIPConfig(text_config=dict(text, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tower(width, layers, heads), image_size=image_size, patch_size=patch_size),
                        projection_dim=embed_dim)
    with torch.random.fork_rng(devices=[]):  # a fixed tower without moving the caller's RNG stream
        torch.manual_seed(seed)
        model = CLIPModel(config)
    if text_from is not None:
        model.text_model.load_state_dict(getattr(text_from, "text_model", text_from).state_dict())
    model.save_pretrained(str(folder))
    return Path(folder)


def write_random_sd15(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float16,
                      tower: Path | None = None) -> Path:
    """Random weights in the exact SD1.5 architecture (UNet 859,520,964, VAE 83,653,863 and CLIP-L text encoder
    123,060,480 parameters), written as one original-layout .safetensors file in `dtype`; with `tower`, also a
    random ViT-L/14 CLIPModel folder whose text transformer is that file's text encoder (values as stored)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from textcraftor_fast.models import SD15_CONFIG_DIR, SDComponents, load_scheduler, load_tokenizer, save_single_file

    with torch.random.fork_rng(devices=[]), torch.device(device):  # init on a GPU: seconds, not a minute
        torch.manual_seed(0)
        comp = SDComponents(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet"))),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae"))),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder"))),
            tokenizer=load_tokenizer(), scheduler=load_scheduler())
    save_single_file(comp, path, dtype=dtype)
    if tower is not None:
        write_random_clip(tower, **VIT_L14, text_from=comp.text_encoder.to(dtype).float())  # as the file holds it
    return path


def write_sd15_in_child(model: Path, tower: Path | None = None) -> None:
    """`write_random_sd15(model)` (and a ViT-L/14 `write_random_clip(tower)`) in a child process: initialising 1.5B
    fp32 parameters grows a process by ~7 GB that glibc keeps, and a benchmark's parent process must stay small
    beside the arms it spawns (the official arm alone holds 16 GB; a 23 GB box ran out, measured)."""
    code = ("import sys; from pathlib import Path; from random_towers import write_random_sd15; "
            "write_random_sd15(Path(sys.argv[1]), tower=Path(sys.argv[2]) if len(sys.argv) > 2 else None)")
    args = [str(model), *([str(tower)] if tower is not None else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), *sys.path]))
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env)
