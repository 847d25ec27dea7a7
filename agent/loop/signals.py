"""Stopping the loop cleanly: SIGTERM and SIGINT ask it to stop after the step it is in."""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    def __init__(self):
        self.requested, self.why = False, ""

    def request(self, why: str) -> None:
        self.requested, self.why = True, why

    def sleep(self, seconds: float) -> None:
        """Sleep in short naps (signal-safe: no lock a handler could need), waking on a stop."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.05, left))


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """SIGTERM/SIGINT set `flag` (a second one raises KeyboardInterrupt); the old handlers come back after.
    The handler only sets the flag: printing from it could re-enter a write the loop is in."""
    def handler(signum, _frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.request(signal.Signals(signum).name)

    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: no handlers, the caller stops the loop by its flag
        old = {}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
