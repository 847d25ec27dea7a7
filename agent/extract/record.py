"""Store an extraction beside its text fact (`extractions` table) and fill the fact from it.

Identity rules (why the content_hash never changes):
- A fact's content_hash is the hash of the record *as ingested* (for a text fact: its text, scope and
  user). Re-ingesting the same sentence must dedupe to this row, and it does because the stored hash is
  still the text-only hash; a rehash over the filled fields would make the same line a new fact.
- content_hash is unique: rehashing could also collide with a structured fact that states the same
  fields, and fail the update.
- A structured line with the same fields as the extraction has its own hash, so it is stored as a new
  fact, and add_facts lets it supersede this one through the keys they now share (the newer assertion
  wins), as for any two phrasings of a fact. No two active facts own one key.

Supersession: filling subject/relation/prompt gives the fact supersede keys (FactInput.supersede_keys)
that it did not have when add_facts ran. apply_extraction settles them the way add_facts would have: of
the active facts in the same scope and user that own one of those keys, the most recently asserted one
(its latest "ingested" or "reactivated" event) stays active and the others are superseded by it, with a
"superseded" event each. A fact that was re-asserted (reactivated) therefore wins over an older owner.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.extract.base import Extraction, norm
from memory.errors import NotFoundError
from memory.facts import FactInput
from memory.models import Event, Fact, FactExtraction

_FIELDS = ("subject", "relation", "prompt", "target")


@dataclass
class Applied:
    """What apply_extraction did: `filled` the fact's fields (or why not, in `reason`); the facts it
    `superseded`; or the newer fact this one turned out to be `superseded_by`."""

    filled: bool
    reason: str | None = None
    superseded: list[int] = field(default_factory=list)
    superseded_by: int | None = None


def _values(extraction: Extraction) -> dict:
    return {"status": extraction.status, "method": extraction.method, "generator": extraction.generator,
            "subject": extraction.subject, "relation": extraction.relation, "prompt": extraction.prompt,
            "target": extraction.target, "reason": extraction.reason}


def latest_extraction(session: Session, fact_id: int) -> FactExtraction | None:
    """The current extraction of a fact (the latest row), or None if it has none."""
    query = select(FactExtraction).where(FactExtraction.fact_id == fact_id).order_by(FactExtraction.id.desc())
    return session.scalars(query.limit(1)).first()


def as_extraction(row: FactExtraction) -> Extraction:
    return Extraction(row.subject, row.relation, row.prompt, row.target, method=row.method,
                      generator=row.generator, reason=row.reason)


def record_extraction(session: Session, fact_id: int, extraction: Extraction) -> int:
    """Store `extraction` for the fact, in the caller's transaction, with an "extracted" (or
    "extraction_none") event; returns the row id. Idempotent: the same outcome as the current row is not
    stored twice (a step replayed after a kill records once)."""
    if session.get(Fact, fact_id) is None:
        raise NotFoundError(f"no fact with id {fact_id}")
    values = _values(extraction)
    current = latest_extraction(session, fact_id)
    if current is not None and all(getattr(current, k) == v for k, v in values.items()):
        return current.id
    row = FactExtraction(fact_id=fact_id, **values)
    session.add(row)
    session.flush()  # the id, for the event
    kind = "extracted" if extraction.ok else "extraction_none"
    detail = {"extraction_id": row.id, "method": extraction.method, "generator": extraction.generator}
    detail.update({k: getattr(extraction, k) for k in _FIELDS} if extraction.ok else {})
    if extraction.reason:
        detail["reason"] = extraction.reason
    session.add(Event(fact_id=fact_id, kind=kind, detail=detail))
    return row.id


def apply_extraction(session: Session, fact: Fact, extraction: Extraction, supersede: bool = True) -> Applied:
    """Fill a text fact's subject, relation, prompt and target from an ok extraction, in the caller's
    transaction, and settle the supersede keys it gains (see the module docstring). The content_hash is
    left as it is. `fact` (possibly detached) gets the same values, so the caller can route it next.

    Not filled: a "none" extraction (the fact stays a text fact), a fact that already has a different
    prompt or target (supplied fields are never overwritten), or a supplied subject that differs."""
    row = session.get(Fact, fact.id)
    if row is None:
        raise NotFoundError(f"no fact with id {fact.id}")
    if not extraction.ok:
        return Applied(False, extraction.reason or "nothing was extracted")
    same = (row.prompt, row.target) == (extraction.prompt, extraction.target)
    if not same and (row.prompt is not None or row.target is not None):
        return Applied(False, "the fact already has a prompt and target")
    if row.subject is not None and norm(row.subject) != norm(extraction.subject):
        return Applied(False, f"the extracted subject {extraction.subject!r} differs from the fact's {row.subject!r}")
    if not same:
        for name in _FIELDS:
            if getattr(row, name) is None:
                setattr(row, name, getattr(extraction, name))
        session.add(Event(fact_id=row.id, kind="extraction_applied",
                          detail={k: getattr(row, k) for k in _FIELDS} | {"method": extraction.method}))
    if fact is not row:  # the caller's copy reads as the row does
        for name in _FIELDS:
            setattr(fact, name, getattr(row, name))
    applied = Applied(True)
    if supersede and row.status == "active":
        settle_keys(session, row, applied)
        if applied.superseded_by is not None and fact is not row:
            fact.status, fact.superseded_by = row.status, row.superseded_by
    return applied


def _keys(fact: Fact) -> set[tuple]:
    probe = FactInput(prompt=fact.prompt, target=fact.target, subject=fact.subject, relation=fact.relation,
                      text=fact.text, scope=fact.scope, user_id=fact.user_id)
    return set(probe.supersede_keys())


def _asserted(session: Session, ids: list[int]) -> dict[int, int]:
    """When each fact was last asserted: the id of its latest "ingested" or "reactivated" event."""
    query = (select(Event.fact_id, func.max(Event.id)).where(Event.fact_id.in_(ids),
                                                             Event.kind.in_(("ingested", "reactivated")))
             .group_by(Event.fact_id))
    return dict(session.execute(query).all())


def settle_keys(session: Session, row: Fact, applied: Applied | None = None) -> Applied:
    """Leave one active owner for each supersede key of `row`: the most recently asserted fact."""
    applied = applied or Applied(True)
    keys = _keys(row)
    if not keys:
        return applied
    query = select(Fact).where(Fact.status == "active", Fact.id != row.id, Fact.scope == row.scope,
                               (Fact.prompt == row.prompt)
                               | (func.lower(Fact.subject) == (row.subject or "").lower()))
    query = query.where(Fact.user_id.is_(None) if row.user_id is None else Fact.user_id == row.user_id)
    rivals = [f for f in session.scalars(query) if _keys(f) & keys]
    if not rivals:
        return applied
    when = _asserted(session, [row.id] + [f.id for f in rivals])
    for key in sorted(keys):  # per key, as add_facts does: its newest owner stays
        owners = [f for f in [row] + rivals if f.status == "active" and key in _keys(f)]
        newest = max(owners, key=lambda f: (when.get(f.id, 0), f.id))
        for loser in owners:
            if loser is not newest:
                loser.status, loser.superseded_by = "superseded", newest.id
                session.add(Event(fact_id=loser.id, kind="superseded", detail={"by": newest.id, "via": "extraction"}))
                if loser is row:
                    applied.superseded_by = newest.id
                else:
                    applied.superseded.append(loser.id)
    applied.superseded.sort()
    return applied
