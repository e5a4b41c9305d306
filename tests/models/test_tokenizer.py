"""The shipped SD1.5 CLIP tokenizer (converted from OpenAI's MIT BPE file) gives the standard ids offline."""
import json
import os
from pathlib import Path

import pytest

from textcraftor_fast.models import SD15_CONFIG_DIR, load_tokenizer
from textcraftor_fast.models.convert_bpe import write_tokenizer_folder

# `make test` downloads it (the Makefile's OPEN_CLIP_WHEEL); the test never imports open_clip.
OPEN_CLIP_WHEEL = Path(__file__).resolve().parents[2] / ".cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_standard_ids(tok):
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_pads_with_endoftext(tok):
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(ids[7:]) == {49407}
    assert tok.pad_token_id == 49407


def test_truncates_long_prompts(tok):
    ids = tok(" ".join(["cat"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_license_ships_with_vocab():
    folder = SD15_CONFIG_DIR / "tokenizer"
    assert "Copyright (c) 2021 OpenAI" in (folder / "LICENSE").read_text()
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408


def test_conversion_reproduces_shipped_files(tmp_path):
    """The whole shipped vocabulary (49,408 tokens) and merges, rebuilt from OpenAI's BPE file."""
    if not OPEN_CLIP_WHEEL.is_file():
        msg = f"{OPEN_CLIP_WHEEL} is missing: `make test` downloads it (pip download --no-deps open_clip_torch==3.3.0)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI must run the full-vocabulary check, never skip it
        pytest.skip(msg)
    out = write_tokenizer_folder(OPEN_CLIP_WHEEL, tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (SD15_CONFIG_DIR / "tokenizer" / name).read_bytes(), name
