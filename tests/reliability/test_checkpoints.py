"""Checkpoint integrity: manifest, fallback of 'latest', corruption, truncation, strangers' pickles, failed saves."""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from tests.files import tree_hashes
from textcraftor_fast.training import checkpoints as ck
from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import train


def _tiny_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


def _save(out, step, enc=None):
    enc = enc or _tiny_encoder()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    enc(torch.randint(0, 100, (1, 8)))[0].sum().backward()
    opt.step()  # a non-empty optimizer state
    rng = {"torch": torch.get_rng_state(), "generator": torch.Generator().manual_seed(3).get_state(),
           "python": random.Random(5).getstate()}
    return ck.save_checkpoint(out, step, enc, opt, rng, {"data": {"epoch": 0}}, "seed = 0\n", keep=None)


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = _save(tmp_path, 1)
    entries = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = tree_hashes(path)
    on_disk.pop("manifest.json")
    assert set(entries) == set(on_disk) and set(ck.REQUIRED) <= set(entries)
    for rel, digest in on_disk.items():
        assert entries[rel] == {"size": (path / rel).stat().st_size, "sha256": digest}
    assert ck.verify_checkpoint(path) is None
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_rng_goes_through_safetensors_and_json_and_round_trips(tmp_path):
    path = _save(tmp_path, 1)
    assert not list(path.glob("*.pt")) or [p.name for p in path.glob("*.pt")] == ["optimizer.pt"]
    _, rng = ck.load_checkpoint(path, _tiny_encoder(), None)
    assert torch.equal(rng["generator"], torch.Generator().manual_seed(3).get_state())
    r = random.Random()
    r.setstate(rng["python"])
    assert r.random() == random.Random(5).random()


def test_truncated_newest_weights_make_latest_fall_back_with_a_warning(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="textcraftor_fast.training.checkpoints"):
        assert ck.resolve_checkpoint("latest", tmp_path).name == "step-000001"
    assert "step-000002" in caplog.text and "text_encoder/model.safetensors" in caplog.text
    with pytest.raises(ck.CheckpointError, match=r"step-000002.*not intact.*truncated"):
        ck.resolve_checkpoint(str(newest), tmp_path)


def test_one_flipped_byte_is_caught_by_the_manifest(tmp_path):
    path = _save(tmp_path, 1)
    f = path / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert "optimizer.pt does not match its sha256" in ck.verify_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="none of the 1 checkpoints"):
        ck.resolve_checkpoint("latest", tmp_path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what unpickling would run
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _Evil(marker), "param_groups": []}))
    ck._write_manifest(path)  # a consistent manifest: the file came from someone else, not from a bit flip
    assert ck.verify_checkpoint(path) is None
    with pytest.raises(ck.CheckpointError, match="not a plain optimizer state"):
        enc = _tiny_encoder()
        ck.load_checkpoint(path, enc, torch.optim.AdamW(enc.parameters()))
    assert not marker.exists()


def test_a_missing_file_makes_the_checkpoint_incomplete(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "rng.json").unlink()
    assert ck.verify_checkpoint(newest) == "rng.json is missing"
    assert ck.resolve_checkpoint("latest", tmp_path).name == "step-000001"
    with pytest.raises(ck.CheckpointError, match="incomplete: missing rng.json"):
        ck.load_checkpoint(newest, _tiny_encoder(), None)


@pytest.mark.parametrize("entry", ["../../../outside.txt", "ABSOLUTE", "text_encoder/../../../outside.txt",
                                   "LINK", "./rng.json"])
