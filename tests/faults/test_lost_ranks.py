"""A rank that dies while rank 0 writes a checkpoint (torchrun and the deepspeed launcher), and two nodes simulated
on loopback: the same training as one node with two ranks, and a node that dies ends the other with a clear error."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.faults.launch import (ROOT, SETTINGS, WORKER, checkpoint_hashes, env, free_port, launch_with_fault,
                                 kill_tree, rank_pids, resume_latest_one_process)
from textcraftor_fast.training import checkpoints as ck

pytestmark = [pytest.mark.slow(minutes=5),
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes through /proc")]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_rank_killed_while_rank_0_writes_a_checkpoint_leaves_the_previous_one_and_resumes(tmp_path, launcher):
    def kill_rank_1(proc):
        victims = rank_pids(proc.pid, 1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)

    run = launch_with_fault(tmp_path, launcher, "slow-save:0:3", on_fault=kill_rank_1)
    assert run.returncode != 0
    before = run.hashes_at_fault
    assert sorted(before) == ["step-000001", "step-000002"], sorted(before)
    after = checkpoint_hashes(tmp_path / "run")
    assert {name: after[name] for name in before} == before  # byte for byte
    # Checkpoint 3 was being written when the job ended: it is either absent under its name or complete.
    for name in after:
        assert ck.verify_checkpoint(tmp_path / "run" / "checkpoints" / name) is None, name
    resumed = resume_latest_one_process(tmp_path / "run")
    assert resumed.steps == max(int(name.split("-")[1]) for name in after) + 1


def _node(rank: int, port: int, out: Path, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
           "--nproc_per_node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", WORKER, "none:0:0", "train",
           "--config", "configs/tiny_random.toml"]
    for kv in [*SETTINGS, "train.steps=3", f"output.dir={out}", *extra]:
        cmd += ["--set", kv]
    log = open(out.parent / f"{out.name}-node{rank}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env(out.parent / "marker"),
                            cwd=ROOT, start_new_session=True)


def _one_node_two_ranks(out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           WORKER, "none:0:0", "train", "--config", "configs/tiny_random.toml"]
    for kv in [*SETTINGS, "train.steps=3", f"output.dir={out}"]:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(out.parent / "marker"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_nodes_on_loopback_train_as_one_node_with_two_ranks(tmp_path):
    port = free_port()
    nodes = [_node(rank, port, tmp_path / "two_nodes") for rank in (0, 1)]
    codes = [node.wait(timeout=300) for node in nodes]
    assert codes == [0, 0], (tmp_path / "two_nodes-node0.log").read_text()[-3000:]
    assert "world_size=2" in (tmp_path / "two_nodes-node0.log").read_text()
    _one_node_two_ranks(tmp_path / "one_node")
    # The same ranks, the same data shards and noise rows, the same two-term all-reduce: the same bits.
    got = load_file(str(tmp_path / "two_nodes" / "text_encoder" / "model.safetensors"))
    expected = load_file(str(tmp_path / "one_node" / "text_encoder" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for key in got:
        assert (got[key] == expected[key]).all(), key


def test_a_node_that_dies_ends_the_other_with_a_clear_error(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    nodes = [_node(rank, port, out, ["train.steps=50"]) for rank in (0, 1)]
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-000002").exists() and time.time() < deadline:
            assert all(node.poll() is None for node in nodes), (tmp_path / "run-node0.log").read_text()[-3000:]
            time.sleep(0.2)
        kill_tree(nodes[1].pid)  # node 1: its launcher and its worker, as a machine going down
        died_at = time.time()
        code = nodes[0].wait(timeout=120)
    finally:
        for node in nodes:
            kill_tree(node.pid)
    log = (tmp_path / "run-node0.log").read_text()
    assert code != 0
    assert time.time() - died_at < 60  # at once on the closed connection, not after a long timeout
    errors = [line for line in log.splitlines() if "error: rank 0:" in line]
    assert len(errors) == 1, log[-3000:]
    assert "lost its connection to another rank" in errors[0] and "--resume latest" in errors[0], errors[0]
    for folder in (out / "checkpoints").glob("step-*"):
        assert ck.verify_checkpoint(folder) is None, folder
