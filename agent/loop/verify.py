"""Verified routing in the loop: after a fact's edit is applied (stage `verifying`), one greedy check of its
own prompt says whether the model now gives the target, and a fact its route did not learn is tried once
on the other route.

- **The check** runs on the live edited weights for an ICE fact, and inside the gist pool's reading
  context for the fact's user for a gist fact (agent.router.verify_fact). A text-only fact has nothing
  to check (ok=None) and is never retried; a check that raises is recorded as unchecked, never as a
  failed attempt (the edit is applied either way).
- **One transaction** records the verification and the decision with the stage move: verifying ->
  applied, or (not learned, and the router allows it: agent.router.Router.can_retry) the retry's
  "routed" event, its pending edit row on the other route and verifying -> routed, so the loop's normal
  apply path takes it. A kill before that commit verifies again on restart; after it, the retry is on
  record and the router's `record` refuses a second one. A fact the router will not move (scoped, or
  already retried) stays applied-not-learned, and the verification's note says why.
- **The undo** of the failed route (policy.undo_failed_route) runs right after that commit: a weight
  edit is rolled back with re-edits of the later facts (as `engram rollback` does), a gist leaves the
  pool. It is owed by the record itself (the fact's latest decision is a retry with undo_previous while
  the failed route's edit is still applied), so one a kill (or an error) prevented is made good on the
  next start, before the retry is applied (`undo_owed`), and re-edits a kill interrupted are redone
  on start (`reedit_owed`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import aliased

from agent.loop.stages import Routed
from agent.router import ROUTED as ROUTED_EVENT
from agent.router import RouteDecision, Verification, record_verification, route_of_backend, verify_fact
from agent.router.verify import DEFAULT_MAX_NEW_TOKENS
from memory.errors import EditError, EngramError, NotFoundError
from memory.models import Edit, Event, Fact, Stage
from memory.stages import APPLIED, ROUTED, VERIFYING, Outcome, advance, queue_edit
from memory.store import FactStore

log = logging.getLogger(__name__)

GIST = "gist"


class Verifier(Protocol):
    def check(self, fact, route: str, gist) -> Verification:
        """Whether the model now gives `fact`'s target on `route` (`gist`: the open GistState, or None)."""


