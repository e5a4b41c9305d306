"""`evaluate` with tuned UNets (the UNet stage): base, encoder-only, UNet-only and both stages in one paired table;
each entry samples with its own UNet and encoder and nothing else, and `compare` gives the paired difference
between two entries."""
from __future__ import annotations

import pytest
import torch

from textcraftor_fast import cli
from textcraftor_fast.config import load_config
from textcraftor_fast.evaluation import EvalOptions, Tuned, evaluate
from textcraftor_fast.evaluation.core import sample_set
from textcraftor_fast.inference import conditioning
from textcraftor_fast.models import export_text_encoder
from textcraftor_fast.models.lora import merged_unet, save_lora
from tests.evaluation.by_hand import paired_row

FAST = dict(prompts="builtin:tiny_world", max_prompts=2, seeds_per_prompt=1, batch_size=2, grid_prompts=2,
            progress=False, switch_steps=())


@pytest.fixture(scope="module")
def cfg():
    return load_config("builtin:tiny")


@pytest.fixture(scope="module")
def runs(tuned_tiny_world_encoder, tuned_tiny_world_lora, tmp_path_factory):
    """Run folders as the two stages leave them: enc/ (text_encoder/), unet_only/ (unet_lora/), both/ (both)."""
    root = tmp_path_factory.mktemp("runs")
    export_text_encoder(tuned_tiny_world_encoder, root / "enc" / "text_encoder")
    save_lora(tuned_tiny_world_lora, root / "unet_only" / "unet_lora")
    export_text_encoder(tuned_tiny_world_encoder, root / "both" / "text_encoder")
    save_lora(tuned_tiny_world_lora, root / "both" / "unet_lora")
    return root


@pytest.fixture(scope="module")
def result(cfg, runs, tmp_path_factory):
    entries = [Tuned.from_folder(runs / name) for name in ("enc", "unet_only", "both")]
    return evaluate(cfg, entries, tmp_path_factory.mktemp("eval"),
                    EvalOptions(**FAST, weights=(0.0, 1.0), compare=(("both", "enc"),)))


def test_run_folders_are_read_as_what_they_hold(runs):
    assert Tuned.from_folder(runs / "enc") == Tuned(str(runs / "enc" / "text_encoder"), None, "enc")
    assert Tuned.from_folder(runs / "unet_only") == Tuned(None, str(runs / "unet_only" / "unet_lora"), "unet_only")
    assert Tuned.from_folder(runs / "unet_only" / "unet_lora").label == "unet_only"
    with pytest.raises(FileNotFoundError, match="holds neither a text encoder"):
        Tuned.from_folder(runs)


def test_each_entry_samples_with_its_own_unet_and_encoder(cfg, runs, result, tiny_world, tuned_tiny_world_lora,
                                                          tuned_tiny_world_encoder, tmp_path):
    s = result.scores
    # The encoder-only entry is what evaluate always measured for an encoder path: same per-sample scores.
    alone = evaluate(cfg, [str(runs / "enc" / "text_encoder")], tmp_path, EvalOptions(**FAST, weights=()))
    for metric in alone.scores["enc"]:
        assert torch.equal(s["enc"][metric], alone.scores["enc"][metric]), metric
    # At w = 0 the both-stages entry is the original encoder with the tuned UNet: the UNet-only entry exactly.
    for metric in s["original"]:
        assert torch.equal(s["both w=0"][metric], s["unet_only"][metric]), metric
        assert torch.equal(s["both w=1"][metric], s["both"][metric]), metric
    assert not torch.equal(s["unet_only"]["reward"], s["original"]["reward"])
    # The pictures of the UNet-only entry are the merged LoRA's, conditioned by the original encoder.
    from textcraftor_fast.sampler import make_schedule, sample_images

    from textcraftor_fast.evaluation.prompts import eval_prompts

    prompts, seeds = sample_set(eval_prompts("builtin:tiny_world", max_prompts=2), 1)  # the grid's samples
    schedule = make_schedule(tiny_world.scheduler.config, cfg.sampler.num_steps, 0.0, cfg.sampler.timestep_spacing)
    frozen, _ = conditioning(tiny_world.text_encoder, [], [], tiny_world.tokenizer, prompts)
    want = sample_images(merged_unet(tuned_tiny_world_lora), tiny_world.vae, schedule, seeds, (4, 16, 16), frozen, None,
                         cfg.sampler.guidance_scale, 0)
    assert torch.equal(s["unet_only"]["images"], (want * 255).round().to(torch.uint8))


def test_the_hand_formula_on_a_worked_example():
    # d = [2, 3, 0, 3]: mean 2, squares of deviations 0 + 1 + 4 + 1 = 6, sd = sqrt(6 / 3) = sqrt(2),
    # half-width 1.96 * sqrt(2) / 2 = 1.385929...; before [1, 2, 4, 5]: mean 3, sd sqrt(10 / 3);
    # after [3, 5, 4, 8]: mean 5, sd sqrt(14 / 3).
    row = paired_row([3.0, 5.0, 4.0, 8.0], [1.0, 2.0, 4.0, 5.0])
    assert row == pytest.approx({"n": 4, "before": 3.0, "before_hw": 1.789227, "after": 5.0, "after_hw": 2.117042,
                                 "diff": 2.0, "half_width": 1.385929, "lo": 0.614071, "hi": 3.385929}, abs=1e-6)


def test_one_table_and_the_paired_comparison_between_entries(result):
    assert set(result.table) == {"enc", "unet_only", "both"}
    assert result.curves["unet_only"] == {"weight": [], "switch_step": []}  # no tuned encoder to interpolate
    s = result.scores
    for metric, row in result.pairs["both vs enc"].items():  # after = both, before = enc, sample by sample
        want = paired_row(s["both"][metric], s["enc"][metric])
        assert row == pytest.approx(want, rel=1e-12, abs=1e-12), metric
    assert result.pairs["both vs enc"]["reward"]["n"] == 2
    md = result.files["markdown"].read_text()
    assert "| metric | original | enc | unet_only | both |" in md and "### both vs enc" in md
    assert "| metric | enc | both | paired diff both - enc [95% CI] |" in md
    assert any(line.startswith("both vs enc,reward,") for line in result.files["csv"].read_text().splitlines())


def test_cli_takes_models_in_order_and_refuses_unknown_comparisons(runs, tmp_path, capsys):
    base = ["evaluate", "--config", "builtin:tiny", "--max-prompts", "2", "--weights", "none", "--switch-steps", "none",
            "--text-encoder", str(runs / "enc" / "text_encoder"), "--model", str(runs / "unet_only"),
            "--name", "E", "--name", "U", "--out", str(tmp_path)]
    assert cli.main(base + ["--compare", "U:E"]) == 0
    out = capsys.readouterr().out
    assert "| metric | original | E | U |" in out and "### U vs E" in out
    assert cli.main(base + ["--compare", "U:X"]) == 2
    assert "compare: each pair names two evaluated models (original, E, U)" in capsys.readouterr().err
