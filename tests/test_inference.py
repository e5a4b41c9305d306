"""Generation with a tuned encoder (switch step, interpolation, mixing) and export, through the CLI."""
import pytest
import torch
from PIL import Image

from textcraftor_fast import cli, load_config
from textcraftor_fast.training.trainer import train
from textcraftor_fast.inference import GenerateOptions, generate, mix_embeddings
from textcraftor_fast.models import load_text_encoder

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
