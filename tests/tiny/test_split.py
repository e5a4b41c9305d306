"""A world's held-out split as data (tiny/split.py): the rule, the build's flags, the metadata round trip, the
shipped world's record, and the demo and build-time evaluation reading the split of the world they load."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from textcraftor_fast.tiny import build
from textcraftor_fast.tiny import data as D
from textcraftor_fast.tiny.split import HeldOut, draw_held_out, parse_pairs, read_held_out
from textcraftor_fast.tiny.world import WEIGHTS_DIR

# World 5's split as docs/tiny_world.md lists it (the pairs its results were measured on).
WORLD5_TEST = ["red circle", "cyan circle", "green square", "pink square", "blue triangle", "lime triangle"]
WORLD5_VALIDATION = ["purple circle", "navy circle", "orange square", "brown square", "yellow triangle",
                     "teal triangle"]
# Another split by the same rule, written by hand: red squares held out, red circles trained on.
OTHER_TEST = ["green circle", "blue circle", "red square", "yellow square", "purple triangle", "orange triangle"]
OTHER_VALIDATION = ["cyan circle", "pink circle", "brown square", "teal square", "lime triangle", "navy triangle"]


def _pairs(captions) -> set[tuple[str, str]]:
    return {(c.colour, c.shape) for c in captions}


def _world(folder: Path, test: list[str], validation: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build_info.json").write_text(json.dumps({"seconds": {}, "held_out": {"test": test,
                                                                                    "validation": validation}}))
    return folder


def test_shipped_world_records_world5_split():
    info = json.loads((WEIGHTS_DIR / "build_info.json").read_text())
    assert info["held_out"] == {"test": WORLD5_TEST, "validation": WORLD5_VALIDATION}
    held_out = read_held_out(WEIGHTS_DIR)
    assert [f"{c} {s}" for c, s in held_out.test] == WORLD5_TEST
    assert [f"{c} {s}" for c, s in held_out.validation] == WORLD5_VALIDATION


def test_shipped_prompt_files_are_the_shipped_split():
    # builtin:tiny_world[:test|:validation] read these files: they must be the shipped world's split.
    held_out = read_held_out(WEIGHTS_DIR)
    folder = Path(D.__file__).parent / "prompts"
    lines = {name: (folder / f"{name}.txt").read_text().splitlines() for name in ("train", "test", "validation")}
    assert len(lines["train"]) == 144 and len(lines["test"]) == len(lines["validation"]) == 36
    assert {f"{c.colour} {c.shape}" for c in map(D.parse_caption, lines["test"])} == set(WORLD5_TEST)
    assert {f"{c.colour} {c.shape}" for c in map(D.parse_caption, lines["validation"])} == set(WORLD5_VALIDATION)
    assert lines["train"] == [c.text for c in held_out.train_captions()]
    assert lines["test"] == [c.text for c in held_out.captions("test")]


def _check_rule(held_out: HeldOut) -> None:
    test, val = set(held_out.test), set(held_out.validation)
    assert len(test) == len(val) == 6 and not test & val
    assert Counter(c for c, _ in test | val) == Counter({c: 1 for c in D.COLOURS})  # every colour held out once
    for split in (test, val):
        assert Counter(s for _, s in split) == {"circle": 2, "square": 2, "triangle": 2}
    train = _pairs(held_out.train_captions())
    assert len(train) == 24 and not train & (test | val) and len(held_out.train_captions()) == 144
    assert {c for c, _ in train} == set(D.COLOURS) and {s for _, s in train} == set(D.SHAPES)


def test_drawn_splits_follow_the_rule():
    drawn = [draw_held_out(seed) for seed in range(200)]
    for held_out in drawn:
        _check_rule(held_out)
    assert draw_held_out(7) == draw_held_out(7)  # seeded
    assert len({h.to_json()["test"][0] for h in drawn}) > 6  # and not one fixed split


def test_world5_split_follows_the_rule():
    _check_rule(HeldOut(test=parse_pairs(WORLD5_TEST), validation=parse_pairs(WORLD5_VALIDATION)))


@pytest.mark.parametrize("test, validation, message", [
    (["red circle", "cyan circle", "green circle", "pink square", "blue triangle", "lime triangle"], WORLD5_VALIDATION,
     "2 pairs of every shape; it has 3 circle"),
    (["red circle", "cyan circle", "green square", "pink square", "blue triangle", "lime triangle"],
     ["red circle", "navy circle", "orange square", "brown square", "yellow triangle", "teal triangle"],
     "red is held out 2 times"),
    (WORLD5_TEST, WORLD5_TEST, "red is held out 2 times"),
    (["red hexagon"], WORLD5_VALIDATION, "'red hexagon' is not 'colour shape'"),
])
def test_splits_breaking_the_rule_are_refused(test, validation, message):
    with pytest.raises(ValueError, match=message):
        HeldOut(test=parse_pairs(test), validation=parse_pairs(validation))


def test_build_flags_name_or_draw_the_split():
    assert build._parse_args([]).held_out.to_json() == {"test": WORLD5_TEST, "validation": WORLD5_VALIDATION}
    args = build._parse_args(["--held-out-test", ",".join(OTHER_TEST),
                              "--held-out-validation", " , ".join(OTHER_VALIDATION)])
    # stored in shape-then-colour order, whatever order the flag gave
    assert args.held_out.to_json() == {"test": ["green circle", "blue circle", "red square", "yellow square",
                                                "purple triangle", "orange triangle"],
                                       "validation": OTHER_VALIDATION}
    drawn = build._parse_args(["--held-out-seed", "3"]).held_out
    _check_rule(drawn)
    assert drawn == draw_held_out(3) and drawn.to_json()["test"] != WORLD5_TEST


@pytest.mark.parametrize("argv, message", [
    (["--held-out-seed", "1", "--held-out-test", "red circle"], "--held-out-seed draws the split"),
    (["--held-out-test", ",".join(WORLD5_TEST)], "go together"),
    (["--held-out-test", "red hexagon", "--held-out-validation", "x"], "'red hexagon' is not 'colour shape'"),
    (["--held-out-test", ",".join(WORLD5_TEST), "--held-out-validation", ",".join(WORLD5_TEST)], "held out 2 times"),
])
def test_build_refuses_bad_split_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build._parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_metadata_round_trip(tmp_path):
    held_out = draw_held_out(11)
    (tmp_path / "build_info.json").write_text(json.dumps({"args": {}, "held_out": held_out.to_json()}, indent=2))
    assert read_held_out(tmp_path) == held_out


def test_a_world_without_a_recorded_split_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no build_info.json"):
        read_held_out(tmp_path)
    (tmp_path / "build_info.json").write_text(json.dumps({"args": {}, "seconds": {}}))
    with pytest.raises(ValueError, match="records no held-out split .key 'held_out'"):
        read_held_out(tmp_path)
    (tmp_path / "build_info.json").write_text(json.dumps({"held_out": {"test": WORLD5_TEST}}))
    with pytest.raises(ValueError, match="lacks validation"):
        read_held_out(tmp_path)


def _demo_config(*overrides: str):
    from textcraftor_fast.config import load_config

    return load_config("builtin:tiny", list(overrides))


def test_demo_evaluates_and_trains_on_the_split_of_the_world_it_loads(tmp_path):
    from textcraftor_fast.tiny.demo import eval_captions, for_world

    world = _world(tmp_path / "world", OTHER_TEST, OTHER_VALIDATION)
    cfg = _demo_config('model.kind="pretrained"', f'model.path="{world}"')
    fitted, held_out = for_world(cfg, tmp_path / "out")
    for split, names in (("test", OTHER_TEST), ("validation", OTHER_VALIDATION)):
        captions = eval_captions(split, held_out)
        assert len(captions) == 36 and {f"{c.colour} {c.shape}" for c in captions} == set(names)
    # training reads this world's training captions: red squares are held out here, red circles are not
    assert fitted.data.path == str(tmp_path / "out" / "prompts" / "train.txt")
    train = Path(fitted.data.path).read_text().splitlines()
    assert len(train) == 144 and "a small red square on black" not in train and "a small red circle on black" in train
    assert (tmp_path / "out" / "prompts" / "test.txt").read_text().splitlines() == [
        c.text for c in eval_captions("test", held_out)]
    assert [r.path for r in fitted.rewards if r.name == "tiny_alignment"] == [str(world)]  # this world's judge
    # a prompt file of the shipped world trains on red squares: refused for this world
    shipped_train = Path(D.__file__).parent / "prompts" / "train.txt"
    with pytest.raises(ValueError, match="trains on captions of pairs held out in the world at"):
        for_world(_demo_config('model.kind="pretrained"', f'model.path="{world}"', f'data.path="{shipped_train}"'),
                  tmp_path / "out2")


def test_demo_on_the_shipped_world_trains_on_the_same_lines_as_before(tmp_path):
    from textcraftor_fast.tiny.demo import eval_captions, for_world

    fitted, held_out = for_world(_demo_config(), tmp_path)
    shipped = Path(D.__file__).parent / "prompts"
    assert Path(fitted.data.path).read_bytes() == (shipped / "train.txt").read_bytes()
    assert [c.text for c in eval_captions("test", held_out)] == (shipped / "test.txt").read_text().splitlines()
    assert {f"{c.colour} {c.shape}" for c in eval_captions("test", held_out)} == set(WORLD5_TEST)


def test_demo_refuses_a_model_that_is_not_a_tiny_world(tmp_path):
    from textcraftor_fast.tiny.demo import for_world

    with pytest.raises(ValueError, match="is not a tiny world"):
        for_world(_demo_config('model.kind="tiny_random"'), tmp_path)


def test_build_time_accuracy_reads_the_split_it_is_given(monkeypatch):
    # The split plumbing only: no sampling (blank images), the real judge and caption parsing.
    from types import SimpleNamespace

    import torch

    from textcraftor_fast.tiny import evaluate as E
    from textcraftor_fast.tiny.world import load_judge

    seen: list[set] = []  # the pairs judged, call by call (test, validation, train)
    real = E.judge_samples

    def spy(judge, images, prompts):
        seen.append({(c.colour, c.shape) for c in map(D.parse_caption, prompts)})
        return real(judge, images, prompts)

    monkeypatch.setattr(E, "judge_samples", spy)
    monkeypatch.setattr(E, "conditioning", lambda *args, **kwargs: (None, None))
    def blank(comp, frozen, mixed, seeds, *args, **kwargs):
        return torch.zeros(len(seeds), 3, 32, 32)

    monkeypatch.setattr(E, "sample_world", blank)
    held_out = HeldOut(test=parse_pairs(OTHER_TEST), validation=parse_pairs(OTHER_VALIDATION))
    comp = SimpleNamespace(text_encoder=None, tokenizer=None)
    result = E.base_accuracy(comp, load_judge(), held_out, seeds_per_caption=1, guidance_scales=(5.0,))
    assert list(result) == ["test/cfg5.0", "validation/cfg5.0", "train/cfg5.0"]
    assert [result[k]["n"] for k in result] == [36, 36, 72]
    assert seen[0] == set(parse_pairs(OTHER_TEST)) and seen[1] == set(parse_pairs(OTHER_VALIDATION))
    assert len(seen) == 3 and seen[2] and not seen[2] & held_out.all_pairs
