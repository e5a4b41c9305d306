"""Ctrl-C presses are counted as the OS delivered them (textcraftor_fast/training/signals.py), not as the times Python's
handler ran: two presses during one long C call run the handler once."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import Trainer
from textcraftor_fast.training.signals import DeliveredSignals


def _matmul_of(seconds: float) -> torch.Tensor:
    """A square matrix whose product with itself takes about `seconds` (one call: Python runs no signal handler
    until it returns)."""
    n = 256
    while True:
        a = torch.randn(n, n)
        t0 = time.perf_counter()
        a @ a
        took = time.perf_counter() - t0
        if took > 0.1:
            break
        n *= 2
    m = int(n * (seconds / took) ** (1 / 3))  # matmul time grows as n^3
    return torch.randn(m, m)


def _press_twice_during(call) -> list[float]:
    """Run `call()` while another thread sends this process SIGINT twice, 0.2 and 0.3 s in; the send times,
    after checking that both fell inside the call."""
    sent: list[float] = []

    def press_twice():
        for pause in (0.2, 0.1):
            time.sleep(pause)
            os.kill(os.getpid(), signal.SIGINT)
            sent.append(time.perf_counter())

    presser = threading.Thread(target=press_twice)
    presser.start()
    t0 = time.perf_counter()
    try:
        call()
    finally:
        t1 = time.perf_counter()
        presser.join()
    assert len(sent) == 2 and t0 < sent[0] and sent[1] < t1, "the premise: both presses during the one call"
    return sent


def _let_pending_handlers_run(done, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_two_presses_during_one_c_call_are_counted_twice():
    runs: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    torch.set_num_threads(1)
    a = _matmul_of(1.5)
    with DeliveredSignals() as delivered:
        signal.signal(signal.SIGINT, lambda signum, frame: runs.append(delivered.take(signum)))
        try:
            _press_twice_during(lambda: a @ a)
            _let_pending_handlers_run(lambda: sum(runs) >= 2)
        finally:
            signal.signal(signal.SIGINT, previous)
    assert runs == [2]  # one handler run for both presses, which counted both


def test_the_trainer_stops_at_once_on_two_presses_during_one_c_call(tmp_path):
    trainer = Trainer(load_config("configs/tiny_random.toml", [f'output.dir="{tmp_path}"', "train.progress_bar=false"]))
    torch.set_num_threads(1)
    a = _matmul_of(1.5)
    with pytest.raises(KeyboardInterrupt):
        with trainer.stop.installed():
            _press_twice_during(lambda: a @ a)
            _let_pending_handlers_run(lambda: False)
    assert not trainer.stop.requested  # no "finish the step first": the first run of the handler stopped


def test_off_the_main_thread_or_beside_another_wakeup_fd_it_counts_nothing_and_changes_nothing():
    seen: list[int] = []

    def in_thread():
        with DeliveredSignals() as delivered:
            seen.append(delivered.take(signal.SIGINT))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == [0]
    read, write = os.pipe()
    os.set_blocking(write, False)
    old = signal.set_wakeup_fd(write)
    try:
        with DeliveredSignals() as delivered:
            assert signal.set_wakeup_fd(write) == write  # still the other owner's
            assert delivered.take(signal.SIGINT) == 0
        assert signal.set_wakeup_fd(write) == write
    finally:
        signal.set_wakeup_fd(old)
        os.close(read)
        os.close(write)
