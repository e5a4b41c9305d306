"""Generate with STOCK diffusers from exported files; run by test_export_stock_diffusers.py in a subprocess.

    python -I -S stock_diffusers_pipeline.py JOBS.json OUT_DIR SITE_DIR [SITE_DIR ...]

-I -S: no PYTHONPATH, no script folder on sys.path, and no .pth files, so the project's editable install
(a .pth import hook) is not active; only the SITE_DIRs (the venv's site-packages) are added. Nothing from
textcraftor_fast may be imported here: the report records whether it could have been.

Each job loads a pipeline one way (then LoRAs with `load_lora_weights`, and `set_adapters` for several), samples with a list of CPU generators seeded seed + i (diffusers then
draws sample i's noise from generator i) and saves the (N, 3, H, W) images in [0, 1] as OUT_DIR/<name>.pt.
"""
import json
import sys
from pathlib import Path


def _load(job):
    pipe = _load_pipeline(job)
    if job.get("lora"):  # a LoRA (the UNet's and/or the text encoder's), loaded as a diffusers user loads one
        pipe.load_lora_weights(job["lora"])
    if job.get("loras"):  # several, each a named adapter, weighted as diffusers' set_adapters does
        for spec in job["loras"]:
            pipe.load_lora_weights(spec["path"], adapter_name=spec["name"])
        pipe.set_adapters([spec["name"] for spec in job["loras"]], [spec["weight"] for spec in job["loras"]])
    return pipe


def _load_pipeline(job):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = torch.float32
    if job["load"] == "pretrained":
        return StableDiffusionPipeline.from_pretrained(job["path"], safety_checker=None, torch_dtype=dtype)
    if job["load"] == "pretrained_with_text_encoder":
        encoder = CLIPTextModel.from_pretrained(job["text_encoder"], dtype=dtype)
        return StableDiffusionPipeline.from_pretrained(job["path"], text_encoder=encoder, safety_checker=None,
                                                       torch_dtype=dtype)
    if job["load"] == "pretrained_with_unet":
        unet = UNet2DConditionModel.from_pretrained(job["unet"], torch_dtype=dtype)
        return StableDiffusionPipeline.from_pretrained(job["path"], unet=unet, safety_checker=None, torch_dtype=dtype)
    if job["load"] == "single_file":
        return StableDiffusionPipeline.from_single_file(job["path"], config=job["config"], safety_checker=None,
                                                        local_files_only=True, torch_dtype=dtype)
    if job["load"] == "merged_single_file":
        # What a user does with an encoder-only file: put its keys into the base checkpoint.
        from safetensors.torch import load_file, save_file

        merged = {**load_file(job["base_checkpoint"]), **load_file(job["path"])}
        path = Path(job["workdir"]) / "merged.safetensors"
        save_file(merged, str(path))
        return StableDiffusionPipeline.from_single_file(str(path), config=job["config"], safety_checker=None,
                                                        local_files_only=True, torch_dtype=dtype)
    raise ValueError(f"unknown load {job['load']!r}")


def _run(job, out_dir):
    import torch

    pipe = _load(job)
    pipe.set_progress_bar_config(disable=True)
    n = len(job["prompts"])
    generators = [torch.Generator().manual_seed(job["seed"] + i) for i in range(n)]
    images = pipe(job["prompts"], num_inference_steps=job["steps"], guidance_scale=job["guidance_scale"],
                  height=job["resolution"], width=job["resolution"], generator=generators, output_type="pt").images
    torch.save(images.float().cpu(), out_dir / f"{job['name']}.pt")
    return {"scheduler": type(pipe.scheduler).__name__, "timesteps": pipe.scheduler.timesteps.tolist(),
            "text_encoder_dtype": str(pipe.text_encoder.dtype)}


def main():
    jobs_path, out_dir, site_dirs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    sys.path.extend(site_dirs)
    import importlib.util

    report = {"textcraftor_fast_importable": importlib.util.find_spec("textcraftor_fast") is not None,
              "sys_path": sys.path, "jobs": {}}
    for job in json.loads(Path(jobs_path).read_text()):
        report["jobs"][job["name"]] = _run(job, out_dir)
    report["textcraftor_fast_imported"] = any(m.startswith("textcraftor_fast") for m in sys.modules)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
