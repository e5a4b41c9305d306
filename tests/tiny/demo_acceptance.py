"""The demo's acceptance on the test split, measured as `make demo` measures it (shared by the
test_demo_acceptance_*.py files, one point each)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from textcraftor_fast.config import load_config
from textcraftor_fast.tiny.demo import run_demo


def assert_the_demo_passes(out_dir: Path, seed: int, threads: int) -> None:
    # The thread count is set inside the run: it changes float reduction orders, and with them the whole
    # fine-tuning trajectory, so each point is a different run of the robustness sweep (docs/tiny_world.md).
    report = run_demo(load_config("builtin:tiny", [f"seed={seed}"]), out_dir=out_dir, threads=threads)
    arm = report["arms"]["tuned"]
    if report["n_samples"] != 648 or arm["train_threads"] != threads:  # not the demo's measurement
        pytest.fail(f"measured {report['n_samples']} samples at {arm['train_threads']} threads, "
                    f"not 648 at {threads}")
    assert arm["verdict"]["passed"], json.dumps(arm["table"], indent=1)
