"""Stopping on SIGINT/SIGTERM without losing a run (`StopOnSignals`), and counting the signals the OS delivers,
not the times Python's handler runs (`DeliveredSignals`).

CPython runs a Python-level signal handler between bytecodes of the main thread, once, however many times the
signal arrived meanwhile: two Ctrl-C presses during one long C call (an SD1.5 UNet call on CPU takes seconds, a
checkpoint's fsync can take a second) run the handler once, and the second press ("stop at once") was lost.
CPython's C-level handler also writes one byte per delivery to the wakeup fd (`signal.set_wakeup_fd`); reading
that pipe counts them. One way of losing a press remains out of any process's reach: the OS merges a signal sent
while the same one is still pending, before the process is scheduled.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
from types import TracebackType
from typing import Any, Iterator

logger = logging.getLogger(__name__)


class DeliveredSignals:
    """Inside the `with` block (main thread only), `take(signum)` says how many times `signum` was delivered
    since the last `take`. Counts nothing (take returns 0) off the main thread or when another wakeup fd is
    set (an asyncio loop's): that one is left in place."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._counts: collections.Counter[int] = collections.Counter()

    def __enter__(self) -> DeliveredSignals:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)  # set_wakeup_fd requires it: a signal handler must never block
        try:
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            previous = None
        if previous == -1:
            self._fds = (read, write)
            return self
        if previous is not None:  # another owner's (an asyncio loop's): put back
            signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fds is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._fds:
                os.close(fd)
            self._fds = None

    def take(self, signum: int) -> int:
        if self._fds is not None:
            while True:
                try:
                    data = os.read(self._fds[0], 512)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._counts.update(data)  # one byte per delivery: the signal's number
        return self._counts.pop(signum, 0)


class StopOnSignals:
    """Inside `installed()` (main thread), SIGINT or SIGTERM asks the loop to stop: it finishes the step, saves a
    checkpoint and returns (`requested`). A second Ctrl-C, maybe during the same long C call as the first (one
    handler run for both: `DeliveredSignals`), stops at once: a save in progress is abandoned in its temporary
    folder and the last complete checkpoint is untouched."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._delivered = DeliveredSignals()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and (self.signal is not None or self._delivered.take(signum) >= 2):
            logger.warning("Ctrl-C again: stopping at once, without saving (the last complete checkpoint is kept)")
            raise KeyboardInterrupt
        # Set before logging: a second signal arriving meanwhile runs this handler again inside the first.
        self.signal = signum
        logger.warning("Received signal %d: finishing this step, saving a checkpoint, then stopping (resume with "
                       "--resume latest; press Ctrl-C again to stop at once without saving)", signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignals]:
        previous = {}
        with DeliveredSignals() as self._delivered:
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
            try:
                yield self
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