@dataclass
class ModelVerifier:
    """The real check: `model`/`tokenizer` are the live edited weights; a gist fact is read through the pool's
    own model and tokenizer (the add-on is attached there) for the fact's user."""

    model: object
    tokenizer: object
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def check(self, fact, route: str, gist) -> Verification:
        if route != GIST:
            return verify_fact(self.model, self.tokenizer, fact, max_new_tokens=self.max_new_tokens)
        if gist is None:
            return Verification(None, "", fact.prompt, fact.target, note="the gist pool is not open")
        memory = gist.memory
        return verify_fact(memory.model, memory.tokenizer, fact, reading=memory.reading(fact.user_id),
                           max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class Checked:
    """One check's result: the fact's end (applied, with `verified`), or the retry queued on the other route."""

    outcome: Outcome | None
    retry: Routed | None = None
    verification: Verification | None = None
    notes: list[str] = field(default_factory=list)


def latest_decision(session, fact_id: int) -> RouteDecision | None:
    detail = session.scalar(select(Event.detail).where(Event.fact_id == fact_id, Event.kind == ROUTED_EVENT)
                            .order_by(Event.id.desc()).limit(1))
    if not detail or detail.get("route") not in ("ice", GIST):
        return None
    return RouteDecision.from_dict(detail)


def owed_undo(session, fact_id: int) -> str | None:
    """The route whose edit a recorded retry still owes taking out (None when nothing is owed)."""
    decision = latest_decision(session, fact_id)
    failed = decision.inputs.get("retry_of") if decision is not None else None
    if failed not in ("ice", GIST) or not decision.inputs.get("undo_previous"):
        return None
    side = Edit.backend == GIST if failed == GIST else Edit.backend != GIST
    held = session.scalar(select(exists().where(Edit.fact_id == fact_id, Edit.status == "applied", side)))
    return failed if held else None


class Verifying:
    """The loop's verify step. `backends` is the loop's (state, editor, router, verifier); with no verifier
    a fact at `verifying` (left by an earlier run) ends applied, unchecked."""

    def __init__(self, store: FactStore, owner: str, backends, weight_backend: str):
        self.store, self.owner, self.backends, self.weight_backend = store, owner, backends, weight_backend

    @property
    def enabled(self) -> bool:
        return getattr(self.backends, "verifier", None) is not None

    # -- the check ---------------------------------------------------------------------------------
    def check(self, fact, gist) -> Checked:
        """verifying -> applied | routed (the retry), recorded in one transaction (LeaseLostError if the fact
        is no longer ours); then the failed route's undo, if the retry owes one."""
        with self.store.transaction() as s:
            route = s.scalar(select(Stage.route).where(Stage.fact_id == fact.id))
            active = s.scalar(select(Fact.status).where(Fact.id == fact.id)) == "active"
        # An inactive fact is not checked: housekeeping takes its edit out like any applied one's.
        verification = self._verify(fact, route, gist) if self.enabled and active else None
        with self.store.transaction() as s:
            attempts = s.scalar(select(Stage.attempts).where(Stage.fact_id == fact.id)) or 0
            retry, why = (self._retry(s, fact.id, route) if verification is not None and verification.ok is False
                          else (None, None))
            if verification is not None:
                if why is not None:
                    verification = replace(verification, note=f"not retried: {why}")
                record_verification(s, fact.id, route, verification)
            if retry is None:
                advance(s, fact.id, self.owner, VERIFYING, APPLIED, error=None)
                ok = verification.ok if verification is not None else None
                notes = [f"fact {fact.id}: {route} did not learn it and it is not retried ({why})"] if why else []
                return Checked(Outcome(fact.id, APPLIED, route, attempts=attempts, verified=ok), None, verification,
                               notes)
            backend = GIST if retry.route == GIST else self.weight_backend
            edit_id = queue_edit(s, fact.id, backend, f"retried on {retry.route}: {route} did not learn it")
            advance(s, fact.id, self.owner, VERIFYING, ROUTED, route=retry.route, edit_id=edit_id, error=None)
        notes = [f"fact {fact.id}: {route} did not learn it (answered {verification.answer!r}, target "
                 f"{verification.target!r}); retrying on {retry.route}"]
        if retry.inputs.get("undo_previous"):
            notes += self._undo(fact.id, route, gist)
        return Checked(None, Routed(fact.id, retry.route, backend, retry.reason, edit_id), verification, notes)

    def _verify(self, fact, route: str, gist) -> Verification:
        try:
            return self.backends.verifier.check(fact, route, gist)
        except Exception as exc:  # noqa: BLE001 - a check that fails leaves the fact applied, unchecked
            log.debug("the check of fact %s failed", fact.id, exc_info=True)
            return Verification(None, "", fact.prompt, fact.target,
                                note=f"the check failed: {type(exc).__name__}: {exc}")

    def _retry(self, session, fact_id: int, route: str) -> tuple[RouteDecision | None, str | None]:
        """The retry decision, recorded in `session`; or None and why not."""
        router = self.backends.router
        if not hasattr(router, "retry_route"):
            return None, "this router does not retry"
        decision = latest_decision(session, fact_id)
        if decision is None or decision.route != route:
            return None, "no routing decision for this route is recorded"
        ok, why = router.can_retry(decision)
        if not ok:
            return None, why
        retry = router.retry_route(decision)
        try:
            router.record(session, fact_id, retry)  # refuses a second retry of the fact: nothing added then
        except EditError as exc:
            return None, str(exc)
        return retry, None

    # -- undo ------------------------------------------------------------------------------------
    def undo_owed(self, gist) -> list[str]:
        """On start: the undos recorded retries still owe (a kill came between the retry and its undo, or
        the undo failed). The weight side runs with `gist` None, before the pool is opened, since opening
        compresses the queued retries on the current weights; the gist side once the pool is open."""
        other_side = or_(and_(Stage.route == GIST, Edit.backend != GIST),
                         and_(Stage.route != GIST, Edit.backend == GIST))
        with self.store.transaction() as s:
            ids = sorted(set(s.scalars(select(Stage.fact_id).join(Edit, Edit.fact_id == Stage.fact_id).where(
                Stage.stage.in_((ROUTED, VERIFYING, APPLIED)), Edit.status == "applied", other_side))))
            owed = [(i, route) for i in ids if (route := owed_undo(s, i)) is not None]
        notes = []
        for fact_id, route in owed:
            if route != GIST or gist is not None:
                notes += self._undo(fact_id, route, gist)
        return notes

    def _undo(self, fact_id: int, route: str, gist) -> list[str]:
        """Take the failed route's edit out; idempotent (nothing applied there: nothing to do)."""
        why = f"retried on {'ice' if route == GIST else GIST}: {route} did not learn it"
        try:
            if route == GIST:
                if gist is None:
                    return [f"fact {fact_id}: the gist pool is not open, so its gist is removed on a later run"]
                gist.remove(fact_id, reason=why)
                return [f"fact {fact_id}: its gist left the pool ({why})"]
            state, editor = self.backends.state, self.backends.editor
            edits = state.applied_edits()  # in model order
            mine = next((i for i, e in enumerate(edits) if e.fact_id == fact_id), None)
            later = {e.backend for e in edits[mine + 1:]} if mine is not None else set()
            # Re-edit the later facts on the model without this edit, as `engram rollback` does; with no
            # editor for one of their backends, replay their recorded deltas instead.
            fits = editor is not None and later <= {self.weight_backend}
            state.rollback(fact_id, {self.weight_backend: editor} if fits else None)
            return [f"fact {fact_id}: its weight edit was rolled back ({why})"]
        except NotFoundError:
            return []
        except EngramError as exc:
            return [f"fact {fact_id}: undoing its {route} edit failed ({exc}); it is tried again on the next start"]

    def reedit_owed(self) -> list[str]:
        """Later facts a rollback queued for re-editing and a kill left pending (applied facts, ice route)."""
        editor = self.backends.editor
        if editor is None:
            return []
        held = aliased(Edit)  # the outer query's Edit is the pending row
        with self.store.transaction() as s:
            in_weights = exists().where(held.fact_id == Fact.id, held.status == "applied", held.backend != GIST)
            rows = s.execute(select(Fact, Edit.backend).join(Edit, Edit.fact_id == Fact.id)
                             .join(Stage, Stage.fact_id == Fact.id)
                             .where(Stage.stage.in_((APPLIED, VERIFYING)), Stage.route == "ice",
                                    Edit.status == "pending", Edit.backend != GIST, Fact.status == "active",
                                    ~in_weights).order_by(Edit.id)).all()
        notes, seen = [], set()
        for fact, backend in rows:
            if fact.id in seen or route_of_backend(backend) != "ice":
                continue
            seen.add(fact.id)
            if backend != self.weight_backend:
                notes.append(f"fact {fact.id}: its {backend} re-edit is pending; `engram edit` takes it")
                continue
            self.backends.state.apply(fact, editor, backend)
            notes.append(f"fact {fact.id}: re-edited (a rollback before the last stop queued it)")
        return notes
