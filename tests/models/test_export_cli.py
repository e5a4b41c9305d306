"""`textcraftor-fast export --layout diffusers|pipeline|single_file [--full] [--dtype fp16]` on the tiny world:
each writes what it says, in the dtype asked for, and bad combinations fail with a one-line error."""
import copy
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.files import tree_hashes
from textcraftor_fast import cli
from textcraftor_fast.models import export_text_encoder, load_diffusers_folder, load_single_file, load_text_encoder
from textcraftor_fast.tiny.world import WEIGHTS_DIR

CONFIG = ["--config", "builtin:tiny"]


@pytest.fixture(scope="module")
def tuned_dir(tuned_tiny_world_encoder, tmp_path_factory):
    return export_text_encoder(tuned_tiny_world_encoder, tmp_path_factory.mktemp("tuned") / "text_encoder")


def _export(tuned_dir, out, *args) -> int:
    return cli.main(["export", *CONFIG, "--text-encoder", str(tuned_dir), "--out", str(out), *args])


def _rounded(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What an export in `dtype` holds, read back in fp32 as our loaders do."""
    return copy.deepcopy(module).to(dtype).to(torch.float32)


def _float_dtypes(path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(path)).values() if t.is_floating_point()}


@pytest.mark.parametrize("dtype_name,dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_diffusers_layout(tuned_dir, tuned_tiny_world_encoder, tmp_path, dtype_name, dtype, assert_same_weights):
    assert _export(tuned_dir, tmp_path / "te", "--layout", "diffusers", "--dtype", dtype_name) == 0
    assert _float_dtypes(tmp_path / "te" / "model.safetensors") == {dtype}
    assert_same_weights(_rounded(tuned_tiny_world_encoder, dtype), load_text_encoder(tmp_path / "te"))


@pytest.mark.parametrize("dtype_name,dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_pipeline_layout(tuned_dir, tuned_tiny_world_encoder, tiny_world, tmp_path, dtype_name, dtype,
                         assert_same_weights):
    out = tmp_path / "pipe"
    assert _export(tuned_dir, out, "--layout", "pipeline", "--dtype", dtype_name) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert _float_dtypes(out / part) == {dtype}, part
    comp = load_diffusers_folder(out)
    assert_same_weights(_rounded(tuned_tiny_world_encoder, dtype), comp.text_encoder)
    assert_same_weights(_rounded(tiny_world.unet, dtype), comp.unet)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # builtin:tiny's sampler.timestep_spacing, so stock diffusers samples the timesteps `generate` does.
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "trailing"


@pytest.mark.parametrize("dtype_name,dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_single_file_layouts(tuned_dir, tuned_tiny_world_encoder, tiny_world, tmp_path, dtype_name, dtype,
                             assert_same_weights):
    assert _export(tuned_dir, tmp_path / "te.safetensors", "--layout", "single_file", "--dtype", dtype_name) == 0
    keys = load_file(str(tmp_path / "te.safetensors"))
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert _float_dtypes(tmp_path / "te.safetensors") == {dtype}
    assert_same_weights(_rounded(tuned_tiny_world_encoder, dtype),
                        load_text_encoder(tmp_path / "te.safetensors", config=tiny_world.text_encoder.config))

    full = tmp_path / "full.safetensors"
    assert _export(tuned_dir, full, "--layout", "single_file", "--full", "--dtype", dtype_name) == 0
    assert _float_dtypes(full) == {dtype}
    comp = load_single_file(full, config_dir=WEIGHTS_DIR)
    assert_same_weights(_rounded(tuned_tiny_world_encoder, dtype), comp.text_encoder)
    assert_same_weights(_rounded(tiny_world.vae, dtype), comp.vae)


@pytest.mark.parametrize("args,message", [
    (["--layout", "pipeline", "--full"], "applies to layout 'single_file' only; layout 'pipeline' already writes"),
    (["--layout", "diffusers", "--full"], "applies to layout 'single_file' only; layout 'diffusers' writes the"),
    (["--layout", "pipeline"], "layout 'pipeline' writes a folder; got the file name"),
    (["--layout", "single_file", "--out-folder"], r"must end in \.safetensors"),
])
def test_bad_combinations_are_one_line_errors(tuned_dir, tmp_path, capsys, args, message):
    out = tmp_path / ("folder" if "--out-folder" in args else "x.safetensors")
    assert _export(tuned_dir, out, *[a for a in args if a != "--out-folder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textcraftor-fast export: error:") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_an_encoder_for_another_model_is_refused(tmp_path, capsys):
    from textcraftor_fast.models import build_tiny_random

    other = export_text_encoder(build_tiny_random(seed=0).text_encoder, tmp_path / "other")  # hidden 32, not 64
    assert _export(other, tmp_path / "pipe", "--layout", "pipeline") == 2
    assert "cross_attention_dim is 64" in capsys.readouterr().err
    assert not (tmp_path / "pipe").exists()


def test_exporting_over_the_base_model_is_refused(tuned_dir, tmp_path, capsys):
    base = shutil.copytree(WEIGHTS_DIR, tmp_path / "base")
    before = (base / "text_encoder" / "model.safetensors").read_bytes()
    assert cli.main(["export", *CONFIG, "--set", 'model.kind="pretrained"', "--set", f'model.path="{base}"',
                     "--text-encoder", str(tuned_dir), "--layout", "pipeline", "--out", str(base)]) == 2
    assert "is the base model" in capsys.readouterr().err
    assert (base / "text_encoder" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("layout,name", [("diffusers", "te"), ("pipeline", "pipe"), ("single_file", "te.safetensors")])
def test_a_disk_full_export_gives_one_error_and_keeps_the_earlier_export(tuned_dir, tmp_path, monkeypatch, capsys,
                                                                           layout, name):
    import errno

    from safetensors import torch as safetensors_torch

    out = tmp_path / name
    assert _export(tuned_dir, out, "--layout", layout) == 0
    earlier = tree_hashes(out) if out.is_dir() else out.read_bytes()
    real = safetensors_torch.save_file
    calls = []

    def fills_the_disk(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)  # the file is written, then the disk is full (as at an fsync)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", fills_the_disk)
    capsys.readouterr()
    assert _export(tuned_dir, out, "--layout", layout, "--dtype", "fp16") == 2
    err = capsys.readouterr().err
    assert calls, "the fault was never injected: the export writes through another function"
    assert err.count("\n") == 1 and "No space left on device" in err and "the earlier export is unchanged" in err, err
    assert (tree_hashes(out) if out.is_dir() else out.read_bytes()) == earlier  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left beside it


def test_an_export_into_a_folder_holding_other_files_is_refused_and_deletes_nothing(tuned_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _export(tuned_dir, out, "--layout", "diffusers") == 2
    err = capsys.readouterr().err
    assert "holds files this export does not write (notes.txt)" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
