"""Launching the tiny random world on two ranks with a fault injected (tests/fault_worker.py), and reading back what
happened: when the fault began, when each rank ended, what the checkpoints held."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.files import tree_hashes
from textcraftor_fast.parallel.deepspeed_engine import _free_port as free_port

ROOT = Path(__file__).parents[2]
WORKER = str(ROOT / "tests" / "fault_worker.py")
TIMEOUT_S = 15
SETTINGS = ["train.steps=6", "sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=1",
            "train.checkpointing_steps=1", "train.progress_bar=false", "data.max_prompts=8",
            f"distributed.timeout_s={TIMEOUT_S}"]


def env(marker: Path | None = None) -> dict[str, str]:
    found = {**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if marker is not None:
        found["FAULT_MARKER"] = str(marker)
    return found


def launcher_command(launcher: str, nproc: int = 2) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [sys.executable, str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port())]


def checkpoint_hashes(run: Path) -> dict[str, dict[str, str]]:
    """{step-NNNNNN: {file: sha256}} of every complete checkpoint folder."""
    return {folder.name: tree_hashes(folder) for folder in sorted((run / "checkpoints").glob("step-*"))}


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    hashes_at_fault: dict


def launch_with_fault(tmp_path: Path, launcher: str, fault: str, extra: list[str] = (), timeout: float = 300,
                      on_fault=None) -> Launch:
    """Train (tiny random, SETTINGS) on two ranks with `fault` (fault_worker.py's KIND:RANK:STEP) into
    tmp_path/run; the checkpoints' hashes are taken as the fault begins, then `on_fault(process)` runs if given."""
    marker = tmp_path / "fault"
    settings = [*SETTINGS, *extra, f"output.dir={tmp_path / 'run'}"]
    if launcher == "deepspeed":
        settings.append("distributed.backend=deepspeed")
    cmd = [*launcher_command(launcher), WORKER, fault, "train", "--config", "configs/tiny_random.toml"]
    for kv in settings:
        cmd += ["--set", kv]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env(marker), cwd=ROOT,
                                start_new_session=True)
        hashes = {}
        try:
            deadline = time.time() + timeout
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if marker.exists():
                hashes = checkpoint_hashes(tmp_path / "run")
                if on_fault is not None:
                    on_fault(proc)
            proc.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return Launch(proc.returncode, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text(), hashes)


def started_at(tmp_path: Path) -> float:
    return float((tmp_path / "fault").read_text().split()[0])


def ended_at(tmp_path: Path, rank: int) -> float:
    return float((tmp_path / f"fault.rank{rank}").read_text().split()[0])


def resume_latest_one_process(run: Path, steps_more: int = 1):
    """`--resume latest` in one process, `steps_more` steps past the newest checkpoint: the TrainResult."""
    from textcraftor_fast import load_config
    from textcraftor_fast.training.trainer import train

    latest = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    settings = [kv for kv in SETTINGS if not kv.startswith("train.steps=")]
    return train(load_config("configs/tiny_random.toml", settings + [
        f'output.dir="{run}"', 'train.resume_from_checkpoint="latest"', "distributed.backend=none",
        f"train.steps={latest + steps_more}"]))


def _processes() -> tuple[dict[int, int], dict[int, list[bytes]]]:
    """({pid: parent pid}, {pid: environment entries}) of every process this user can read (Linux /proc)."""
    parents, envs = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            envs[int(proc.name)] = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents, envs


def _descendants(root: int, parents: dict[int, int]) -> set[int]:
    found, grew = set(), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found | {root}} - found
        found |= more
        grew = bool(more)
    return found


def rank_pids(launcher_pid: int, rank: int) -> list[int]:
    """The worker of `rank` under a launcher (torchrun or the deepspeed launcher): the deepest descendant whose
    environment says RANK=`rank` (the workers may run in sessions of their own, so the tree is followed)."""
    parents, envs = _processes()
    ranked = {pid for pid in _descendants(launcher_pid, parents) if f"RANK={rank}".encode() in envs[pid]}
    return sorted(pid for pid in ranked if not any(parents.get(child) == pid for child in ranked))


def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process descending from it (a launcher and the workers it started in sessions of
    their own), as a machine going down would end them."""
    for pid in {root} | _descendants(root, _processes()[0]):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
