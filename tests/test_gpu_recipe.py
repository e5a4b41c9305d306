"""benchmarks/gpu_recipe.py (what benchmarks/gpu.sh runs on an H100/H200) runs end to end: its --smoke mode is the
same code on CPU with tiny models and tiny towers in every reward slot, so the GPU script cannot rot while no
GPU is at hand. Numbers from it mean nothing; the FLOP model is checked against paper/NOTES.md's figures."""
import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_recipe  # noqa: E402


def test_the_flop_model_gives_the_notes_totals_per_sample():
    # NOTES: one sample (25 steps, CFG, K = 5, every graph-carrying call checkpointed, frozen UNet and rewards, the
    # paper's towers: aesthetic ViT-L, PickScore and HPSv2 ViT-H, CLIP ViT-g) is about 65 TFLOP; the official code,
    # which also computes the UNet's weight gradients, about 73.5.
    towers = ["ViT-L-14", "ViT-H-14", "ViT-H-14", "ViT-g-14"]
    assert gpu_recipe.executed_gflop(25, 5, towers, 5, False, False) / 1e3 == pytest.approx(65, abs=1)
    assert gpu_recipe.executed_gflop(25, 5, towers, 5, False, True) / 1e3 == pytest.approx(73.5, abs=1)
    assert gpu_recipe.useful_gflop(25, 5, towers) < gpu_recipe.executed_gflop(25, 5, towers, 5, False, False)
    assert gpu_recipe.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and gpu_recipe.peak_tflops("cpu") is None


@pytest.mark.slow(minutes=2)
def test_the_gpu_script_runs_in_smoke_mode_on_cpu(tmp_path):
    assert gpu_recipe.main(["--out", str(tmp_path), "--smoke", "--rounds", "1"]) == 0
    result = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    step = {(r["arm"], r["batch"]): r for r in result["suites"]["step"]["rows"]}
    assert set(step) == {("baseline", 1), ("ours", 1), ("baseline", 2), ("ours", 2)}
    # The FLOP model's speed-up, by hand (GFLOP per sample, smoke: 4 DDIM steps, K = 2, one ViT-H-14 tower):
    #   useful   = 4 x 2 x 803 (CFG sampler forwards) + 2 x 2 x 929 (K input-gradient backwards) + 5063 (VAE
    #              forward+backward) + 2 x 335 (tower forward + input backward)           = 15873
    #   baseline = useful + 2 x 2 x 803 (the K checkpointed calls recomputed)
    #                     + 2 x 2 x 803 (UNet weight gradients, about a forward per call) = 22297
    #   ours     = useful: on CPU the budget keeps both graph-carrying UNet calls, the decoder and the tower
    #              plain, and the UNet is frozen                                           = 15873
    # so the baseline runs 22297 / 15873 = 1.4047x the work of ours for the same useful work.
    for batch in (1, 2):
        base, ours = step[("baseline", batch)], step[("ours", batch)]
        assert (base["plain_unet_calls"], base["vae"], base["towers_checkpointed"]) == (None, "False", False)
        assert (ours["plain_unet_calls"], ours["vae"], ours["towers_checkpointed"]) == (2, "False", False)
        assert base["useful_tflop_per_sample"] == ours["useful_tflop_per_sample"] == pytest.approx(15.873)
        assert (base["executed_tflop_per_sample"], ours["executed_tflop_per_sample"]) == pytest.approx((22.297, 15.873))
        assert base["executed_tflop_per_sample"] / ours["executed_tflop_per_sample"] == pytest.approx(1.4047, abs=1e-4)
        # The measured speed-up (a CPU time here, never gated) is the ratio of the two arms' median step times.
        for row in (base, ours):
            assert row["s_per_sample"] > 0 and row["speedup_vs_baseline"] == pytest.approx(
                statistics.median(base["times_s"]) / statistics.median(row["times_s"]), rel=1e-12)
    # The full recipe's towers by hand: 6424 + 3716 + 5063 + 2 x (162 + 335 + 335 + 534) = 17935 GFLOP per sample.
    assert all(r["useful_tflop_per_sample"] == pytest.approx(17.935) for r in result["suites"]["recipe"]["rows"])
    speed = {r["arm"]: r for r in result["suites"]["speed"]["rows"]}
    assert set(speed) == {"ours", "ours:channels_last", "ours:compile"}
    # each option's first-step encoder gradient against the plain arm's (fp32 here: the same to rounding)
    assert speed["ours"]["grad_cosine_vs_first_arm"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["grad_cosine_vs_first_arm"] > 0.9999 for r in speed.values())
    assert [r["batch"] for r in result["suites"]["recipe"]["rows"]] == [1, 2]
