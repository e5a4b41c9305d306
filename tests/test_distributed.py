"""Two ranks under torchrun (gloo on CPU): disjoint prompt shards, averaged gradients, rank-0 I/O."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_save(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "textcraftor_fast.cli",
           "train", "--config", "configs/tiny_random.toml"]
    for kv in ["train.steps=2", "sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1",
               f"output.dir={tmp_path}", "train.progress_bar=false", "distributed.timeout_s=120"]:
        cmd += ["--set", kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 2" in proc.stderr
    assert proc.stdout.count("checkpoint:") == 1  # only rank 0 reports (and writes)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["grad_norm"] > 0 for m in lines)
    assert (tmp_path / "checkpoints" / "step-000002" / "text_encoder" / "model.safetensors").is_file()
