"""The one-line errors for hung and lost ranks (parallel/distributed.py), without launching ranks: the places the
ranks reported, held in a real torch.distributed.HashStore, decide who is named; the watchdog ends a rank that made
no progress. The launched versions (torchrun, the deepspeed launcher) are tests/faults/ (`make test-faults`)."""
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from textcraftor_fast.parallel.distributed import (CollectiveFailure, DistInfo, Whereabouts, collectives_guarded)

GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv operation to complete"
GLOO_CLOSED = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43688"


def _where(rank: int, world: int, reported: dict[int, list[str]]) -> Whereabouts:
    """Rank `rank`'s Whereabouts in a `world`-rank job whose ranks reported the places in `reported` (in order)."""
    where = Whereabouts(DistInfo(rank=rank, world_size=world))
    where.store = dist.HashStore()
    for other, places in reported.items():
        if other != rank:
            where.store.set(f"textcraftor/where/{other}", f"{len(places)}|{places[-1]}")
    for place in reported[rank]:
        where.mark(place)
    return where


def _fails_with(where: Whereabouts, error: Exception) -> str:
    with pytest.raises(CollectiveFailure) as caught:
        with collectives_guarded(where.info, 15, where):
            raise error
    assert "\n" not in str(caught.value)
    return str(caught.value)


STEP = ["step 3: forward", "step 3: backward (gradient all-reduce)"]


def test_a_timeout_names_the_setting_and_the_rank_that_was_behind():
    where = _where(0, 3, {0: STEP, 1: STEP[:1], 2: STEP})
    message = _fails_with(where, RuntimeError(GLOO_TIMEOUT))
    assert message.startswith("rank 0: at 'step 3: backward (gradient all-reduce)' this rank waited longer than "
                              "distributed.timeout_s=15 s for the other ranks; rank 1 was still at 'step 3: forward' "
                              "[[gloo/transport"), message
    assert "rank 2" not in message and message.endswith("then run again with --resume latest")


def test_a_closed_connection_says_a_rank_is_gone_and_a_silent_rank_is_named():
    message = _fails_with(_where(1, 3, {1: STEP, 0: STEP}), RuntimeError(GLOO_CLOSED))
    assert "this rank lost its connection to another rank (its process ended or its node went down" in message
    assert "rank(s) 2 never reported" in message and "Connection closed by peer" in message


def test_other_errors_and_one_process_pass_through_unchanged():
    where = _where(0, 2, {0: STEP, 1: STEP[:1]})
    for error in (ValueError("bad shape"), RuntimeError("mat1 and mat2 shapes cannot be multiplied")):
        with pytest.raises(type(error)) as caught:
            with collectives_guarded(where.info, 15, where):
                raise error
        assert caught.value is error
    alone = Whereabouts(DistInfo())
    with pytest.raises(RuntimeError) as caught:
        with collectives_guarded(alone.info, 15, alone):
            raise RuntimeError(GLOO_TIMEOUT)
    assert type(caught.value) is RuntimeError  # nothing to name on one process


WATCHDOG = """
import time, torch.distributed as dist
from textcraftor_fast.parallel.distributed import DistInfo, Whereabouts, collectives_guarded
where = Whereabouts(DistInfo(rank=0, world_size=2))
where.store = dist.HashStore()
where.store.set("textcraftor/where/1", "1|step 3: forward")
where.mark("step 3: forward"); where.mark("step 3: backward (gradient all-reduce)")
with collectives_guarded(where.info, 2, where):
    time.sleep(60)  # a wait with no timeout of its own
"""


def test_the_watchdog_ends_a_rank_that_waits_longer_than_the_timeout():
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", WATCHDOG], capture_output=True, text=True, timeout=60)
    took = time.time() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("textcraftor-fast: error:")]
    assert lines == ["textcraftor-fast: error: rank 0: at 'step 3: backward (gradient all-reduce)' this rank made no "
                     "progress for longer than distributed.timeout_s=2 s; rank 1 was still at 'step 3: forward'. The "
                     "newest complete checkpoint is intact: fix the rank or raise distributed.timeout_s, then run "
                     "again with --resume latest"], proc.stderr[-2000:]
    assert took < 30  # after about 3 s (2 s and the 1 s poll), not the 60 s sleep nor the 30 s grace of a rank behind
