"""Bad input through the CLI: each case exits non-zero with one error line naming what was wrong, no
traceback, and leaves the checkpoints already saved byte-for-byte unchanged."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.files import tree_hashes
from textcraftor_fast import cli, load_config
from textcraftor_fast.training.trainer import train

CONFIG = "configs/tiny_random.toml"
FAST = ["sampler.num_steps=3", "sampler.grad_steps=1", "train.batch_size=1", "train.progress_bar=false",
        "data.max_prompts=4", "train.checkpointing_steps=1"]


@pytest.fixture(scope="module")
def precious(tmp_path_factory):
    """A run folder holding a real checkpoint that no bad input may touch."""
    out = tmp_path_factory.mktemp("precious")
    train(load_config(CONFIG, FAST + ["train.steps=1", f'output.dir="{out}"', "output.overwrite=true"]))
    return out


def _files(tmp_path):
    f = {}
    f["bad_toml"] = tmp_path / "bad.toml"
    f["bad_toml"].write_text('seed = 0\n[train\nsteps = 3\n')
    f["empty"] = tmp_path / "empty.txt"
    f["empty"].write_text("")
    f["blank"] = tmp_path / "blank.txt"
    f["blank"].write_text("\n  \n\t\n")
    f["binary"] = tmp_path / "image.txt"
    f["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    f["latin1"] = tmp_path / "latin1.txt"
    f["latin1"].write_bytes("a cat\na dog\nun caf\xe9\n".encode("latin-1"))
    f["nofield"] = tmp_path / "p.jsonl"
    f["nofield"].write_text('{"text": "a cat"}\n')
    f["badjson"] = tmp_path / "bad.jsonl"
    f["badjson"].write_text('{"prompt": "a cat"}\n{"prompt": \n')
    f["docx"] = tmp_path / "p.docx"
    f["docx"].write_text("a cat")
    f["garbage"] = tmp_path / "model.safetensors"
    f["garbage"].write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())
    f["wrong_arch"] = tmp_path / "wrong.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(f["wrong_arch"]))
    f["a_file"] = tmp_path / "regular_file"
    f["a_file"].write_text("not a folder")
    return f


# (case id, --set overrides or a callable(files) -> (config path, overrides, extra argv), expected text)
CASES = [
    ("unknown key", ["train.stepz=3"], "stepz"),
    ("wrong type", ["train.steps=many"], "train.steps"),
    ("zero steps", ["train.steps=0"], "train.steps"),
    ("negative lr", ["optim.lr=-1e-4"], "optim.lr"),
    ("K > steps", ["sampler.grad_steps=50"], "sampler.grad_steps"),
    ("CFG < 1", ["sampler.guidance_scale=0.5"], "sampler.guidance_scale"),
    ("bad choice", ["sampler.checkpoint=sometimes"], "sampler.checkpoint"),
    ("bad ops backend", ["ops.backend=cuda"], "ops.backend"),
    ("missing prompt file", ['data.path="no/such/prompts.txt"'], "does not exist"),
    ("empty prompt file", lambda f: ['data.path="%s"' % f["empty"]], "holds no prompts"),
    ("blank prompt file", lambda f: ['data.path="%s"' % f["blank"]], "holds no prompts"),
    ("binary prompt file", lambda f: ['data.path="%s"' % f["binary"]], "line 1 is not UTF-8"),
    ("non-UTF-8 line", lambda f: ['data.path="%s"' % f["latin1"]], "line 3 is not UTF-8"),
    ("jsonl without the field", lambda f: ['data.path="%s"' % f["nofield"]], "no field 'prompt'"),
    ("invalid jsonl", lambda f: ['data.path="%s"' % f["badjson"]], "line 2 is not valid JSON"),
    ("unsupported prompt format", lambda f: ['data.path="%s"' % f["docx"]], "unsupported extension"),
    ("missing model", ["model.kind=pretrained", 'model.path="no/such/sd15.safetensors"'], "does not exist"),
    ("garbage model file", lambda f: ["model.kind=pretrained", 'model.path="%s"' % f["garbage"]],
     "not a readable .safetensors"),
    ("wrong architecture", lambda f: ["model.kind=pretrained", 'model.path="%s"' % f["wrong_arch"]], "wrong.safetensors"),
    ("unknown reward", ['rewards=[{name="beauty"}]'], "beauty"),
    ("unwritable output dir", lambda f: ['output.dir="%s/sub"' % f["a_file"]], "cannot be created or written"),
]


def _run(capsys, config, overrides, argv=()):
    args = ["train", "--config", str(config)]
    for o in FAST + list(overrides):
        args += ["--set", o]
    rc = cli.main(args + list(argv))
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(case, overrides, expected, precious, tmp_path, capsys):
    before = tree_hashes(precious)
    files = _files(tmp_path)
    extra = overrides(files) if callable(overrides) else overrides
    # Every case points at the precious run and asks to resume it: a bad input must not write there.
    sets = [f'output.dir="{precious}"', *extra]
    rc, err = _run(capsys, CONFIG, sets, ["--resume", "latest"])
    errors = [line for line in err.splitlines() if line.startswith("textcraftor-fast train: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert tree_hashes(precious) == before


def test_toml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = _files(tmp_path)["bad_toml"]
    rc, err = _run(capsys, bad, [])
    assert rc == 2 and f"'{bad}' is not valid TOML" in err and "line 2" in err and "Traceback" not in err


def test_missing_config_file(capsys):
    rc, err = _run(capsys, "configs/no_such.toml", [])
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


def test_resume_from_something_that_is_not_a_checkpoint(tmp_path, capsys):
    rc, err = _run(capsys, CONFIG, [f'output.dir="{tmp_path / "out"}"'], ["--resume", str(tmp_path)])
    assert rc == 2 and "is not a checkpoint folder" in err and "Traceback" not in err


def test_resume_from_a_corrupted_checkpoint_copy(precious, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(precious / "checkpoints" / "step-000001", copy)
    (copy / "state.json").write_text('{"step": 999}')
    before = tree_hashes(precious)
    rc, err = _run(capsys, CONFIG, [f'output.dir="{tmp_path / "out"}"'], ["--resume", str(copy)])
    assert rc == 2 and "is not intact: state.json" in err and "Traceback" not in err
    assert tree_hashes(precious) == before


def test_non_utf8_lines_can_be_skipped_with_a_warning(tmp_path, caplog):
    import logging

    from textcraftor_fast.data import load_prompts

    path = _files(tmp_path)["latin1"]
    with caplog.at_level(logging.WARNING):
        assert load_prompts(str(path), on_bad_line="skip") == ["a cat", "a dog"]
    assert "skipped 1 line(s)" in caplog.text and "line 3" in caplog.text


def test_fewer_prompts_than_ranks_is_an_error_before_training():
    from textcraftor_fast.data import PromptStream

    with pytest.raises(ValueError, match="1 prompts cannot be sharded over 2 ranks"):
        PromptStream(["a cat"], batch_size=1, rank=1, world_size=2)
