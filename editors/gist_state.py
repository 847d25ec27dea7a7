"""The gist pool of one store: facts routed to the gist route, compressed, persisted, reconciled.

The pool file (`<data dir>/gist/pool.safetensors`, one atomic file with its fact ids) is written before
the `edits` rows that say those facts are in the pool are committed. On open, the pool is reconciled
with the rows: a pool row with no applied gist edit (a crash between the two) is dropped, and an
applied gist edit whose row is missing is compressed again (compression is deterministic). So a crash
at any moment loses no accepted fact and leaves no row the store does not know of.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from sqlalchemy import select

from editors.incomes.memory import GistMemory
from memory.errors import NotFoundError
from memory.models import Edit, Event, Fact
from memory.store import FactStore

log = logging.getLogger(__name__)

GIST = "gist"


class GistState:
    def __init__(self, store: FactStore, memory: GistMemory):
        self.store, self.memory = store, memory
        self.path = store.data_dir / "gist" / "pool.safetensors"

    def _applied(self) -> dict[int, Fact]:
        with self.store.transaction() as s:
            rows = s.execute(select(Fact).join(Edit, Edit.fact_id == Fact.id)
                             .where(Edit.backend == GIST, Edit.status == "applied")).scalars()
            return {f.id: f for f in rows}

    def open(self) -> int:
        """Load the pool and reconcile it with the store; returns the number of facts in it."""
        if self.path.exists():
            self.memory.load(self.path)
        applied = self._applied()
        stray = [fid for fid in self.memory.pool.fact_ids if fid not in applied]
        for fid in stray:
            log.warning("gist pool row for fact %s has no applied edit (interrupted write); dropping it", fid)
            self.memory.remove(fid)
        missing = [f for fid, f in applied.items() if fid not in self.memory.pool]
        if missing:
            log.warning("recompressing %d applied gist fact(s) missing from the pool file", len(missing))
            self._compress(missing)
        bare = self.memory.pool.without_answers()
        unanswered = {f.id: f.target for f in applied.values() if f.target and f.id in bare}
        if unanswered:  # a pool written before the answer copy: the answers' tokens come from the store
            self.memory.set_answers(unanswered)
        if stray or missing or unanswered:
            self.memory.save(self.path)
        return len(self.memory)

    def _compress(self, facts: Sequence[Fact]) -> None:
        self.memory.add([f.id for f in facts], [f.statement for f in facts], [self._scope(f) for f in facts],
                        [f.subject for f in facts], prompts=[f.prompt for f in facts],
                        answers=[f.target for f in facts])

    @staticmethod
    def _scope(fact: Fact) -> str | None:
        return None if fact.scope == "global" else fact.user_id

    def add(self, facts: Sequence[Fact]) -> float:
        """Compress facts into the pool and record them; returns the seconds compression took."""
        todo = [f for f in facts if f.id not in self.memory.pool]
        if not todo:
            return 0.0
        started = time.perf_counter()
        self._compress(todo)
        seconds = time.perf_counter() - started
        self.memory.save(self.path)
        with self.store.transaction() as s:
            for fact in todo:
                s.add(Edit(fact_id=fact.id, backend=GIST, status="applied", steps=0,
                           seconds=seconds / len(todo), artifact="gist/pool.safetensors"))
                s.add(Event(fact_id=fact.id, kind="applied", detail={"backend": GIST}))
        return seconds

    def remove(self, fact_id: int, reason: str = "rolled back") -> None:
        with self.store.transaction() as s:
            edit = s.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.backend == GIST,
                                                Edit.status == "applied")).first()
            if edit is None:
                raise NotFoundError(f"fact {fact_id} is not in the gist pool")
            self.memory.remove(fact_id)
            self.memory.save(self.path)  # inside the transaction: a failed save rolls the row back
            edit.status = "rolled_back"
            s.add(Event(fact_id=fact_id, kind="rolled_back", detail={"backend": GIST, "reason": reason}))

    def stale(self) -> list[int]:
        """Facts still in the pool although superseded or deleted."""
        with self.store.transaction() as s:
            return list(s.scalars(select(Edit.fact_id).join(Fact, Fact.id == Edit.fact_id).where(
                Edit.backend == GIST, Edit.status == "applied", Fact.status != "active")))
