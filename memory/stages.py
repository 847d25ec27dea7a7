"""Durable stages of the agent loop, at the store level: claims under leases, transitions, outcomes.

A fact the agent ingests gets a `stages` row in the transaction that stores it, and then moves
stored -> contexts -> routed -> applied; with verified routing it passes `verifying` between routed and
applied (its edit is applied, the greedy check of its own prompt is owed: agent/loop/verify.py). Two
more ends: `failed` (parked after `max_attempts` failed attempts, with its last error) and `dropped`
(superseded or deleted before it was applied).

- **Claims.** A process works on a fact only while it holds the row's lease (owner id + expiry). A
  lease is stale when it expired, or when its owner was a process on this host that no longer runs:
  a stale lease is taken over (counted in `takeovers`; a fact whose step keeps killing the process is
  parked after `max_takeovers`). On PostgreSQL the claim locks its rows with `FOR UPDATE SKIP LOCKED`:
  agents claiming at once on one store skip each other's rows instead of waiting on or doubling them
  (SQLite ignores the clause; it lets one writer in at a time anyway).
- **Transitions** are compare-and-set on (stage, lease owner), in the caller's transaction, so a step's
  result and its stage commit together or not at all.
- **Settling.** Routing creates the pending `edits` row (the existing work queue) that the editors
  fulfil. A stage at `routed` takes its outcome from that row once the row is no longer pending:
  applied -> applied (or verifying); failed -> a failed attempt; closed (the fact went inactive) ->
  dropped. An edit committed just before a kill is thereby completed on restart, never redone.
"""
from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from memory.connect import upsert
from memory.errors import StoreError
from memory.models import Edit, Event, Fact, SourceOffset, Stage, utcnow

STORED, CONTEXTS, ROUTED, APPLIED, FAILED, DROPPED = "stored", "contexts", "routed", "applied", "failed", "dropped"
VERIFYING = "verifying"  # applied, its check not recorded yet
STAGES = (STORED, CONTEXTS, ROUTED, VERIFYING, APPLIED, FAILED, DROPPED)
OPEN = (STORED, CONTEXTS, ROUTED, VERIFYING)  # stages with work left
GIST = "gist"  # the gist pool's backend; every other backend edits the weights


class LeaseLostError(StoreError):
    """Another process took over a fact this one was working on."""


@dataclass(frozen=True)
class Outcome:
    """A fact that reached an end, or a failed attempt (stage is where it waits again)."""

    fact_id: int
    stage: str
    route: str | None = None
    error: str | None = None
    attempts: int = 0
    verified: bool | None = None  # the check's answer, once one was recorded (None: unchecked or uncheckable)


def owner_id() -> str:
    """This process as a lease owner: host, pid, and a token (a reused pid is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_alive(owner: str) -> bool:
    """False only when `owner` was a process on this host that no longer runs; another host's
    owner counts as alive (its lease then ends by expiry)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# -- source offsets ---------------------------------------------------------------------------------
def read_offset(store, key: str) -> tuple[int, int]:
    """(bytes, lines) of `key` consumed so far; (0, 0) for a new source."""
    with store.transaction() as s:
        row = s.get(SourceOffset, key)
        return (row.offset, row.line) if row else (0, 0)


def write_offset(session: Session, key: str, offset: int, line: int) -> None:
    upsert(session, SourceOffset, {"key": key, "offset": offset, "line": line, "updated_at": utcnow()})


# -- rows -------------------------------------------------------------------------------------------
def open_stages(session: Session, fact_ids: Iterable[int]) -> list[int]:
    """Stage rows for facts just stored or reactivated (in the storing transaction): `stored`, or
    `applied` for a reactivated fact whose edit is still applied. Inactive ones get none."""
    ids = sorted(set(fact_ids))
    if not ids:
        return []
    active = set(session.scalars(select(Fact.id).where(Fact.id.in_(ids), Fact.status == "active")))
    applied = dict(session.execute(select(Edit.fact_id, Edit.backend).where(
        Edit.fact_id.in_(ids), Edit.status == "applied")).all())
    existing = {row.fact_id: row for row in session.scalars(select(Stage).where(Stage.fact_id.in_(ids)))}
    opened = []
    for fact_id in ids:
        if fact_id not in active:
            continue
        backend = applied.get(fact_id)
        fields = {"stage": APPLIED if backend else STORED, "route": _route(backend) if backend else None,
                  "edit_id": None, "attempts": 0, "takeovers": 0, "lease_owner": None, "lease_until": None,
                  "error": None, "updated_at": utcnow()}
        row = existing.get(fact_id)
        if row is None:
            session.add(Stage(fact_id=fact_id, **fields))
        else:
            for key, value in fields.items():
                setattr(row, key, value)
        if not backend:
            opened.append(fact_id)
    return opened


