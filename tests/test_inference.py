"""Generation with a tuned encoder (switch step, interpolation, mixing) and export, through the CLI."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from textcraftor_fast import cli, load_config
from textcraftor_fast.training.trainer import train
from textcraftor_fast.inference import GenerateOptions, generate, mix_embeddings, resolve_switch_step
from textcraftor_fast.models import load_text_encoder
from textcraftor_fast.reporting.images import read_png_settings

CONFIG = ["--config", "configs/tiny_random.toml"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny_random.toml", [f'output.dir="{out}"', "train.steps=2", "optim.lr=1e-2",
                                                   "sampler.num_steps=4", "sampler.grad_steps=2",
                                                   "train.batch_size=1", "train.progress_bar=false"])
    return train(cfg)


def test_mix_embeddings_endpoints_and_mixing():
    base, a, b = torch.zeros(1, 2, 3), torch.ones(1, 2, 3), 3 * torch.ones(1, 2, 3)
    assert torch.equal(mix_embeddings(base, [a], [0.0]), base)
    assert torch.equal(mix_embeddings(base, [a], [1.0]), a)
    assert torch.allclose(mix_embeddings(base, [a, b], [0.5, 0.5]), 2 * torch.ones(1, 2, 3))


def test_interpolation_weight_zero_reproduces_the_base_model(tuned, tmp_path):
    model = load_config("configs/tiny_random.toml").model
    opts = GenerateOptions(num_steps=4, switch_step=0, weight=0.0, batch_size=2)
    prompts = ["a red circle", "a blue square"]
    base = generate(model, prompts, tmp_path / "base", [], None, opts, "cpu")
    zero = generate(model, prompts, tmp_path / "zero", [str(tuned.text_encoder)], None, opts, "cpu")
    full = generate(model, prompts, tmp_path / "full", [str(tuned.checkpoint)], [1.0], opts, "cpu")
    px = lambda p: torch.tensor(list(Image.open(p).getdata()), dtype=torch.float32)
    for b, z in zip(base, zero):
        assert torch.equal(px(b), px(z))
    assert any(not torch.equal(px(b), px(f)) for b, f in zip(base, full))  # lr 1e-2 moved the encoder


def test_cli_generate_and_export(tuned, tmp_path, capsys):
    assert cli.main(["generate", *CONFIG, "--prompt", "a cat", "--prompt", "a dog", "--steps", "3",
                     "--text-encoder", str(tuned.text_encoder), "--weight", "0.5", "--out", str(tmp_path / "img")]) == 0
    assert len(list((tmp_path / "img").glob("*.png"))) == 2
    assert cli.main(["export", *CONFIG, "--text-encoder", str(tuned.checkpoint), "--layout", "single_file",
                     "--out", str(tmp_path / "te.safetensors")]) == 0
    assert cli.main(["export", *CONFIG, "--text-encoder", str(tuned.checkpoint), "--out", str(tmp_path / "te")]) == 0
    a = load_text_encoder(tmp_path / "te").state_dict()
    b = load_text_encoder(tmp_path / "te.safetensors", config=load_text_encoder(tmp_path / "te").config).state_dict()
    c = load_text_encoder(tuned.text_encoder).state_dict()
    for key in c:
        assert torch.equal(a[key], c[key]) and torch.equal(b[key], c[key]), key
    assert cli.main(["generate", *CONFIG, "--out", str(tmp_path / "x")]) == 2
    assert "no prompts" in capsys.readouterr().err


def _pixels(paths) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).int() for p in paths])


@pytest.mark.parametrize("value,steps,step", [
    (0, 10, 0), (9, 10, 9), (0.0, 10, 0),
    (0.4, 25, 10),   # the paper's late switch: 10 of 25
    (0.4, 10, 4), (0.25, 10, 2), (0.99, 10, 9),  # floor(f * n): 2.5 -> 2, 9.9 -> 9
    (0.29, 100, 29),  # 0.29 * 100 is 28.999999999999996 in binary: the decimal is what counts
    (0.5, 1, 0),
])
def test_a_fraction_is_rounded_down_to_a_step_and_an_integer_is_that_step(value, steps, step):
    assert resolve_switch_step(value, steps) == step


@pytest.mark.parametrize("value,steps,message", [
    (10, 10, r"switch step 10 is outside 0\.\.9 for 10 DDIM steps: give a step in 0\.\.9"),
    (25, 25, r"switch step 25 is outside 0\.\.24 for 25 DDIM steps"),
    (-1, 10, r"switch step -1 is outside 0\.\.9"),
    (1.0, 10, r"switch step 1\.0 is a fraction of the steps outside \[0, 1\): give a step in 0\.\.9"),
    (float("nan"), 10, r"fraction of the steps outside \[0, 1\)"),
    (True, 10, r"neither a step nor a fraction"),
])
def test_a_switch_step_out_of_range_is_an_error_naming_the_valid_range(value, steps, message):
    with pytest.raises(ValueError, match=message):
        resolve_switch_step(value, steps)


def test_default_generate_is_a_drop_in_replacement(tuned, tmp_path):
    """By default the tuned encoder conditions every step: the pictures of a model whose own encoder IS the tuned
    one (no switch, no mixing: what an exported pipeline samples), not those of the paper's late switch."""
    model = load_config("configs/tiny_random.toml").model
    prompts = ["a red circle", "a blue square"]
    opts = GenerateOptions(num_steps=4, batch_size=2)
    default = generate(model, prompts, tmp_path / "default", [str(tuned.text_encoder)], None, opts, "cpu")
    replaced = dataclasses.replace(model, text_encoder_path=str(tuned.text_encoder))
    drop_in = generate(replaced, prompts, tmp_path / "drop_in", [], None, opts, "cpu")
    late = generate(model, prompts, tmp_path / "late", [str(tuned.text_encoder)], None,
                    dataclasses.replace(opts, switch_step=2), "cpu")
    assert torch.equal(_pixels(default), _pixels(drop_in))
    assert (_pixels(default) - _pixels(late)).abs().max() > 0  # the check tells the two options apart
    assert [json.loads(read_png_settings(p)["switch_step"]) for p in (default[0], late[0])] == [0, 2]


def test_cli_switch_step_as_a_fraction_or_a_step_and_out_of_range(tuned, tmp_path, capsys):
    args = ["generate", *CONFIG, "--prompt", "a cat", "--steps", "4", "--text-encoder", str(tuned.text_encoder)]
    assert cli.main([*args, "--switch-step", "0.6", "--out", str(tmp_path / "frac")]) == 0
    assert cli.main([*args, "--switch-step", "2", "--out", str(tmp_path / "step")]) == 0
    frac, step = (next((tmp_path / d).glob("*.png")) for d in ("frac", "step"))
    assert json.loads(read_png_settings(frac)["switch_step"]) == 2  # floor(0.6 * 4) = floor(2.4), in steps
    assert torch.equal(_pixels([frac]), _pixels([step]))
    capsys.readouterr()
    assert cli.main([*args, "--switch-step", "4", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "switch step 4 is outside 0..3 for 4 DDIM steps" in err and "fraction of the steps" in err
    assert not (tmp_path / "bad").exists()  # refused before any model is loaded or file written
    with pytest.raises(SystemExit):
        cli.main([*args, "--switch-step", "late"])
    assert "expected a step such as 10 or a fraction of the steps such as 0.4, got 'late'" in capsys.readouterr().err
