"""Random-weight models for the benchmarks and the baseline test, written where the real loaders read them, so a
benchmark loads its models exactly as a user's config does (no real weights exist here):
- `write_random_clip`: the real transformers CLIPModel class at a chosen size, as a reward folder (`path = <folder>`
  in a [[rewards]] entry). No tokenizer is written: the towers use the SD1.5 one shipped in the package (vocab
  49408, 77 positions), as the official code feeds every tower. `VIT_L14` is OpenAI CLIP ViT-L/14's shape.
- `write_random_sd15`: the exact SD1.5 architecture as one original-layout .safetensors file (`model.path`).
- `write_sd15_in_child`: both, with the ViT-L/14 tower's text half set to the SD1.5 file's text encoder, as for the
  published pair (SD1.5's text encoder is OpenAI CLIP ViT-L/14's text transformer).
- `write_random_sdxl` / `write_sdxl_in_child`: the exact SDXL base 1.0 architecture as a diffusers folder (the
  package's models/sdxl/ configs), with a ViT-L/14 tower whose text half is encoder 1.
"""
from __future__ import annotations

import json
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


# stabilityai/stable-diffusion-xl-base-1.0's configs (unet/, vae/, text_encoder/, text_encoder_2/ config.json), the
# fields that differ from the classes' defaults: used where the package's models/sdxl/ does not ship them.
SDXL_BASE: dict[str, dict] = {
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32),
    "vae": dict(sample_size=1024, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, scaling_factor=0.13025, force_upcast=True),
    "text_encoder": dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "text_encoder_2": dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                           bos_token_id=0, eos_token_id=2, pad_token_id=1),
}


def _sdxl_config(config_dir: Path, name: str) -> dict:
    shipped = config_dir / name / "config.json"
    return json.loads(shipped.read_text()) if shipped.is_file() else SDXL_BASE[name]


def write_random_sdxl(folder: Path, tower: Path | None = None, config_dir: Path | None = None,
                      dtype: torch.dtype = torch.float16) -> Path:
    """Random weights in the exact SDXL base 1.0 architecture (UNet 2,567,463,684, VAE 83,653,863, CLIP-L text
    encoder 123,060,480 and OpenCLIP bigG text encoder 694,659,840 parameters), written as a diffusers folder in
    `dtype` by the package's own `save_components`; tokenizers and scheduler from `config_dir` (default: the
    package's models/sdxl/). With `tower`, a random ViT-L/14 CLIPModel folder whose text transformer is encoder 1
    (SDXL's encoder 1 is CLIP ViT-L/14's text transformer), values as stored."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from textcraftor_fast.models import SDComponents, save_components
    from textcraftor_fast.models.conditioner import SDXLConditioner
    from textcraftor_fast.models.families import CONFIG_DIRS
    from textcraftor_fast.models.loading import family_tokenizer, load_scheduler

    config_dir = Path(config_dir or CONFIG_DIRS["sdxl"])
    # Each module is cast in place as soon as it is built: fp32 copies of all four (13.9 GB) beside the saving
    # copies ran a 23 GB box out of memory (measured).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(_sdxl_config(config_dir, "unet")).to(dtype)
        vae = AutoencoderKL.from_config(_sdxl_config(config_dir, "vae")).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(_sdxl_config(config_dir, "text_encoder"))).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_dict(_sdxl_config(config_dir, "text_encoder_2"))).to(dtype)
    comp = SDComponents(unet=unet, vae=vae, text_encoder=SDXLConditioner(text_encoder, text_encoder_2),
                        tokenizer=family_tokenizer(config_dir), scheduler=load_scheduler(config_dir / "scheduler"),
                        family="sdxl")
    save_components(comp, folder)
    if tower is not None:
        write_random_clip(tower, **VIT_L14, text_from=text_encoder.float())
    return Path(folder)


def write_sdxl_in_child(folder: Path, tower: Path | None = None) -> None:
    """`write_random_sdxl` in a child process (3.5B fp32 parameters: ~14 GB that glibc would keep in this one);
    the child reads the tokenizers and scheduler from this process's `CONFIG_DIRS['sdxl']`."""
    from textcraftor_fast.models.families import CONFIG_DIRS

    code = ("import sys; from pathlib import Path; from random_towers import write_random_sdxl; "
            "write_random_sdxl(Path(sys.argv[1]), Path(sys.argv[3]) if sys.argv[3] else None, Path(sys.argv[2]))")
    args = [str(folder), str(CONFIG_DIRS["sdxl"]), str(tower) if tower is not None else ""]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), *sys.path]))
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env)
