"""The store's writer lock: at most one process at a time writes weight deltas and edit rows.

An exclusive `fcntl.flock` on `<data dir>/writer.lock`, held for a process's whole writing life (the
kernel drops it when the process exits, however it exits, so a crash never leaves a stale lock).
Acquiring is a non-blocking try by default: a second writer fails at once with the holder's pid
instead of hanging; `timeout` > 0 polls for that long first.

Why it exists: the orphan sweep deletes delta files no row points to. Only the lock holder may sweep,
so it can never delete the delta another process has written but not yet committed.

It guards files, not rows, so it holds on every database backend: a PostgreSQL store's deltas still
live in a local data dir (FactStore.data_dir), and only its lock holder may sweep them.

Within one process the lock is re-entrant (a count per lock file): two ModelStates on the same store
in one process are one writer, and flock would otherwise make the second one lock out the first.
"""
from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from memory.errors import StoreError

LOCK_NAME = "writer.lock"


class WriterLockError(StoreError):
    """Another process holds the store's writer lock."""


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[Path, _Held] = {}  # lock file -> this process's open, locked descriptor


class WriterLock:
    """The writer lock of one data directory. Use as a context manager, or acquire()/release()."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / LOCK_NAME
        self._mine = 0  # how many of this process's acquisitions are this object's

    @property
    def held(self) -> bool:
        return self._mine > 0

    def acquire(self, timeout: float = 0.0) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key].count += 1
        else:
            _HELD[key] = _Held(self._lock(timeout), 1)
        self._mine += 1
        return self

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; False instead of an error."""
        try:
            self.acquire()
        except WriterLockError:
            return False
        return True

    def release(self) -> None:
        if not self._mine:
            return
        key = self.path.resolve()
        self._mine -= 1
        held = _HELD[key]
        held.count -= 1
        if held.count == 0:
            del _HELD[key]
            os.close(held.fd)  # closing the descriptor drops the flock

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock(self, timeout: float) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise WriterLockError(
                        f"another engram process is writing to this store (pid {holder}); "
                        f"wait for it to finish (lock file {self.path})") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the next one's error message
        return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        text = ""
    return text or "unknown"