def test_a_manifest_naming_a_file_outside_the_folder_is_refused_before_reading_it(tmp_path, entry, monkeypatch):
    path = _save(tmp_path / "run", 1)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not a checkpoint file\n")
    if entry == "ABSOLUTE":
        entry = str(outside)
    if entry == "LINK":
        (path / "link.txt").symlink_to(outside)
        entry = "link.txt"
    manifest = json.loads((path / "manifest.json").read_text())
    # The right size and sha256: only where the entry points can give it away.
    manifest["files"][entry] = {"size": outside.stat().st_size,
                                "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    hashed = []
    monkeypatch.setattr(ck, "_sha256", lambda p: hashed.append(p) or "0" * 64)
    problem = ck.verify_checkpoint(path)
    assert problem is not None and repr(entry) in problem and "checkpoint folder" in problem, problem
    assert hashed == []  # refused before any file was read
    with pytest.raises(ck.CheckpointError, match="not intact"):
        ck.resolve_checkpoint(str(path), tmp_path / "run")


def test_a_failed_save_leaves_earlier_checkpoints_untouched(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    before = tree_hashes(first)
    import textcraftor_fast.models as models

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "export_text_encoder", disk_full)
    for step in (1, 2):  # re-saving the same step, and a new one
        with pytest.raises(OSError, match="No space left"):
            _save(tmp_path, step)
    assert tree_hashes(first) == before and ck.verify_checkpoint(first) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_a_resave_that_fails_at_the_rename_keeps_the_previous_version(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    before = tree_hashes(first)
    real = ck.os.replace

    def failing(src, dst):
        if f".tmp-{ck.os.getpid()}-step-" in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        _save(tmp_path, 1, _tiny_encoder())
    monkeypatch.setattr(ck.os, "replace", real)
    assert tree_hashes(first) == before and ck.verify_checkpoint(first) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def _restored(folder: Path) -> dict:
    """Everything a resume restores from checkpoint `folder`: weights, optimizer state, RNG and loop state."""
    from safetensors.torch import load  # from bytes: load_file's tensors map the file, which the test then cuts

    return {"weights": load((folder / "text_encoder" / "model.safetensors").read_bytes()),
            "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
            "rng": load((folder / "rng.safetensors").read_bytes()),
            **{name: json.loads((folder / name).read_text()) for name in ("rng.json", "state.json")}}


def _assert_bitwise(got, want, where="") -> None:
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            _assert_bitwise(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_bitwise(g, w, f"{where}[{i}]")
    elif torch.is_tensor(want):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        bits = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731 (-0.0 != 0.0, NaN == NaN)
        same = torch.equal(bits(got), bits(want))
        assert same, f"{where} differs: max |diff| {(got.double() - want.double()).abs().max().item():.3g}"
    else:
        assert got == want, where


def test_resume_latest_skips_a_corrupt_newest_and_continues_bit_for_bit(tmp_path, caplog):
    base = ["sampler.num_steps=3", "sampler.grad_steps=1", "train.batch_size=1", "train.progress_bar=false",
            "data.max_prompts=4", "train.checkpointing_steps=1", f'output.dir="{tmp_path}"']
    first = train(load_config("configs/tiny_random.toml", base + ["train.steps=2", "output.overwrite=true"]))
    newest = tmp_path / "checkpoints" / "step-000002"
    uninterrupted = _restored(newest)  # step 2 as the run made it, before its weights are cut
    weights = newest / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with caplog.at_level(logging.WARNING):
        result = train(load_config("configs/tiny_random.toml",
                                   base + ["train.steps=3", 'train.resume_from_checkpoint="latest"']))
    assert "skipping" in caplog.text and "step-000002" in caplog.text
    assert result.steps == 3 and [m["step"] for m in result.history] == [1, 2, 3]
    assert ck.verify_checkpoint(result.checkpoint) is None
    # Step 2 again, continued from step 1's checkpoint: the same weights, AdamW moments, RNG streams, data cursor
    # and logged metrics as the uninterrupted run's step 2, bit for bit.
    _assert_bitwise(_restored(newest), uninterrupted)
    timeless = lambda m: {k: v for k, v in m.items() if k != "s_per_step"}  # noqa: E731
    assert [timeless(m) for m in result.history[:2]] == [timeless(m) for m in first.history]


def test_a_disk_full_final_export_keeps_the_checkpoint_and_the_earlier_export(tmp_path, monkeypatch, capsys):
    import errno

    from textcraftor_fast import cli
    from textcraftor_fast.models import export as export_module

    args = ["train", "--config", "configs/tiny_random.toml", "--set", f'output.dir="{tmp_path}"', "--set",
            "sampler.num_steps=2", "--set", "sampler.grad_steps=1", "--set", "train.batch_size=1", "--set",
            "data.max_prompts=4", "--set", "train.progress_bar=false", "--set", "train.checkpointing_steps=1"]
    assert cli.main([*args, "--set", "train.steps=1"]) == 0
    earlier = tree_hashes(tmp_path / "text_encoder")
    real = export_module.save_text_encoder_folder

    def fills_the_disk(model, folder, dtype=None):
        real(model, folder, dtype)  # the whole folder is written, then the disk is full (as at a last fsync)
        if "checkpoints" not in Path(folder).parts:  # the checkpoint fits; the final export does not
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "save_text_encoder_folder", fills_the_disk)
    capsys.readouterr()
    assert cli.main([*args, "--set", "train.steps=2", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "step-000002' is intact" in err, err
    assert tree_hashes(tmp_path / "text_encoder") == earlier  # the earlier export, byte for byte
    assert ck.verify_checkpoint(tmp_path / "checkpoints" / "step-000002") is None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written export left
