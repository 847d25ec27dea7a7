"""Consolidation: global facts move from the gist pool into ICE weight edits, so a fact learned fast
(a gist, ~0.1 s) can last cheaply (weights: no pool row to read, no per-user scope).

One fact at a time, each in durable steps a kill can stop anywhere:
1. the pending weight row and a `consolidating` event commit together;
2. ICE edits the live weights (ModelState.apply records the delta and fulfils the row);
3. one greedy check of the fact's own prompt on the weights alone (the pool is not read);
4. learned: the fact's stage moves to the ice route with a `consolidated` event, then its gist leaves
   the pool; not learned: the edit is rolled back (it is the newest, so nothing is re-edited), the gist
   stays, and a `consolidation_failed` event says what the weights answered.
A fact left with an applied edit on both routes (a kill between 2 and 4) is finished by `reconcile`,
which every run does first: the check decides again, or, when the stage already says ice, the gist goes.
Only facts whose scope the routing policy lets into the weights (`weight_scopes`) are candidates; those the
router flagged `consolidate_later` (the ICE backlog sent them to the pool) come first.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import exists, select, update
from sqlalchemy.orm import aliased

from agent.router import RoutePolicy, Verification, verify_fact
from memory.errors import EngramError, NotFoundError
from memory.models import Edit, Event, Fact, Stage
from memory.stages import APPLIED, queue_edit
from memory.store import FactStore

log = logging.getLogger(__name__)

GIST, ICE = "gist", "ice"
CONSOLIDATING, CONSOLIDATED, FAILED = "consolidating", "consolidated", "consolidation_failed"


@dataclass
class ConsolidationResult:
    """What one run did: facts moved, facts whose edit did not learn them (their gist stays), errors."""

    consolidated: list[int] = field(default_factory=list)
    not_learned: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    reconciled: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False  # a signal ended the run before its last candidate

    def to_dict(self) -> dict:
        return {"consolidated": len(self.consolidated), "not_learned": len(self.not_learned),
                "errors": {str(k): v for k, v in self.errors.items()}, "reconciled": len(self.reconciled),
                "stopped": self.stopped, "seconds": round(self.seconds, 2), "consolidated_ids": self.consolidated,
                "not_learned_ids": self.not_learned}


Check = Callable[[Fact], Verification]


def weights_check(model, tokenizer, max_new_tokens: int | None = None) -> Check:
    """The greedy check of a fact's own prompt on the live weights alone (the pool is not read)."""
    budget = max_new_tokens or RoutePolicy().verify_max_new_tokens
    return lambda fact: verify_fact(model, tokenizer, fact, max_new_tokens=budget)


