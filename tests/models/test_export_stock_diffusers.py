"""Every export layout loads in STOCK diffusers and samples the images our `generate_images` does (to 1e-5).

A tuned encoder (the tiny world's, every weight perturbed with fixed noise: tests/conftest.py) is exported
in each layout; a subprocess with no project code importable (`python -I -S`, PYTHONPATH unset, cwd a tmp
dir, HF_HUB_OFFLINE=1; see stock_diffusers_pipeline.py) loads each with `StableDiffusionPipeline` (DDIM scheduler
from the folder, `safety_checker=None`) and samples with `generator=[Generator().manual_seed(seed + i)]`,
which is how our `generate_images` draws sample i's noise. Ours runs with switch_step=0 and weight 1, so the
tuned encoder conditions every step, as in the stock pipeline.

Single file: `StableDiffusionPipeline.from_single_file(path, config=<base folder>)` works offline with the
tiny architecture (diffusers 0.42: every config comes from the local folder, nothing is fetched), so the full
checkpoint is checked with it, and the encoder-only file by merging its keys into the base checkpoint, as a
user of an original-layout tool would. Our own single-file loader is checked too (identical weights and images).

UNet stage: a LoRA-adapted tiny-world UNet (tests/conftest.py) exported as a diffusers LoRA loads with stock
`pipe.load_lora_weights` (alone, and with the tuned encoder: both stages) and samples what our generate samples
with the adapted UNet; merged, it loads as a UNet folder, in a whole pipeline and in the full single file.
"""
import copy
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from textcraftor_fast.inference import GenerateOptions, generate_images
from textcraftor_fast.models import (build_tiny_random, export_tuned, load_diffusers_folder, load_single_file,
                                     save_single_file)
from textcraftor_fast.sampler import make_schedule
from textcraftor_fast.tiny.world import WEIGHTS_DIR

SEED, STEPS, GUIDANCE, RESOLUTION = 7, 4, 5.0, 32
PROMPTS = ["a small red circle on black", "a large blue triangle on white"]
TOL = 1e-5
STACK = (0.7, -0.6)  # set_adapters weights of the two stacked encoder LoRAs
STOCK_SCRIPT = Path(__file__).with_name("stock_diffusers_pipeline.py")


