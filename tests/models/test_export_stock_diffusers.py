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
STOCK_SCRIPT = Path(__file__).with_name("stock_diffusers_pipeline.py")


def ours(comp, tuned: torch.nn.Module, original: torch.nn.Module | None = None) -> torch.Tensor:
    """Our generate path's images, (N, 3, H, W) in [0, 1]: `tuned` conditions every step."""
    opts = GenerateOptions(num_steps=STEPS, guidance_scale=GUIDANCE, switch_step=0, weight=1.0, seed=SEED,
                           batch_size=len(PROMPTS))
    schedule = make_schedule(comp.scheduler.config, STEPS, timestep_spacing=opts.timestep_spacing)
    side = RESOLUTION // comp.vae_scale_factor
    return generate_images(comp.unet, comp.vae, comp.tokenizer, schedule, original or comp.text_encoder, [tuned],
                           [1.0], PROMPTS, opts, (comp.unet.config.in_channels, side, side), torch.device("cpu"))


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world  # short names: every test below takes both


@pytest.fixture(scope="module")
def tuned(tuned_tiny_world_encoder):
    return tuned_tiny_world_encoder


@pytest.fixture(scope="module")
def exports(world, tuned, tmp_path_factory):
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


def _ours_for(name: str, world, tuned, exports) -> torch.Tensor:
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
