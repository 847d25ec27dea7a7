"""The agent loop (`engram run`): read the sources, then move every fact through its durable stages.

One round: ingest new lines (facts, their stage rows and the source offset in one transaction), settle
stages whose edit rows finished, take superseded facts back out of the weights and the pool, keep the
RAG index in step, then claim a batch of facts under a lease and step each one on: contexts, routing,
then the weight edits one by one and the gist facts as one compression batch. A fact that failed
before is retried alone, so a bad fact never costs its batch-mates an attempt. With a verifier, each
applied fact is checked at once (agent/loop/verify.py) and one its route did not learn goes round again
on the other route.

Stopping: SIGTERM or SIGINT lets the current step finish and be recorded, then the loop releases its
leases and returns 0 (a second signal interrupts at once). `until_idle` ends the loop once the sources
hold nothing new (standard input: once it is closed) and no fact has work left that this process can
claim. A kill at any moment is recovered by the next run: the stages, the edit rows, the delta files
and the pool reconcile on start (memory/stages.py, editors/state.py, editors/gist_state.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from agent.loop import stages as steps
from agent.loop.apply import Applying
from agent.loop.signals import StopFlag, stop_on_signals
from agent.loop.sources import Offsets, Source, StdinSource
from agent.loop.verify import Verifying
from agent.loop.view import FactReport, Snapshot, View
from memory.errors import ConfigError, EngramError
from memory.models import Event
from memory.stages import (APPLIED, CONTEXTS, DROPPED, FAILED, ROUTED, STORED, VERIFYING, LeaseLostError, Outcome,
                           claim, drop, ice_backlog, open_stages, owner_id, read_offset, record_failure, release,
                           renew, stage_counts, write_offset)
from memory.store import AddReport, FactStore

log = logging.getLogger(__name__)

GIST = "gist"


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the agent loop; validated on construction."""

    max_attempts: int = 3  # failed attempts before a fact is parked `failed`
    max_takeovers: int = 5  # times a fact's step may die with its process before it is parked
    lease_s: float = 120.0  # how long a claim lasts unless renewed (a live loop renews it)
    batch: int = 16  # facts claimed per round
    read_lines: int = 1000  # source lines per ingest transaction
    poll_s: float = 0.5  # idle wait between rounds
    until_idle: bool = False
    consolidate_when_idle: bool = False  # move global gist facts into verified weight edits while idle
    weight_backend: str = "ice"  # the edits backend of the "ice" route

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_takeovers", "batch", "read_lines"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lease_s <= 0 or self.poll_s < 0:
            raise ConfigError("the lease must be > 0 s and the poll interval >= 0 s")


@dataclass
class Backends:
    """What the loop applies facts with. `open_gist` returns an opened GistState (called once, on the
    first gist fact or at start when the store has gist work); `rag` is a VectorIndex or None."""

    state: object  # editors.state.ModelState, rebuilt
    editor: object | None
    router: object
    open_gist: Callable[[], object] | None = None
    generator: object | None = None
    rag: object | None = None
    verifier: object | None = None  # agent.loop.verify.Verifier; None: applied facts are not checked
    selfeval: object | None = None  # agent.selfeval.SelfEvaluator; None: no periodic self-evaluation
    consolidator: Callable[[object], object] | None = None  # opened GistState -> agent.consolidate.Consolidator


@dataclass
class _Track:
    started: float
    trail: list[str]
    reason: str | None = None


@dataclass
class Totals:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    applied: int = 0
    failed: int = 0
    dropped: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    verified: int = 0  # applied facts whose check gave the target
    not_learned: int = 0  # applied facts whose (last) check did not
    retried: int = 0  # facts sent to their other route


