"""The demo passes on the test split at another seed and the thread count users run (one of the robustness
sweep's ten points, docs/tiny_world.md)."""
import pytest

from tests.tiny.demo_acceptance import assert_the_demo_passes


@pytest.mark.slow(minutes=7)
def test_the_demo_passes_at_seed_1_on_two_threads(tmp_path):
    assert_the_demo_passes(tmp_path, seed=1, threads=2)
