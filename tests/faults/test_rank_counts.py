"""Resume on another rank count: a run saved on 1 rank continues on 3, then on 2, then on 1 again, under DeepSpeed
ZeRO-0, 1 and 2, with the global batch kept (6 = 1 x 6 = 3 x 2 = 2 x 3), and ends where an uninterrupted
one-process run of 8 steps ends.

Tolerance: the per-rank gradients are all-reduced in another grouping on 3 and 2 ranks, so sums differ in the last
bits, and AdamW turns such a difference in a gradient near its eps into an update difference of up to lr (1e-4):
`assert_same_training` (tests/test_distributed.py) allows at most 1 element in 10,000 past 1e-6 and none past
2 lr per step. A dropped shard, a wrong data cursor or optimizer state not carried over moves nearly every
element (a resume that restarts the optimizer state was tried: it fails here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.faults.launch import ROOT, free_port
from tests.test_distributed import _encoder, assert_same_training

pytestmark = pytest.mark.slow(minutes=5)

WORKER = str(ROOT / "tests" / "ds_worker.py")
STAGES = ("0", "1", "2")
GLOBAL_BATCH = 6
MORE = ["data.max_prompts=12"]  # 12 prompts: every rank count here splits an epoch evenly (2 global batches)


def _launch(nproc: int, out: Path, jobs: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_WORKER_GLOBAL_BATCH": str(GLOBAL_BATCH),
           "DS_WORKER_SET": ";".join(MORE),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), WORKER, str(out), *jobs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_saved_on_1_resumed_on_3_then_2_then_1_under_zero_0_1_2_equals_an_uninterrupted_run(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.ds_worker import BASE
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import train

    reference = train(load_config("configs/tiny_random.toml", BASE + MORE + [
        "train.steps=8", f"train.batch_size={GLOBAL_BATCH}", f'output.dir="{tmp_path / "reference"}"']))
    expected = _encoder(tmp_path / "reference" / "checkpoints" / "step-000008")
    losses = [m["loss"] for m in reference.history]

    out = tmp_path / "chain"
    _launch(1, out, [f"zero{s}:{s}:2" for s in STAGES])
    for nproc, start, end in ((3, 2, 4), (2, 4, 6), (1, 6, 8)):
        _launch(nproc, out, [f"zero{s}:{s}:{end}:{out / f'zero{s}' / 'checkpoints' / f'step-{start:06d}'}"
                             for s in STAGES])
    for stage in STAGES:
        info = json.loads((out / f"zero{stage}" / "rank0.json").read_text())
        assert info["world_size"] == 1
        assert info["losses"] == pytest.approx(losses, abs=1e-5), stage  # the whole history, through 3 resumes
        got = load_file(str(out / f"zero{stage}" / "rank0.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same_training(got[key], expected[key], f"ZeRO-{stage} {key}")
