"""The gist pool of one store: facts routed to the gist route, compressed, persisted, reconciled.

The pool lives in `<data dir>/gist/pool/` as append-only segments (editors/incomes/segments.py): adding facts
writes one segment with their rows and a manifest that lists it, removing one writes a tombstone into the
manifest. The segment and manifest are written before the `edits` rows that say those facts are in the pool
are committed. On open, the pool is reconciled with the rows: a pool row with no applied gist edit (a crash
between the two) is dropped (tombstoned), and an applied gist edit whose row is missing is compressed again
(compression is deterministic) and appended. So a crash at any moment loses no accepted fact and leaves no
row the store does not know of. Open also migrates the single pool file of older versions
(`gist/pool.safetensors`) and compacts the segments when there are many or many rows are tombstoned.

Work still to do is queued as `edits` rows (backend "gist", status "pending"), which ingestion writes in
the same transaction as the facts (`FactStore.add_facts(..., pending_backend="gist")`). `open` and `add`
drain that queue: each active fact with a pending row is compressed and its row turns into the applied
one (updated, never a second row); the pending row of a fact no longer active is closed as rolled_back,
with the reason. So a crash or a failed add-on load after ingestion leaves the facts queued, and the next
command that opens the pool compresses them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import exists, select, update

from editors.incomes.memory import GistMemory
from editors.incomes.pool import GistPool
from editors.incomes.segments import PoolSegments
from memory.errors import NotFoundError, StoreError
from memory.models import Edit, Event, Fact
from memory.store import FactStore

log = logging.getLogger(__name__)

GIST = "gist"
ARTIFACT = "gist/pool"  # the pool's directory, relative to the data dir, as Edit.artifact is
LEGACY = "gist/pool.safetensors"  # the one pool file of older versions, migrated on open


def pool_segments(store: FactStore) -> PoolSegments:
    """The segments of `store`'s gist pool (what GistState writes, StoreFollower follows, `engram compact` merges)."""
    return PoolSegments(store.data_dir / ARTIFACT, legacy=store.data_dir / LEGACY)


def has_gist_work(store: FactStore) -> bool:
    """Whether the store has gist facts to serve or to compress (an applied or a pending gist edit)."""
    return _any_gist_edit(store, ("applied", "pending"))


def has_pending_gist(store: FactStore) -> bool:
    """Whether facts are queued for the gist pool and not compressed yet."""
    return _any_gist_edit(store, ("pending",))


def _any_gist_edit(store: FactStore, statuses: tuple[str, ...]) -> bool:
    with store.transaction() as s:
        return bool(s.scalar(select(exists().where(Edit.backend == GIST, Edit.status.in_(statuses)))))


@dataclass
class GistWork:
    """What this GistState recorded: facts newly compressed into the pool, pending rows closed without it."""

    added: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Queue:
    todo: list[Fact]  # to compress, in queue order
    pending: dict[int, int]  # fact id -> the pending edit row that becomes its applied one
    closed: list[tuple[int, int, str]]  # (edit id, fact id, reason): pending rows closed uncompressed