def add_with_stages(store, facts):
    """Store `facts` and open their stage rows in one transaction: what a source line, `POST /v1/facts` and
    `engram chat`'s /remember all do, so the agent routes and applies them. Returns the AddReport."""
    with store.transaction() as s:
        added = store.add_facts(facts, session=s)
        open_stages(s, added.new_ids)
    return added


def _route(backend: str) -> str:
    return GIST if backend == GIST else "ice"


def _same_side(route: str):
    """The edits that belong to `route`: gist rows for the pool, weight rows (ice, ftm) for ice."""
    return Edit.backend == GIST if route == GIST else Edit.backend != GIST


@dataclass(frozen=True)
class Claimed:
    fact_id: int
    stage: str
    route: str | None
    attempts: int


def claim(store, owner: str, lease_s: float, limit: int, max_takeovers: int) -> tuple[list[Claimed], list[Outcome]]:
    """Lease up to `limit` facts with work left (oldest first): free ones, ours, and stale ones. Returns
    them, and the facts parked because their step was interrupted more than `max_takeovers` times."""
    now = time.time()
    with store.transaction() as s:
        held = s.scalars(select(Stage.lease_owner).distinct().where(
            Stage.stage.in_(OPEN), Stage.lease_owner.is_not(None), Stage.lease_owner != owner,
            Stage.lease_until >= now))
        dead = [o for o in held if not owner_alive(o)]
        free = or_(Stage.lease_owner.is_(None), Stage.lease_owner == owner, Stage.lease_until < now,
                   Stage.lease_owner.in_(dead))
        rows = list(s.scalars(select(Stage).where(Stage.stage.in_(OPEN), free).order_by(Stage.fact_id)
                              .limit(limit).with_for_update(skip_locked=True)))
        claimed, parked = [], []
        for row in rows:
            if row.lease_owner not in (None, owner):
                row.takeovers += 1
                s.add(Event(fact_id=row.fact_id, kind="lease_taken_over", detail={
                    "from": row.lease_owner, "stage": row.stage, "takeovers": row.takeovers}))
                if row.takeovers > max_takeovers:
                    error = f"its {row.stage} step was interrupted {row.takeovers} times (the process died during it)"
                    # An applied fact whose check keeps killing the process stays applied, unchecked.
                    parked.append(_unchecked(s, row, error) if row.stage == VERIFYING else _park(s, row, error))
                    continue
            row.lease_owner, row.lease_until, row.updated_at = owner, now + lease_s, utcnow()
            claimed.append(Claimed(row.fact_id, row.stage, row.route, row.attempts))
    return claimed, parked


def renew(store, owner: str, fact_ids: Iterable[int], lease_s: float) -> None:
    ids = list(fact_ids)
    if ids:
        with store.transaction() as s:
            s.execute(update(Stage).where(Stage.fact_id.in_(ids), Stage.lease_owner == owner)
                      .values(lease_until=time.time() + lease_s))


def release(store, owner: str, fact_ids: Iterable[int] | None = None) -> None:
    """Give up our leases (all of them, or these facts'): the work waits for the next claim."""
    query = update(Stage).where(Stage.lease_owner == owner)
    if fact_ids is not None:
        query = query.where(Stage.fact_id.in_(list(fact_ids)))
    with store.transaction() as s:
        s.execute(query.values(lease_owner=None, lease_until=None))


def advance(session: Session, fact_id: int, owner: str, frm: str, to: str, **fields) -> None:
    """Move one fact from `frm` to `to` (with `fields`), if we still hold its lease there."""
    values = {"stage": to, "updated_at": utcnow(), **fields}
    if to in (APPLIED, FAILED, DROPPED):
        values.update(lease_owner=None, lease_until=None)
    done = session.execute(update(Stage).where(Stage.fact_id == fact_id, Stage.stage == frm,
                                               Stage.lease_owner == owner).values(**values)).rowcount
    if done != 1:
        raise LeaseLostError(f"fact {fact_id} is no longer ours at stage {frm} (another process took it over); "
                             "its step is not recorded")


def queue_edit(session: Session, fact_id: int, backend: str, reason: str) -> int:
    """The pending edit row a routing decision creates (one of the fact's pending rows on this backend
    is reused; pending rows on another backend are closed, with `reason`). Returns its id."""
    rows = list(session.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.status == "pending")
                                .order_by(Edit.id)))
    keep = next((row for row in rows if row.backend == backend), None)
    for row in rows:
        if row is not keep:
            row.status, row.error = "rolled_back", reason
    if keep is None:
        keep = Edit(fact_id=fact_id, backend=backend, status="pending")
        session.add(keep)
        session.flush()
    return keep.id


def drop(session: Session, fact_id: int, owner: str, frm: str, reason: str) -> Outcome:
    """A fact that went inactive before it was applied: its pending edits are closed, its stage ends."""
    session.execute(update(Edit).where(Edit.fact_id == fact_id, Edit.status == "pending")
                    .values(status="rolled_back", error=reason))
    advance(session, fact_id, owner, frm, DROPPED, error=reason, edit_id=None)
    session.add(Event(fact_id=fact_id, kind="dropped", detail={"reason": reason, "stage": frm}))
    return Outcome(fact_id, DROPPED, error=reason)


