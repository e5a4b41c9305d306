"""`textcraftor-fast export --unet` (the UNet stage) on the tiny world: the LoRA again (layout lora, any dtype, alpha
kept), the merged UNet folder, a whole pipeline and single files with the tuned encoder and the merged UNet, and
combinations a layout cannot write refused in one line. (Stock diffusers loading each: test_export_stock_diffusers.)"""
import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from textcraftor_fast import cli
from textcraftor_fast.models import export_text_encoder, load_diffusers_folder, load_single_file
from textcraftor_fast.models.lora import merged_unet, save_lora
from textcraftor_fast.tiny.world import WEIGHTS_DIR

CONFIG = ["--config", "builtin:tiny"]


@pytest.fixture(scope="module")
def run_dir(tuned_tiny_world_encoder, tuned_tiny_world_lora, tmp_path_factory):
    """A folder laid out as a UNet-stage run leaves it: text_encoder/ and unet_lora/."""
    run = tmp_path_factory.mktemp("run")
    export_text_encoder(tuned_tiny_world_encoder, run / "text_encoder")
    save_lora(tuned_tiny_world_lora, run / "unet_lora")
    return run


@pytest.fixture(scope="module")
def merged(tuned_tiny_world_lora):
    return merged_unet(tuned_tiny_world_lora)


def _export(out, *args) -> int:
    return cli.main(["export", *CONFIG, "--out", str(out), *args])


def test_lora_layout_rewrites_the_lora_in_the_dtype_asked_for_and_keeps_alpha(run_dir, tmp_path):
    assert _export(tmp_path / "lora", "--unet", str(run_dir), "--layout", "lora", "--dtype", "fp16") == 0
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    source = load_file(str(run_dir / "unet_lora" / "pytorch_lora_weights.safetensors"))
    written = load_file(str(path))
    assert written.keys() == source.keys() and all(k.startswith("unet.") for k in written)
    assert all(torch.equal(written[k], source[k].half()) for k in written)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8.0)


def test_diffusers_layout_writes_the_merged_unet(run_dir, merged, tmp_path, assert_same_weights):
    from diffusers import UNet2DConditionModel

    assert _export(tmp_path / "unet", "--unet", str(run_dir / "unet_lora"), "--layout", "diffusers") == 0
    assert_same_weights(merged, UNet2DConditionModel.from_pretrained(tmp_path / "unet"))


def test_pipeline_and_single_files_hold_both_stages(run_dir, merged, tuned_tiny_world_encoder, tiny_world, tmp_path,
                                                    assert_same_weights):
    both = ["--text-encoder", str(run_dir), "--unet", str(run_dir)]
    assert _export(tmp_path / "pipe", *both, "--layout", "pipeline") == 0
    comp = load_diffusers_folder(tmp_path / "pipe")
    assert_same_weights(merged, comp.unet)
    assert_same_weights(tuned_tiny_world_encoder, comp.text_encoder)
    assert_same_weights(tiny_world.vae, comp.vae)

    assert _export(tmp_path / "parts.safetensors", *both, "--layout", "single_file") == 0
    prefixes = {k.split(".")[0] for k in load_file(str(tmp_path / "parts.safetensors"))}
    assert prefixes == {"cond_stage_model", "model"}  # the tuned parts only: no first_stage_model (VAE)

    assert _export(tmp_path / "full.safetensors", *both, "--layout", "single_file", "--full", "--dtype", "fp16") == 0
    comp = load_single_file(tmp_path / "full.safetensors", config_dir=WEIGHTS_DIR)
    assert_same_weights(copy.deepcopy(merged).half().float(), comp.unet)
    assert_same_weights(copy.deepcopy(tuned_tiny_world_encoder).half().float(), comp.text_encoder)


@pytest.mark.parametrize("args,message", [
    (["--unet", "RUN", "--text-encoder", "RUN", "--layout", "lora"], "layout 'lora' needs a text-encoder LoRA; .* is a "
                                                                     "full encoder"),
    (["--text-encoder", "RUN", "--layout", "lora"], "layout 'lora' needs a text-encoder LoRA"),
    (["--unet", "RUN", "--text-encoder", "RUN"], "layout 'diffusers' writes one component's folder"),
    (["--layout", "pipeline"], "nothing to export"),
    (["--unet", "RUN", "--full"], "layout 'diffusers' writes the merged UNet alone"),
    (["--unet", "MERGED", "--layout", "lora"], "layout 'lora' needs a LoRA-adapted UNet"),
    (["--unet", "NOWHERE"], "UNet path '.*NOWHERE' does not exist"),
])
def test_bad_combinations_are_one_line_errors(run_dir, tmp_path, capsys, args, message):
    merged_dir = tmp_path / "merged"
    if "MERGED" in args:
        assert _export(merged_dir, "--unet", str(run_dir)) == 0
        capsys.readouterr()
    paths = {"RUN": str(run_dir), "MERGED": str(merged_dir), "NOWHERE": str(tmp_path / "NOWHERE")}
    out = tmp_path / "out"
    assert _export(out, *[paths.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textcraftor-fast export: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()