class AgentLoop(Applying):
    def __init__(self, store: FactStore, sources: Sequence[Source], backends: Backends, view: View,
                 config: LoopConfig | None = None, offsets: Offsets | None = None):
        self.store, self.sources, self.backends, self.view = store, list(sources), backends, view
        self.config = config or LoopConfig()
        self.offsets = offsets or Offsets(lambda key: read_offset(store, key))
        self.owner = owner_id()
        self.stop = StopFlag()
        self.totals = Totals()
        self.verify = Verifying(store, self.owner, backends, self.config.weight_backend)
        self._gist, self._gist_error = None, None
        self._track: dict[int, _Track] = {}
        self._rag_dirty = False
        self._unsaved: dict[int, object] = {}  # source index -> its chunk not stored yet
        self._claim: tuple[list[int], float] = ([], 0.0)  # this round's claimed facts, when last renewed

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        with stop_on_signals(self.stop):
            try:
                self._start()
                while not self.stop.requested:
                    if self.round() or self._consolidate_idle():
                        continue
                    if self.config.until_idle and all(self._idle(s) for s in self.sources):
                        self.stop.request("idle")
                        break
                    self.stop.sleep(self.config.poll_s)
            finally:
                release(self.store, self.owner)  # unfinished work waits for the next claim
        if self.stop.why.startswith("SIG"):
            self.view.note(f"{self.stop.why}: stopped after the current step")
        for text in (n for s in self.sources for n in s.leftover()):
            self.view.note(text)
        self.view.close(self.summary())
        failed = self.totals.rejected or self.totals.failed
        return 1 if self.config.until_idle and failed else 0

    def _idle(self, source: Source) -> bool:
        if isinstance(source, StdinSource) and not source.exhausted():
            source.wait(self.config.poll_s)  # --until-idle reads a pipe to its end
            return False
        return True

    def round(self) -> bool:
        """One pass; whether it did anything."""
        worked = self._ingest()
        worked |= self._report(self._settle(), recovered=True)
        if not self.stop.requested:
            claimed, parked = claim(self.store, self.owner, self.config.lease_s, self.config.batch,
                                    self.config.max_takeovers)
            self._report(parked)
            if claimed:
                self._work(claimed)  # it takes stale edits out itself, after routing
                worked = True
            else:
                worked |= self._housekeep()
        if worked and self.backends.selfeval is not None and not self.stop.requested:
            self._self_evaluate(stage_counts(self.store)["stages"][APPLIED])
        if self._rag_dirty and self.backends.rag is not None:
            self._sync_rag()
        if self.view.live:
            self.view.tick(self.snapshot())
        return worked

    def _start(self) -> None:
        from editors.gist_state import has_gist_work

        self.backends.state.acquire_writer()
        self._notes(self.verify.reedit_owed() + self.verify.undo_owed(None))  # what a kill left owed
        if has_gist_work(self.store):
            self._open_gist()  # reconciles the pool with the rows, compresses what was queued
        self._notes(self.verify.undo_owed(self._gist))
        self._report(self._settle(), recovered=True)
        self._rag_dirty = True

    # -- ingest -----------------------------------------------------------------------------------
    def _ingest(self) -> bool:
        worked = False
        for i, source in enumerate(self.sources):
            unsaved = self._unsaved.pop(i, None)  # a chunk whose transaction failed goes first, as it was
            for chunk in [unsaved] if unsaved else source.poll(self.config.read_lines):
                worked = True
                good, bad = chunk.parse()
                try:
                    with self.store.transaction() as s:  # facts, stages, rejections and offset: one commit
                        added = self.store.add_facts([f for _, f in good], session=s) if good else AddReport()
                        open_stages(s, added.new_ids)
                        for line, reason in bad:
                            s.add(Event(fact_id=None, kind="rejected",
                                        detail={"source": chunk.source, "line": line, "reason": reason}))
                        if chunk.key is not None:
                            write_offset(s, chunk.key, chunk.offset, chunk.line)
                except (EngramError, SQLAlchemyError) as exc:  # e.g. a locked database: again next round
                    self.view.note(f"{chunk.source}: lines up to {chunk.line} not stored yet ({exc}); retrying")
                    self._unsaved[i] = chunk  # a pipe cannot give its lines again
                    break
                self.offsets.moved(chunk)
                for line, reason in bad:
                    self.view.rejected(chunk.source, line, reason)
                self.totals.rejected += len(bad)
                self.totals.stored += added.stored
                self.totals.duplicates += added.duplicates
                self._rag_dirty |= bool(added.stored or added.reactivated or added.superseded)
                if self.stop.requested:
                    return worked
        return worked

    # -- housekeeping -----------------------------------------------------------------------------
    def _housekeep(self) -> bool:
        """Superseded or deleted facts leave the weights and the pool (as `engram edit` does). Run after
        routing, so the router still sees which superseded facts sit in the weights."""
        state, removed = self.backends.state, 0
        for fact_id in state.stale_edits():
            self.view.note(f"fact {fact_id} was superseded or deleted: rolling its weight edit back")
            state.rollback(fact_id)
            removed += 1
        if self._gist is not None:
            for fact_id in self._gist.stale():
                self._gist.remove(fact_id, reason="superseded or deleted")
                removed += 1
        self._rag_dirty |= bool(removed)
        compacted = self._gist.compact_if_crowded() if self._gist is not None else None
        if compacted is not None:  # idle: the segments a long run piled up, merged
            self.view.note(f"gist pool compacted: {compacted.segments} segment(s) into one, "
                           f"{compacted.dropped} removed row(s) dropped")
        return bool(removed) or compacted is not None

    def _sync_rag(self) -> None:
        try:
            self.backends.rag.sync(self.store)
            self._rag_dirty = False
        except EngramError as exc:  # the RAG baseline is for comparison: it never stops the agent
            self.view.note(f"RAG index not updated: {exc}")
            self.backends.rag = None

    def _open_gist(self):
        """The pool, opened once: before this process routes anything to it, so opening (which compresses
        the facts queued earlier) never includes a batch of ours."""
        if self._gist is not None or self._gist_error is not None or self.backends.open_gist is None:
            return self._gist
        try:
            self._gist = self.backends.open_gist()
        except EngramError as exc:  # no add-on for this model, say: every gist fact fails with this
            self._gist_error = f"cannot open the gist pool: {exc}"
        except Exception as exc:  # noqa: BLE001 - a queued fact that cannot be compressed
            # Its row (and its queue-mates') fail, each fact is retried alone, and the pool opens without them.
            self.view.note(f"compressing the queued gist facts failed ({exc}); they are retried one by one")
            steps.fail_edits(self.store, steps.pending_gist_edits(self.store), f"{type(exc).__name__}: {exc}")
            self._gist = self.backends.open_gist()
        return self._gist

    # -- stepping facts ---------------------------------------------------------------------------
    def _work(self, claimed) -> None:
        ids = [c.fact_id for c in claimed]
        facts = steps.load_facts(self.store, ids)
        self._claim = (ids, time.monotonic())
        with self.store.transaction() as s:
            backlog = ice_backlog(s)
        self._open_gist()
        ready, retry, checks = [], [], []
        try:
            for c in claimed:
                if self.stop.requested:
                    return
                fact, stage = facts[c.fact_id], c.stage
                self._track.setdefault(fact.id, _Track(time.perf_counter(), [stage]))
                if fact.status != "active" and stage != VERIFYING:  # an applied one ends applied
                    self._drop(fact, stage)
                    continue
                if stage == STORED and self._step(fact, STORED, steps.contexts_step, self.backends.generator)[0]:
                    stage = CONTEXTS
                if stage == CONTEXTS and c.attempts:
                    retry.append(fact)
                elif stage == CONTEXTS:
                    routed = self._route(fact, backlog)
                    if routed is not None:
                        backlog += routed.route != GIST
                        ready.append((fact, routed))
                elif stage == ROUTED:
                    ready.append((fact, steps.resume_routed(self.store, fact.id)))
                elif stage == VERIFYING:
                    checks.append(fact)
            if self.stop.requested:
                return
            self._housekeep()
            self._apply(ready + self._check(checks))
            for fact in retry:  # alone, after the batch
                if self.stop.requested:
                    return
                routed = self._route(fact, backlog)
                if routed is not None:
                    self._apply([(fact, routed)])
        finally:
            release(self.store, self.owner, ids)

    def _step(self, fact, stage: str, fn, *args) -> tuple[bool, object]:
        """Run one step: (done, its result). A failure is this fact's failed attempt (recorded), never
        the loop's."""
        self._renew()
        try:
            result = fn(self.store, self.owner, fact, *args)
        except LeaseLostError as exc:
            self.view.note(str(exc))
            return False, None
        except Exception as exc:  # noqa: BLE001 - the fact's failure, with its reason
            log.debug("step %s of fact %s failed", stage, fact.id, exc_info=True)
            with self.store.transaction() as s:
                outcome = record_failure(s, fact.id, f"{type(exc).__name__}: {exc}", self.config.max_attempts, stage)
            self._report([outcome])
            return False, None
        self._track[fact.id].trail.append({STORED: CONTEXTS, CONTEXTS: ROUTED}[stage])
        return True, result

    def _route(self, fact, backlog: int):
        done, routed = self._step(fact, CONTEXTS, steps.route_step, self.backends.router, backlog,
                                  self.config.weight_backend)
        if done:
            self._track[fact.id].reason = routed.reason
        return routed if done else None

    def _drop(self, fact, stage: str) -> None:
        reason = f"fact {fact.id} is {fact.status}" + (f" (by fact {fact.superseded_by})" if fact.superseded_by else "")
        try:
            with self.store.transaction() as s:
                outcome = drop(s, fact.id, self.owner, stage, reason)
        except LeaseLostError as exc:
            self.view.note(str(exc))
            return
        self._report([outcome])

    def _renew(self) -> None:
        """Keep this round's leases alive through long steps (an LLM, a slow edit)."""
        ids, since = self._claim
        if time.monotonic() - since > self.config.lease_s / 3:
            renew(self.store, self.owner, ids, self.config.lease_s)
            self._claim = (ids, time.monotonic())

    # -- reporting --------------------------------------------------------------------------------
    def _report(self, outcomes: Sequence[Outcome], recovered: bool = False) -> bool:
        version = None
        for out in outcomes:
            if out.stage == VERIFYING:  # applied, its check comes next: not an end yet
                if out.fact_id in self._track:
                    self._track[out.fact_id].trail.append(VERIFYING)
                continue
            track = self._track.pop(out.fact_id, None) if out.stage in (APPLIED, FAILED, DROPPED) \
                else self._track.get(out.fact_id)
            trail = (track.trail if track else [ROUTED]) + [out.stage]
            seconds = time.perf_counter() - track.started if track else 0.0
            if version is None:
                version = self.backends.state.version
            report = FactReport(out.fact_id, out.stage, out.route, track.reason if track else None, trail,
                                seconds, out.attempts, out.error, version,
                                recovered=recovered and track is None, verified=out.verified)
            if out.stage == APPLIED:
                self.totals.applied += 1
                self.totals.verified += out.verified is True
                self.totals.not_learned += out.verified is False
                self.totals.routes[out.route] = self.totals.routes.get(out.route, 0) + 1
            elif out.stage == FAILED:
                self.totals.failed += 1
            elif out.stage == DROPPED:
                self.totals.dropped += 1
                self._rag_dirty = True  # deleted by another process, perhaps: the index lets it go
            if out.stage in (APPLIED, FAILED, DROPPED):
                self.view.fact(report)
            else:
                self.view.retry(report, self.config.max_attempts)
                if track is not None:
                    track.trail = [out.stage]
        return bool(outcomes)

    def snapshot(self) -> Snapshot:
        counts = stage_counts(self.store)
        pool = len(self._gist.memory) if self._gist is not None else None
        selfeval = self.backends.selfeval
        last = selfeval.last_point() if selfeval is not None else None
        return Snapshot(counts["stages"], counts["routes"], self.backends.state.version, pool,
                        evaluating=selfeval is not None, last_eval=last)

    def summary(self) -> dict:
        t = self.totals
        return {"stopped": self.stop.why or "done", "stored": t.stored, "duplicates": t.duplicates,
                "rejected": t.rejected, "applied": t.applied, "failed": t.failed, "dropped": t.dropped,
                "routes": dict(t.routes), "model_version": self.backends.state.version,
                "verified": t.verified, "not_learned": t.not_learned, "retried": t.retried,
                "stages": stage_counts(self.store)["stages"]}
