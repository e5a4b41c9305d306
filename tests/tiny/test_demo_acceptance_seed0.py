"""The demo passes on the test split at the shipped seed and the thread count CI pins (one of the robustness
sweep's ten points, docs/tiny_world.md)."""
import pytest

from tests.tiny.demo_acceptance import assert_the_demo_passes


@pytest.mark.slow(minutes=7)
def test_the_demo_passes_at_seed_0_on_one_thread(tmp_path):
    assert_the_demo_passes(tmp_path, seed=0, threads=1)
