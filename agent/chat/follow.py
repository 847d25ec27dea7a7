"""Following the store: a chat engine beside a running agent picks up its new weight edits and pool facts.

The agent (or `engram edit`) is the store's one writer; the engine is a reader. Between two answers, with
the engine's lock held, `StoreFollower.refresh` compares the store's model version with the one the
weights were built at and, when they differ, rebuilds them from the base tensors plus every applied delta
(a rollback can remove a delta from the middle, so replaying only the new ones is not enough). The gist
pool follows its manifest (editors/incomes/segments.py): when the manifest changed, the engine's pool reads
only the new segments and applies the new tombstones (a whole reload after a compaction or a rewrite). The
writer renames each manifest into place after the segments it lists, so a reader always sees a whole pool.
Checks are throttled to one every `every_s` seconds, so a busy server asks the store a few times a second
at most.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from editors.deltas import CorruptDeltaError

log = logging.getLogger(__name__)

REBUILD_TRIES = 3  # a rollback racing the rebuild can delete a delta it was about to read: read again


class StoreFollower:
    def __init__(self, state, gist=None, every_s: float = 1.0, open_memory: Callable[[], object] | None = None,
                 pool_path: Path | None = None):
        """`state`: the engine's ModelState (a reader: it never sweeps). `gist`: its GistState or None;
        `open_memory()` makes a GistMemory on the live model when the pool first appears after startup;
        `pool_path`: the pool's directory (default: the store's, editors/gist_state.ARTIFACT)."""
        from editors.gist_state import pool_segments
        from editors.incomes.segments import PoolSegments

        self.state, self.gist, self.every_s, self.open_memory = state, gist, every_s, open_memory
        if gist is not None and (pool_path is None or Path(pool_path) == gist.path):
            self.segments = gist.segments  # it knows which segments the served pool holds: reloads read new ones
        else:
            self.segments = PoolSegments(pool_path) if pool_path is not None else pool_segments(state.store)
        self.pool_path = self.segments.directory
        self.version = state.version
        self._pool_stamp = self._stamp()
        self._checked = time.monotonic()

    def _stamp(self) -> tuple | None:
        return self.segments.stamp()

    def expire(self) -> None:
        """The next refresh looks at the store whatever the throttle says (the caller knows it changed)."""
        self._checked = float("-inf")

    def refresh(self, force: bool = False) -> bool:
        """Bring the weights and the pool up to the store's; True when anything changed. Call it with no
        generation running (the engine's lock held)."""
        now = time.monotonic()
        if not force and now - self._checked < self.every_s:
            return False
        self._checked = now
        changed = self._weights()
        return self._pool() or changed

    def _weights(self) -> bool:
        version = self.state.version
        if version == self.version:
            return False
        for attempt in range(1, REBUILD_TRIES + 1):
            try:
                self.state.reload()
                break
            except CorruptDeltaError as exc:  # rebuild left the base weights: answer with them, try again
                if attempt == REBUILD_TRIES:
                    log.warning("could not follow the store to version %s: %s", version, exc)
                    self.version = -1  # not a version the store has: the next refresh tries again
                    raise
                time.sleep(0.05 * attempt)
        self.version = version
        log.info("weights now at model version %s", version)
        return True

    def _pool(self) -> bool:
        stamp = self._stamp()
        if stamp == self._pool_stamp or stamp is None:
            return False
        if self.gist is None and self.open_memory is None:
            return False
        memory = self.gist.memory if self.gist is not None else self.open_memory()
        pool = self.segments.refresh(memory.pool, memory.pool.device)
        if pool is not None and (pool is memory.pool or memory.adopt(pool, self.pool_path)):
            self._pool_stamp = stamp
            if self.gist is None:
                from editors.gist_state import GistState

                self.gist = GistState(self.state.store, memory, self.segments)
            log.info("gist pool reloaded: %d fact(s)", len(memory))
            return True
        return False
