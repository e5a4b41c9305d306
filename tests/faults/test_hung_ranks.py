"""A rank that hangs, under torchrun and under the deepspeed launcher (gloo, CPU): the other rank exits non-zero
within distributed.timeout_s plus a margin, with one line naming the setting and where the hung rank was; the
checkpoints written before are untouched, and the run resumes from the newest.

Faults are injected by tests/fault_worker.py (the CLI with one rank patched to sleep):
  hang-in-step   rank 1 sleeps inside step 3's forward; rank 0 waits in the gradient all-reduce
  hang-outside   rank 1 finishes step 3 and sleeps before its next collective; rank 0 waits at the checkpoint
"""
import pytest

from tests.faults.launch import (TIMEOUT_S, checkpoint_hashes, ended_at, launch_with_fault, resume_latest_one_process,
                                 started_at)

pytestmark = pytest.mark.slow(minutes=6)

WHERE = {"hang-in-step": "rank 1 was still at 'step 3: forward'",
         "hang-outside": "rank 1 was still at 'after step 3 (logging, evaluation, checkpoint)'"}


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("fault", ["hang-in-step", "hang-outside"])
def test_a_hung_rank_ends_the_others_within_the_timeout_and_the_run_resumes(tmp_path, launcher, fault):
    run = launch_with_fault(tmp_path, launcher, f"{fault}:1:3")
    assert run.returncode != 0
    # From the collective's own timeout (the CLI's line) or from the watchdog where the wait has none.
    errors = [line for line in run.stderr.splitlines()
              if line.startswith(("textcraftor-fast train: error: rank 0:", "textcraftor-fast: error: rank 0:"))]
    assert len(errors) == 1, run.stderr[-4000:]
    assert f"longer than distributed.timeout_s={TIMEOUT_S} s" in errors[0] and WHERE[fault] in errors[0], errors[0]
    assert "--resume latest" in errors[0]
    # Rank 0 gave up on the timeout: not before it, and not much after (it enters the collective a moment
    # after rank 1 starts sleeping; the margin covers that and the error's assembly).
    waited = ended_at(tmp_path, rank=0) - started_at(tmp_path)
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + 10, (waited, errors[0])
    # Every checkpoint that existed when rank 1 hung is byte for byte as it was, and they all verify.
    before = run.hashes_at_fault
    assert before, "no checkpoint was written before the fault"
    after = checkpoint_hashes(tmp_path / "run")
    assert {name: after[name] for name in before} == before
    resumed = resume_latest_one_process(tmp_path / "run")
    assert resumed.steps == max(int(name.split("-")[1]) for name in after) + 1