def record_failure(session: Session, fact_id: int, error: str, max_attempts: int, retry_stage: str) -> Outcome:
    """One failed attempt: the fact waits at `retry_stage` for the next claim, or is parked `failed`
    with this error once it has failed `max_attempts` times."""
    row = session.get(Stage, fact_id)
    row.attempts += 1
    row.error, row.edit_id, row.updated_at = error, None, utcnow()
    row.lease_owner = row.lease_until = None
    if row.attempts >= max_attempts:
        return _park(session, row, error)
    failed_at, row.stage = row.stage, retry_stage
    session.add(Event(fact_id=fact_id, kind="attempt_failed", detail={
        "stage": failed_at, "error": error, "attempts": row.attempts}))
    return Outcome(fact_id, retry_stage, row.route, error, row.attempts)


def _park(session: Session, row: Stage, error: str) -> Outcome:
    session.add(Event(fact_id=row.fact_id, kind="failed", detail={
        "stage": row.stage, "error": error, "attempts": row.attempts}))
    row.stage, row.error, row.edit_id = FAILED, error, None
    row.lease_owner = row.lease_until = None
    return Outcome(row.fact_id, FAILED, row.route, error, row.attempts)


def _unchecked(session: Session, row: Stage, error: str) -> Outcome:
    session.add(Event(fact_id=row.fact_id, kind="verify_skipped", detail={"error": error}))
    row.stage, row.error = APPLIED, error
    row.lease_owner = row.lease_until = None
    return Outcome(row.fact_id, APPLIED, row.route, error, row.attempts)


def settle(store, max_attempts: int, fact_ids: Iterable[int] | None = None, verify: bool = False) -> list[Outcome]:
    """Give every `routed` stage whose edit row is no longer pending that row's outcome (see the module
    doc). Records only what already happened, so it needs no lease; safe to run at any time. With
    `verify`, an applied edit moves the stage to `verifying` (its lease kept: the applier checks it next)."""
    query = (select(Stage, Edit, Fact.status).join(Edit, Edit.id == Stage.edit_id).join(Fact, Fact.id == Stage.fact_id)
             .where(Stage.stage == ROUTED, Edit.status != "pending").order_by(Stage.fact_id)
             .with_for_update(of=Stage, skip_locked=True))  # two agents settling at once: one records each
    if fact_ids is not None:
        query = query.where(Stage.fact_id.in_(list(fact_ids)))
    outcomes = []
    with store.transaction() as s:
        for row, edit, fact_status in s.execute(query).all():
            applied = edit if edit.status == "applied" else s.scalars(select(Edit).where(
                Edit.fact_id == row.fact_id, Edit.status == "applied", _same_side(row.route)).order_by(Edit.id)).first()
            if applied is not None:
                row.stage, row.edit_id, row.error, row.updated_at = (VERIFYING if verify else APPLIED), applied.id, \
                    None, utcnow()
                if not verify:
                    row.lease_owner = row.lease_until = None
                outcomes.append(Outcome(row.fact_id, row.stage, row.route, attempts=row.attempts))
            elif fact_status != "active":
                reason = edit.error or f"fact {row.fact_id} is {fact_status}"
                row.stage, row.error, row.updated_at = DROPPED, reason, utcnow()
                row.lease_owner = row.lease_until = None
                s.add(Event(fact_id=row.fact_id, kind="dropped", detail={"reason": reason, "stage": ROUTED}))
                outcomes.append(Outcome(row.fact_id, DROPPED, row.route, reason))
            else:
                error = edit.error or f"its {edit.backend} edit was {edit.status.replace('_', ' ')}"
                outcomes.append(record_failure(s, row.fact_id, error, max_attempts, retry_stage=CONTEXTS))
    return outcomes


# -- summaries --------------------------------------------------------------------------------------
def ice_backlog(session: Session) -> int:
    """Facts routed to ICE and not applied yet: the router's `backlog`."""
    return session.scalar(select(func.count()).select_from(Stage).where(Stage.stage == ROUTED,
                                                                         Stage.route == "ice")) or 0


def stage_counts(store) -> dict:
    """{"stages": {stage: n}, "routes": {route: n applied}} over every fact the agent has seen."""
    with store.transaction() as s:
        by_stage = dict(s.execute(select(Stage.stage, func.count()).group_by(Stage.stage)).all())
        routes = dict(s.execute(select(Stage.route, func.count()).where(Stage.stage == APPLIED)
                                .group_by(Stage.route)).all())
    return {"stages": {name: by_stage.get(name, 0) for name in STAGES},
            "routes": {route: n for route, n in routes.items() if route}}
