"""One tiny random model, saved once per session as a diffusers folder and as an original-layout single file."""
from pathlib import Path

import pytest
import torch

from textcraftor_fast.models import SDComponents, build_tiny_random, save_components, save_single_file


@pytest.fixture(scope="session")
def tiny() -> SDComponents:
    return build_tiny_random(seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tiny, tmp_path_factory) -> Path:
    return save_components(tiny, tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_single_file(tiny, tmp_path_factory) -> Path:
    return save_single_file(tiny, tmp_path_factory.mktemp("tiny_single") / "model.safetensors")


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="session")
def assert_same_weights():
    """Every tensor of two modules' state dicts equal (same keys, dtypes and values)."""
    return _assert_same_weights