def ours(comp, tuned: torch.nn.Module | None, original: torch.nn.Module | None = None,
         unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Our generate path's images, (N, 3, H, W) in [0, 1]: `tuned` (None: the original) conditions every step,
    `unet` (None: the model's) denoises."""
    opts = GenerateOptions(num_steps=STEPS, guidance_scale=GUIDANCE, switch_step=0, weight=1.0, seed=SEED,
                           batch_size=len(PROMPTS))
    schedule = make_schedule(comp.scheduler.config, STEPS, timestep_spacing=opts.timestep_spacing)
    side = RESOLUTION // comp.vae_scale_factor
    encoders = [tuned] if tuned is not None else []
    return generate_images(unet if unet is not None else comp.unet, comp.vae, comp.tokenizer, schedule,
                           original or comp.text_encoder, encoders, [1.0] * len(encoders), PROMPTS, opts,
                           (comp.unet.config.in_channels, side, side), torch.device("cpu"))


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world  # short names: every test below takes both


@pytest.fixture(scope="module")
def tuned(tuned_tiny_world_encoder):
    return tuned_tiny_world_encoder


@pytest.fixture(scope="module")
def lora(tuned_tiny_world_lora):
    return tuned_tiny_world_lora


@pytest.fixture(scope="module")
def encoder_loras(world, make_encoder_lora):
    """Two encoder-stage LoRA results: rank 4, alpha 8 (a scale of 2) on attention and fc1; rank 2, alpha 2 on q, v."""
    return (make_encoder_lora(world.text_encoder, 2468, 4, 8.0, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1"), 0.3),
            make_encoder_lora(world.text_encoder, 1357, 2, 2.0, ("q_proj", "v_proj"), 0.3))


@pytest.fixture(scope="module")
def exports(world, tuned, lora, encoder_loras, tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    sd15_like = build_tiny_random(seed=0)  # SD1.5's scheduler config: 'leading' spacing unless the export says
    sd15_tuned = build_tiny_random(seed=5).text_encoder
    return {
        "diffusers": export_tuned(world, tuned, d / "text_encoder", "diffusers"),
        "pipeline": export_tuned(world, tuned, d / "pipeline", "pipeline", timestep_spacing="trailing"),
        "pipeline_fp16": export_tuned(world, tuned, d / "pipeline_fp16", "pipeline", dtype=torch.float16,
                                      timestep_spacing="trailing"),
        "single_file": export_tuned(world, tuned, d / "te.safetensors", "single_file"),
        "single_file_full": export_tuned(world, tuned, d / "full.safetensors", "single_file", full=True),
        "base_checkpoint": save_single_file(world, d / "base.safetensors"),
        "pipeline_sd15_scheduler": export_tuned(sd15_like, sd15_tuned, d / "sd15_pipeline", "pipeline",
                                                timestep_spacing="trailing"),
        "sd15_like": (sd15_like, sd15_tuned),
        "lora": export_tuned(world, None, d / "unet_lora", "lora", unet=lora),
        "unet_folder": export_tuned(world, None, d / "unet", "diffusers", unet=lora),
        "pipeline_both": export_tuned(world, tuned, d / "pipeline_both", "pipeline", timestep_spacing="trailing",
                                      unet=lora),
        "single_file_full_both": export_tuned(world, tuned, d / "full_both.safetensors", "single_file", full=True,
                                              unet=lora),
        # Encoder LoRA: alone, a second one to stack, both stages' LoRAs in one file, and merged into a folder.
        "encoder_lora": export_tuned(world, encoder_loras[0], d / "encoder_lora", "lora"),
        "encoder_lora_b": export_tuned(world, encoder_loras[1], d / "encoder_lora_b", "lora"),
        "both_lora": export_tuned(world, encoder_loras[0], d / "both_lora", "lora", unet=lora),
        "encoder_lora_merged": export_tuned(world, encoder_loras[0], d / "encoder_lora_merged", "diffusers"),
    }


def _jobs(exports, workdir: Path) -> list[dict]:
    common = dict(prompts=PROMPTS, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, resolution=RESOLUTION)
    base = str(WEIGHTS_DIR)
    specs = {
        "diffusers": dict(load="pretrained_with_text_encoder", path=base, text_encoder=str(exports["diffusers"])),
        "pipeline": dict(load="pretrained", path=str(exports["pipeline"])),
        "pipeline_fp16": dict(load="pretrained", path=str(exports["pipeline_fp16"])),
        "single_file": dict(load="merged_single_file", path=str(exports["single_file"]), config=base,
                            base_checkpoint=str(exports["base_checkpoint"]), workdir=str(workdir)),
        "single_file_full": dict(load="single_file", path=str(exports["single_file_full"]), config=base),
        "pipeline_sd15_scheduler": dict(load="pretrained", path=str(exports["pipeline_sd15_scheduler"])),
        # The UNet stage: the base pipeline (its scheduler config says 'trailing') + load_lora_weights.
        "lora": dict(load="pretrained", path=base, lora=str(exports["lora"])),
        "lora_with_text_encoder": dict(load="pretrained_with_text_encoder", path=base,
                                       text_encoder=str(exports["diffusers"]), lora=str(exports["lora"])),
        "unet_folder": dict(load="pretrained_with_unet", path=base, unet=str(exports["unet_folder"])),
        "pipeline_both": dict(load="pretrained", path=str(exports["pipeline_both"])),
        "single_file_full_both": dict(load="single_file", path=str(exports["single_file_full_both"]), config=base),
        "encoder_lora": dict(load="pretrained", path=base, lora=str(exports["encoder_lora"])),
        "encoder_lora_stacked": dict(load="pretrained", path=base, loras=[
            dict(path=str(exports["encoder_lora"]), name="a", weight=STACK[0]),
            dict(path=str(exports["encoder_lora_b"]), name="b", weight=STACK[1])]),
        "both_lora": dict(load="pretrained", path=base, lora=str(exports["both_lora"])),
        "encoder_lora_merged": dict(load="pretrained_with_text_encoder", path=base,
                                    text_encoder=str(exports["encoder_lora_merged"])),
    }
    return [dict(name=name, **spec, **common) for name, spec in specs.items()]


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


@pytest.fixture(scope="module")
def stock(exports, tmp_path_factory):
    """Run every job in ONE clean subprocess; returns (report, {job name: images})."""
    work = tmp_path_factory.mktemp("stock")
    jobs = work / "jobs.json"
    jobs.write_text(json.dumps(_jobs(exports, work)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
               DIFFUSERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run([sys.executable, "-I", "-S", str(STOCK_SCRIPT), str(jobs), str(work), *_site_dirs()],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    return report, {name: torch.load(work / f"{name}.pt") for name in report["jobs"]}


def test_the_subprocess_ran_without_project_code(stock):
    report, _ = stock
    assert not report["textcraftor_fast_importable"], report["sys_path"]
    assert not report["textcraftor_fast_imported"]


def test_the_tuned_encoder_changes_the_images(world, tuned):
    # Without this, exporting the base encoder by mistake could still match (the check would be vacuous).
    assert (ours(world, tuned) - ours(world, world.text_encoder)).abs().max() > 0.05


def _ours_for(name: str, world, tuned, exports, lora=None) -> torch.Tensor:
    if name in UNET_JOBS:
        from textcraftor_fast.models.lora import merged_unet

        # A LoRA job runs the adapters as trained (not merged); the other jobs hold the merged weights, which our
        # generate uses for them too (merged vs adapters: a separate test below).
        unet = lora if name.startswith("lora") else merged_unet(lora)
        return ours(world, None if name in ("lora", "unet_folder") else tuned, unet=unet)
    if name == "pipeline_sd15_scheduler":
        sd15_like, sd15_tuned = exports["sd15_like"]
        return ours(sd15_like, sd15_tuned)
    if name == "pipeline_fp16":
        # Our generate with what the fp16 export holds (fp16-rounded weights, run in fp32 as the stock job does).
        half = load_diffusers_folder(exports["pipeline_fp16"])
        return ours(half, half.text_encoder, original=world.text_encoder)
    return ours(world, tuned)


@pytest.mark.parametrize("name", ["diffusers", "pipeline", "pipeline_fp16", "single_file", "single_file_full",
                                  "pipeline_sd15_scheduler"])
def test_stock_diffusers_matches_our_generate(name, world, tuned, exports, stock):
    report, images = stock
    job = report["jobs"][name]
    expected = _ours_for(name, world, tuned, exports)
    assert job["scheduler"] == "DDIMScheduler"
    assert job["timesteps"] == [999, 749, 499, 249]  # trailing spacing, what our sampler uses
    assert images[name].shape == expected.shape == (len(PROMPTS), 3, RESOLUTION, RESOLUTION)
    diff = (images[name] - expected).abs().max().item()
    print(f"{name}: max |stock - ours| = {diff:.3g}")
    assert diff <= TOL, f"{name}: stock diffusers differs from our generate by {diff:.3g}"


def test_the_fp16_export_holds_the_tuned_encoder_in_fp16(tuned, exports, assert_same_weights):
    # The fp16 job above compares stock and ours on the same files; this says the files hold `tuned`.
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        tensors = load_file(str(exports["pipeline_fp16"] / part))
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, part
    half = load_diffusers_folder(exports["pipeline_fp16"]).text_encoder
    assert_same_weights(copy.deepcopy(tuned).half().float(), half)


def test_full_single_file_round_trips_through_our_loader(world, tuned, exports, assert_same_weights):
    comp = load_single_file(exports["single_file_full"], config_dir=WEIGHTS_DIR)
    assert_same_weights(tuned, comp.text_encoder)
    assert_same_weights(world.unet, comp.unet)
    assert_same_weights(world.vae, comp.vae)
    assert torch.equal(ours(comp, comp.text_encoder, original=world.text_encoder), ours(world, tuned))


UNET_JOBS = ["lora", "lora_with_text_encoder", "unet_folder", "pipeline_both", "single_file_full_both"]


def test_the_lora_changes_the_images(world, lora):
    assert (ours(world, None, unet=lora) - ours(world, None)).abs().max() > 0.05


@pytest.mark.parametrize("name", UNET_JOBS)
def test_stock_diffusers_with_a_tuned_unet_matches_our_generate(name, world, tuned, lora, exports, stock):
    report, images = stock
    expected = _ours_for(name, world, tuned, exports, lora)
    assert report["jobs"][name]["timesteps"] == [999, 749, 499, 249]
    assert images[name].shape == expected.shape == (len(PROMPTS), 3, RESOLUTION, RESOLUTION)
    diff = (images[name] - expected).abs().max().item()
    print(f"{name}: max |stock - ours| = {diff:.3g}")
    assert diff <= TOL, f"{name}: stock diffusers differs from our generate by {diff:.3g}"


def test_our_generate_with_the_exported_lora_matches_the_adapted_unet(world, lora, exports, tmp_path):
    from textcraftor_fast.inference import generate
    from textcraftor_fast.models.lora import load_unet
    from textcraftor_fast.config import ModelConfig
    from PIL import Image

    merged = load_unet(exports["lora"], world.unet)
    # W x + (alpha / r) B (A x) and (W + (alpha / r) B A) x differ by float rounding alone, which CFG 5 and four
    # steps amplify: measured 1e-6 to 3e-5 from run to run on this CPU (vectorised kernels round by alignment).
    assert (ours(world, None, unet=merged) - ours(world, None, unet=lora)).abs().max() <= 1e-4
    opts = GenerateOptions(num_steps=STEPS, guidance_scale=GUIDANCE, switch_step=0, seed=SEED)
    paths = generate(ModelConfig(kind="tiny_world", resolution=RESOLUTION), PROMPTS[:1], tmp_path, opts=opts,
                     device="cpu", unet=str(exports["lora"]))
    png = torch.tensor(list(Image.open(paths[0]).convert("RGB").getdata()), dtype=torch.float32)
    want = (ours(world, None, unet=lora)[0].permute(1, 2, 0).reshape(-1, 3) * 255).round()
    assert (png - want).abs().max() <= 1  # 8-bit PNG of the same image
    assert Image.open(paths[0]).text["unet"] == str(exports["lora"].resolve())


# ------------------------------------------------------------------------------------------- text-encoder LoRA
ENCODER_LORA_JOBS = ["encoder_lora", "encoder_lora_stacked", "both_lora", "encoder_lora_merged"]


def _generate_uint8(world, out: Path, text_encoder: str, unet: str | None = None) -> torch.Tensor:
    """Our `generate` (the CLI's function) from the exported files, read back from its PNGs: (N, 3, H, W) uint8."""
    import numpy as np
    from PIL import Image

    from textcraftor_fast.config import ModelConfig
    from textcraftor_fast.inference import generate

    opts = GenerateOptions(num_steps=STEPS, guidance_scale=GUIDANCE, switch_step=0, weight=1.0, seed=SEED,
                           batch_size=len(PROMPTS))
    paths = generate(ModelConfig(kind="tiny_world", resolution=RESOLUTION), PROMPTS, out, [text_encoder], opts=opts,
                     device="cpu", unet=unet)
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)  # what our PNG writer and diffusers' numpy_to_pil do


@pytest.mark.parametrize("name", ENCODER_LORA_JOBS)
def test_stock_load_lora_weights_samples_our_generates_images(name, world, exports, stock, tmp_path):
    report, images = stock
    folder = {"encoder_lora": exports["encoder_lora"], "both_lora": exports["both_lora"],
              "encoder_lora_merged": exports["encoder_lora_merged"],
              "encoder_lora_stacked": f"{exports['encoder_lora']}:{STACK[0]}+{exports['encoder_lora_b']}:{STACK[1]}"}
    unet = str(exports["both_lora"]) if name == "both_lora" else None
    ours_uint8 = _generate_uint8(world, tmp_path, str(folder[name]), unet)
    stock_uint8 = _to_uint8(images[name])
    assert report["jobs"][name]["timesteps"] == [999, 749, 499, 249]
    # Stock diffusers runs the adapters unmerged (W x + s B A x), ours the merged weights ((W + s B A) x): the same
    # numbers up to float32 rounding, which can move a pixel across a rounding boundary of the uint8 image.
    off = (ours_uint8.int() - stock_uint8.int()).abs()
    print(f"{name}: {int((off > 0).sum())} of {off.numel()} uint8 values differ, by at most {int(off.max())}")
    assert int(off.max()) <= 1 and int((off > 0).sum()) <= off.numel() // 1000, name
    base_uint8 = _to_uint8(ours(world, None))
    assert (stock_uint8.int() - base_uint8.int()).abs().max() > 10  # the LoRA changes the images


def test_the_encoder_lora_export_holds_the_text_encoder_keys_diffusers_expects(exports):
    from safetensors import safe_open

    with safe_open(str(exports["both_lora"] / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    prefixes = {k.split(".", 1)[0] for k in keys}
    assert prefixes == {"text_encoder", "unet"}
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys if k.startswith("text_encoder"))
    assert metadata["text_encoder.lora_alpha"] == 8.0 and metadata["unet.lora_alpha"] == 8.0