class Consolidator:
    """`state`: the rebuilt ModelState (writer); `editor`: the ICE editor; `gist`: the opened GistState;
    `check`: whether the weights alone now give a fact's target (`weights_check`)."""

    def __init__(self, store: FactStore, state, editor, gist, check: Check | None, policy: RoutePolicy | None = None,
                 backend: str = ICE):
        self.store, self.state, self.editor, self.gist, self.check = store, state, editor, gist, check
        self.policy = policy or RoutePolicy()
        self.backend = backend

    # -- what to move -------------------------------------------------------------------------------
    def candidates(self, limit: int | None = None, retry_failed: bool = False) -> list[int]:
        """Applied gist facts that may enter the weights, flagged ones first, then oldest first."""
        in_pool = exists().where(Edit.fact_id == Fact.id, Edit.backend == GIST, Edit.status == "applied")
        weights = aliased(Edit)
        # a pending weight row (a kill after step 1) is no bar: queue_edit takes that row again
        in_weights = exists().where(weights.fact_id == Fact.id, weights.backend != GIST, weights.status == "applied")
        tried = exists().where(Event.fact_id == Fact.id, Event.kind == FAILED)
        query = (select(Fact.id).join(Stage, Stage.fact_id == Fact.id)
                 .where(Stage.stage == APPLIED, Stage.route == GIST, Fact.status == "active",
                        Fact.scope.in_(self.policy.weight_scopes), Fact.prompt.is_not(None),
                        Fact.target.is_not(None), in_pool, ~in_weights)
                 .order_by(Fact.id))
        if not retry_failed:
            query = query.where(~tried)
        with self.store.transaction() as s:
            ids = list(s.scalars(query))
            flagged = {e.fact_id for e in s.scalars(select(Event).where(Event.kind == "routed",
                                                                        Event.fact_id.in_(ids)))
                       if (e.detail or {}).get("inputs", {}).get("consolidate_later")}
        ordered = [i for i in ids if i in flagged] + [i for i in ids if i not in flagged]
        return ordered[:limit] if limit is not None else ordered

    def in_both(self) -> list[int]:
        """Facts with an applied edit on both routes: a consolidation a kill interrupted."""
        weights = aliased(Edit)
        in_weights = exists().where(weights.fact_id == Edit.fact_id, weights.backend != GIST,
                                    weights.status == "applied")
        with self.store.transaction() as s:
            return sorted(set(s.scalars(select(Edit.fact_id).where(Edit.backend == GIST, Edit.status == "applied",
                                                                    in_weights))))

    # -- running ------------------------------------------------------------------------------------
    def reconcile(self, result: ConsolidationResult) -> None:
        """Finish the consolidations a kill interrupted (see the module doc)."""
        for fact_id in self.in_both():
            self._finish(fact_id, result)
            result.reconciled.append(fact_id)

    def run(self, limit: int | None = None, retry_failed: bool = False, progress=None,
            stop: Callable[[], bool] | None = None) -> ConsolidationResult:
        """Consolidate the candidates one by one; `stop()` true ends the run between two facts."""
        started = time.perf_counter()
        result = ConsolidationResult()
        self.reconcile(result)
        todo = self.candidates(limit, retry_failed)
        for n, fact_id in enumerate(todo, 1):
            if stop is not None and stop():
                result.stopped = True
                break
            self.step(fact_id, result)
            if progress is not None:
                progress(n, len(todo), fact_id, result)
        result.seconds = time.perf_counter() - started
        return result

    def step(self, fact_id: int, result: ConsolidationResult) -> None:
        """Consolidate one fact (steps 1-4 of the module doc). An error is recorded (the fact is not a
        candidate again without retry_failed) and never raised: its gist still serves the fact."""
        try:
            with self.store.transaction() as s:
                fact = s.get(Fact, fact_id)
                queue_edit(s, fact_id, self.backend, "consolidation: gist -> weights")
                s.add(Event(fact_id=fact_id, kind=CONSOLIDATING, detail={"backend": self.backend}))
            applied = self.state.apply(fact, self.editor, self.backend)
            if applied.ok:
                self._finish(fact_id, result, fact)
                return
            error = applied.error or "the edit failed"  # nothing changed in the weights
        except EngramError as exc:
            error = str(exc)
        result.errors[fact_id] = error
        with self.store.transaction() as s:
            s.add(Event(fact_id=fact_id, kind=FAILED, detail={"error": error}))

    def _finish(self, fact_id: int, result: ConsolidationResult, fact: Fact | None = None) -> None:
        """The check and its consequence for a fact whose weight edit is applied beside its gist."""
        with self.store.transaction() as s:
            fact = fact or s.get(Fact, fact_id)
            route = s.scalar(select(Stage.route).where(Stage.fact_id == fact_id))
        if route != ICE:
            check = self.check(fact)
            if not check.ok:
                self.state.rollback(fact_id)  # the newest edit: nothing after it to re-edit
                with self.store.transaction() as s:
                    s.add(Event(fact_id=fact_id, kind=FAILED, detail={"answer": check.answer, "target": fact.target}))
                result.not_learned.append(fact_id)
                return
            with self.store.transaction() as s:
                s.execute(update(Stage).where(Stage.fact_id == fact_id).values(route=ICE))
                s.add(Event(fact_id=fact_id, kind=CONSOLIDATED,
                            detail={"backend": self.backend, "answer": check.answer, "seconds": round(check.seconds, 3)}))
        try:
            self.gist.remove(fact_id, reason="consolidated into the weights (its edit was verified)")
        except NotFoundError:
            pass  # already out of the pool
        result.consolidated.append(fact_id)