class GistState:
    def __init__(self, store: FactStore, memory: GistMemory, segments: PoolSegments | None = None):
        self.store, self.memory = store, memory
        self.segments = segments if segments is not None else pool_segments(store)
        self.path = self.segments.directory
        self.work = GistWork()

    def _applied(self) -> dict[int, Fact]:
        with self.store.transaction() as s:
            rows = s.execute(select(Fact).join(Edit, Edit.fact_id == Fact.id)
                             .where(Edit.backend == GIST, Edit.status == "applied")).scalars()
            return {f.id: f for f in rows}

    def _pool(self) -> GistPool:
        """The served pool, tagged with the add-on that compressed it (the files' tag is checked on load)."""
        self.memory.pool.tag = self.memory.tag
        return self.memory.pool

    def open(self) -> int:
        """Load the pool, reconcile it with the store and compress the pending facts; returns the number of
        facts in the pool."""
        if self.segments.recover():
            log.info("removed the files of pool writes a kill interrupted")
        stored = self.segments.load(self.memory.pool.device)
        foreign = stored is not None and not self.memory.adopt(stored, self.path)  # every row compressed again
        applied = self._applied()
        stray = [fid for fid in self.memory.pool.fact_ids if fid not in applied]
        for fid in stray:  # a pending fact among them is compressed again below (deterministic)
            log.warning("gist pool row for fact %s has no applied edit (interrupted write); dropping it", fid)
            self.memory.remove(fid)
        missing = [f for fid, f in applied.items() if fid not in self.memory.pool]
        if missing and not foreign:
            log.warning("recompressing %d applied gist fact(s) missing from the pool files", len(missing))
        if missing:
            self._compress(missing)
        bare = self.memory.pool.without_answers()
        unanswered = {f.id: f.target for f in applied.values() if f.target and f.id in bare}
        if unanswered:  # a pool written before the answer copy: the answers' tokens come from the store
            self.memory.set_answers(unanswered)
        if foreign or unanswered:  # rows changed in place: the whole pool as one fresh segment
            self.segments.rewrite(self._pool())
        else:
            self.segments.remove(stray)
            self.segments.append(self._pool(), [f.id for f in missing])
        self._drain(())
        self.compact_if_crowded()
        return len(self.memory)

    def compact_if_crowded(self):
        """Merge the pool's segments when there are many or many rows are tombstoned (segments.crowded):
        on open, and when a long-running agent is idle. Returns the Compaction, or None."""
        if not self.segments.crowded():
            return None
        done = self.segments.compact(self._pool())
        log.info("compacted the gist pool: %d segment(s) into one, %d removed row(s) dropped", done.segments,
                 done.dropped)
        return done

    def add(self, facts: Sequence[Fact] = ()) -> float:
        """Compress `facts` and every pending gist fact into the pool and record them; returns the seconds
        compression took."""
        return self._drain(facts)

    def _compress(self, facts: Sequence[Fact]) -> None:
        self.memory.add([f.id for f in facts], [f.statement for f in facts], [self._scope(f) for f in facts],
                        [f.subject for f in facts], prompts=[f.prompt for f in facts],
                        answers=[f.target for f in facts])

    @staticmethod
    def _scope(fact: Fact) -> str | None:
        return None if fact.scope == "global" else fact.user_id

    def _queue(self, facts: Sequence[Fact]) -> _Queue:
        """The pending gist rows (and `facts`) sorted into facts to compress and rows to close."""
        with self.store.transaction() as s:
            rows = s.execute(select(Edit.id, Fact).join(Fact, Fact.id == Edit.fact_id)
                             .where(Edit.backend == GIST, Edit.status == "pending").order_by(Edit.id)).all()
        queue = _Queue([], {}, [])
        for edit_id, fact in rows:
            if fact.status != "active":
                queue.closed.append((edit_id, fact.id, f"fact {fact.id} is {fact.status}; not compressed"))
            elif fact.id in self.memory.pool or fact.id in queue.pending:
                queue.closed.append((edit_id, fact.id, f"fact {fact.id} is already in the gist pool"))
            else:
                queue.pending[fact.id] = edit_id
                queue.todo.append(fact)
        queued = set(queue.pending)
        for fact in facts:  # facts given without a pending row (a caller that queued none) get a new row
            if fact.id not in self.memory.pool and fact.id not in queued:
                queued.add(fact.id)
                queue.todo.append(fact)
        return queue

    def _drain(self, facts: Sequence[Fact]) -> float:
        """Compress what is queued, append its rows to the pool's files, then record it: pending rows become
        applied, and rows of inactive facts are closed, in one transaction."""
        queue = self._queue(facts)
        seconds = 0.0
        if queue.todo:
            started = time.perf_counter()
            self._compress(queue.todo)
            seconds = time.perf_counter() - started
            # before the rows: a crash in between leaves stray rows, dropped on open
            self.segments.append(self._pool(), [f.id for f in queue.todo])
        if queue.todo or queue.closed:
            try:
                self._record(queue, seconds)
            except BaseException:
                for fact in queue.todo:  # not recorded, so not served (the files' rows are strays, dropped on open)
                    self.memory.remove(fact.id)
                raise
        self.work.added += [f.id for f in queue.todo]
        self.work.closed += [fact_id for _, fact_id, _ in queue.closed]
        self.work.seconds += seconds
        return seconds

    def _record(self, queue: _Queue, seconds: float) -> None:
        each = seconds / len(queue.todo) if queue.todo else 0.0
        values = {"status": "applied", "steps": 0, "seconds": each, "artifact": ARTIFACT, "error": None}
        with self.store.transaction() as s:
            for fact in queue.todo:
                edit_id = queue.pending.get(fact.id)
                if edit_id is None:
                    s.add(Edit(fact_id=fact.id, backend=GIST, **values))
                elif s.execute(update(Edit).where(Edit.id == edit_id, Edit.status == "pending")
                               .values(**values)).rowcount != 1:
                    raise StoreError(f"the pending gist edit {edit_id} of fact {fact.id} was changed by another "
                                     "process while it was compressed; run the command again")
                s.add(Event(fact_id=fact.id, kind="applied", detail={"backend": GIST}))
            for edit_id, fact_id, reason in queue.closed:
                s.execute(update(Edit).where(Edit.id == edit_id, Edit.status == "pending")
                          .values(status="rolled_back", error=reason))
                s.add(Event(fact_id=fact_id, kind="rolled_back", detail={"backend": GIST, "reason": reason}))
        for _, fact_id, reason in queue.closed:
            log.info("closed the pending gist edit of fact %s: %s", fact_id, reason)

    def remove(self, fact_id: int, reason: str = "rolled back") -> None:
        with self.store.transaction() as s:
            edit = s.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.backend == GIST,
                                                Edit.status == "applied")).first()
            if edit is None:
                raise NotFoundError(f"fact {fact_id} is not in the gist pool")
            self.memory.remove(fact_id)
            self.segments.remove([fact_id])  # a tombstone, inside the transaction: a failed write rolls the row back
            edit.status = "rolled_back"
            s.add(Event(fact_id=fact_id, kind="rolled_back", detail={"backend": GIST, "reason": reason}))

    def stale(self) -> list[int]:
        """Facts still in the pool although superseded or deleted."""
        with self.store.transaction() as s:
            return list(s.scalars(select(Edit.fact_id).join(Fact, Fact.id == Edit.fact_id).where(
                Edit.backend == GIST, Edit.status == "applied", Fact.status != "active")))
