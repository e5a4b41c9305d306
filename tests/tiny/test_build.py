"""`python -m textcraftor_fast.tiny.build` is deterministic and writes a loadable SD-layout folder (tiny budget)."""
from __future__ import annotations

import json

from textcraftor_fast.tiny import build

ARGS = ["--vae-steps", "2", "--judge-steps", "2", "--unet-steps", "2", "--n-images", "64", "--judge-images", "64",
        "--eval-seeds", "0", "--threads", "1", "--held-out-seed", "5"]


def _tensor_bytes(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def test_build_is_deterministic_and_loadable(tmp_path, monkeypatch):
    from textcraftor_fast.tiny import data as D
    from textcraftor_fast.tiny.split import draw_held_out, read_held_out

    datasets = []  # captions of every dataset the build draws: the generator's first, then the judge's two
    real = D.make_dataset
    monkeypatch.setattr(D, "make_dataset", lambda caps, n, seed: datasets.append(caps) or real(caps, n, seed))
    a, b = tmp_path / "a", tmp_path / "b"
    build.main(["--out", str(a), *ARGS])
    # The split drawn from --held-out-seed is recorded, and the generator's images never show one of its pairs.
    held_out = read_held_out(a)
    assert held_out == draw_held_out(5) and json.loads((a / "build_info.json").read_text())["held_out"] == {
        "test": [f"{c} {s}" for c, s in held_out.test], "validation": [f"{c} {s}" for c, s in held_out.validation]}
    assert len(datasets[0]) == 144 and not {(c.colour, c.shape) for c in datasets[0]} & held_out.all_pairs
    assert len(datasets[1]) == 216  # the judge learns every caption
    build.main(["--out", str(b), *ARGS])
    ta, tb = _tensor_bytes(a), _tensor_bytes(b)
    assert ta.keys() == tb.keys() and len(ta) > 100
    assert all(ta[k].equal(tb[k]) for k in ta)
    index = json.loads((a / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["tokenizer"][1] == "CLIPTokenizer"

    from textcraftor_fast.tiny.world import load_judge, load_tiny_world

    comp = load_tiny_world(a)
    assert comp.tokenizer.model_max_length == comp.text_encoder.config.max_position_embeddings == 16
    assert set(load_judge(a).heads) == {"colour", "shape", "size", "background"}
