"""Fixtures of the reward tests; the helpers live in reward_fixtures.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reward_fixtures import write_tokenizer_files


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 20, 20, generator=g)
