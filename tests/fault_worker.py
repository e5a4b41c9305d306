"""Run by tests/faults/ under torchrun or the deepspeed launcher (not collected by pytest): the CLI with one fault
injected into one rank.

Usage: fault_worker.py FAULT [--local_rank=N] CLI_ARGS...
FAULT (KIND:RANK:STEP):
  hang-in-step:R:S     rank R sleeps inside step S's forward (the others wait in the gradient all-reduce)
  hang-outside:R:S     rank R, having finished step S, sleeps before its next collective (the others wait at the
                       checkpoint barrier or in the next step's all-reduce)
  slow-save:0:S        rank 0 sleeps in the middle of writing checkpoint S (weights and optimizer written, the
                       manifest not), for the test to kill another rank then
  none:0:0             no fault
Each fault writes the file FAULT_MARKER (an environment variable) with the time it began, and each rank that returns
writes FAULT_MARKER.rank<R> with the time and its exit code, for the test to time the ranks that were not stuck.
"""
import os
import sys
import time
from pathlib import Path

from textcraftor_fast import cli
from textcraftor_fast.training import checkpoints, trainer

SLEEP_S = 3600


def _begin(what: str) -> None:
    marker = Path(os.environ["FAULT_MARKER"])
    marker.write_text(f"{time.time()} {what}\n")


def inject(kind: str, rank: int, step: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    if kind == "hang-in-step":
        forward = trainer.Trainer.forward

        def hanging_forward(self, prompts, k):
            if self.step + 1 == step:
                _begin(f"rank {rank} sleeps inside step {step}")
                time.sleep(SLEEP_S)
            return forward(self, prompts, k)

        trainer.Trainer.forward = hanging_forward
    elif kind == "hang-outside":
        report = trainer.Trainer._report

        def hanging_report(self, *args):
            report(self, *args)
            if self.step == step:
                _begin(f"rank {rank} sleeps after step {step}, outside any collective")
                time.sleep(SLEEP_S)

        trainer.Trainer._report = hanging_report
    elif kind == "slow-save":
        save_rng = checkpoints._save_rng

        def slow_save_rng(folder, rng):
            save_rng(folder, rng)
            if folder.name.endswith(f"step-{step:06d}"):
                _begin(f"rank 0 is writing checkpoint {step}")
                time.sleep(60)

        checkpoints._save_rng = slow_save_rng
    elif kind != "none":
        raise SystemExit(f"unknown fault {kind!r}")


def _ended(code: int) -> None:
    """When and how this rank ended, for the test to time the ranks that were not stuck."""
    Path(f"{os.environ['FAULT_MARKER']}.rank{os.environ.get('RANK', '0')}").write_text(f"{time.time()} {code}\n")


def main(argv: list[str]) -> int:
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    kind, rank, step = argv[0].split(":")
    inject(kind, int(rank), int(step))
    hard_exit = os._exit

    def timed_hard_exit(code):  # the watchdog's way out (parallel/distributed.py) skips everything else
        _ended(code)
        hard_exit(code)

    os._exit = timed_hard_exit
    code = cli.main(argv[1:])
    _ended(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
