"""`generate` PNGs carry their settings (read back with PIL), an image regenerates from them alone, and
`--grid` writes one contact sheet holding every image under its prompt."""
import json

import pytest
import torch
from PIL import Image

from textcraftor_fast import __version__, cli
from textcraftor_fast.reporting.images import MIN_CELL, PAD, contact_sheet, read_png_settings, save_png
from textcraftor_fast.inference import GRID_NAME
from textcraftor_fast.models import export_text_encoder

CONFIG = ["--config", "builtin:tiny"]
PROMPTS = ["a small red circle on black", "a large blue square on white", "a small green triangle on black"]


@pytest.fixture(scope="module")
def tuned_dir(tuned_tiny_world_encoder, tmp_path_factory):
    return export_text_encoder(tuned_tiny_world_encoder, tmp_path_factory.mktemp("tuned") / "text_encoder")


@pytest.fixture(scope="module")
def generated(tuned_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("generate")
    prompt_args = [arg for p in PROMPTS for arg in ("--prompt", p)]
    assert cli.main(["generate", *CONFIG, *prompt_args, "--steps", "4", "--seed", "11", "--switch-step", "2",
                     "--text-encoder", str(tuned_dir), "--weight", "0.5", "--grid", "--out", str(out)]) == 0
    return out, sorted(out.glob("0*.png"))


def _pixels(path) -> torch.Tensor:
    return torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.int32)


def test_every_png_records_its_settings(generated, tuned_dir):
    _, paths = generated
    assert len(paths) == 3
    for i, (path, prompt) in enumerate(zip(paths, PROMPTS)):
        text = Image.open(path).text  # what any PNG reader shows
        assert text["prompt"] == prompt
        assert json.loads(text["seed"]) == 11 + i
        assert json.loads(text["steps"]) == 4
        assert json.loads(text["guidance_scale"]) == 5.0  # configs/tiny.toml's sampler.guidance_scale
        assert json.loads(text["switch_step"]) == 2
        assert json.loads(text["weights"]) == [0.5]
        assert json.loads(text["text_encoders"]) == [str(tuned_dir.resolve())]
        assert text["timestep_spacing"] == "trailing"
        assert text["model"] == "tiny_world"
        assert text["software"] == f"textcraftor_fast {__version__}"


def test_an_image_regenerates_from_its_settings_alone(generated, tmp_path):
    # Image 2 was the third of one batch of three; alone, with its recorded seed, it starts from the same noise.
    _, paths = generated
    s = read_png_settings(paths[2])
    assert cli.main(["generate", *CONFIG, "--prompt", s["prompt"], "--seed", s["seed"], "--steps", s["steps"],
                     "--switch-step", s["switch_step"], "--text-encoder", *json.loads(s["text_encoders"]),
                     "--weight", str(json.loads(s["weights"])[0]), "--out", str(tmp_path)]) == 0
    again = _pixels(next(tmp_path.glob("0000_*.png")))
    # A batch of 1 may round a last bit differently from a batch of 3: at most one 8-bit level.
    assert (again - _pixels(paths[2])).abs().max() <= 1
    assert (_pixels(paths[1]) - _pixels(paths[2])).abs().max() > 10  # the check can tell images apart


def test_grid_holds_every_image_under_its_prompt(generated):
    out, paths = generated
    sheet = Image.open(out / GRID_NAME).convert("RGB")
    cell = MIN_CELL  # 32-pixel images scaled by 4
    assert sheet.width == 2 * (cell + PAD) + PAD  # 3 images: 2 columns, 2 rows
    row_pitch = (sheet.height - PAD) // 2  # image + label + padding
    for i, path in enumerate(paths):
        x, y = PAD + (i % 2) * (cell + PAD), PAD + (i // 2) * row_pitch
        expected = Image.open(path).convert("RGB").resize((cell, cell), Image.NEAREST)
        assert list(sheet.crop((x, y, x + cell, y + cell)).getdata()) == list(expected.getdata()), path
        label = sheet.crop((x, y + cell, x + cell, y + cell + 10)).convert("L")
        assert min(label.getdata()) < 128, f"no label text under image {i}"


def test_settings_round_trip_any_text(tmp_path):
    settings = {"prompt": "un cercle rouge \u2014 \u732b", "seed": 3, "weights": [0.25, 0.75]}
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", settings)
    read = read_png_settings(path)
    assert read["prompt"] == settings["prompt"]
    assert json.loads(read["seed"]) == 3 and json.loads(read["weights"]) == [0.25, 0.75]


def test_contact_sheet_needs_one_label_per_image():
    with pytest.raises(ValueError, match="one label per image"):
        contact_sheet([Image.new("RGB", (4, 4))], ["a", "b"])
