"""The loop's steps, one per stage transition. Each step does its work outside any transaction (a model
or an LLM may take seconds), then records its result and the stage move in one transaction, so a kill
leaves the fact at the stage before the step or the one after, never between.

- contexts: paraphrase contexts from the configured generator (agent/contexts.py), unless the fact came
  with its own; text facts and `--contexts none` pass straight through.
- route: the router's decision, its "routed" event and the pending `edits` row it creates (backend =
  the route), in one transaction.
- apply: ModelState.apply (weights) or GistState.add (the pool) fulfils that pending row; the stage
  then settles from the row (memory.stages.settle), which is also how a restart completes a fact whose
  edit committed just before a kill.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import exists, insert, select, update

from memory.models import Context, Edit, Event, Fact, Stage
from memory.stages import CONTEXTS, ROUTED, STORED, advance, queue_edit
from memory.store import FactStore

GIST = "gist"


@dataclass(frozen=True)
class Routed:
    fact_id: int
    route: str
    backend: str
    reason: str
    edit_id: int


def contexts_step(store: FactStore, owner: str, fact: Fact, generator) -> int:
    """stored -> contexts; returns how many contexts were generated. A text fact first gets its subject,
    relation, prompt and target extracted (agent/extract), so the mention gate can scope it and ICE can
    learn it; a sentence that yields nothing stays a text fact, with the reason recorded."""
    from agent.extract import apply_extraction, extract_fact, record_extraction

    texts, name, error = [], None, None
    extraction = None
    if fact.text and (fact.prompt is None or fact.target is None):
        extraction = extract_fact(fact.text, generator)  # outside the transaction: a model may take seconds
    prompt, target = (extraction.prompt, extraction.target) if extraction is not None and extraction.ok \
        else (fact.prompt, fact.target)
    if generator is not None and prompt is not None and target is not None:
        with store.transaction() as s:
            has = s.scalar(select(exists().where(Context.fact_id == fact.id)))
        if not has:  # contexts the fact came with are used as they are
            from agent.contexts import contexts_for

            texts, name, error = contexts_for(prompt, target, generator)
    with store.transaction() as s:
        if extraction is not None:
            record_extraction(s, fact.id, extraction)
            apply_extraction(s, fact, extraction)  # fills the row and `fact` for the route step
        if texts:
            s.execute(insert(Context), [{"fact_id": fact.id, "text": t, "generator": name} for t in texts])
            s.add(Event(fact_id=fact.id, kind="contexts", detail={"generator": name, "n": len(texts)}))
        if error:  # the generator failed and the templates stood in: recorded, never blocking
            s.add(Event(fact_id=fact.id, kind="contexts_failed",
                        detail={"generator": getattr(generator, "name", "?"), "error": error}))
        advance(s, fact.id, owner, STORED, CONTEXTS)
    return len(texts)


def route_step(store: FactStore, owner: str, fact: Fact, router, backlog: int, weight_backend: str) -> Routed:
    """contexts -> routed: the decision (made in the transaction, so the router can look at the store),
    its event and the pending edit row commit together."""
    with store.transaction() as s:
        decision = router.decide(fact, backlog, session=s)
        backend = GIST if decision.route == GIST else weight_backend
        edit_id = queue_edit(s, fact.id, backend, f"re-routed to {decision.route} by the agent")
        router.record(s, fact.id, decision)
        advance(s, fact.id, owner, CONTEXTS, ROUTED, route=decision.route, edit_id=edit_id)
    return Routed(fact.id, decision.route, backend, decision.reason, edit_id)


def apply_weights(state, editor, fact: Fact, routed: Routed) -> None:
    """routed -> (applied | a failed attempt), recorded in the edit row by ModelState.apply itself."""
    try:
        state.apply(fact, editor, routed.backend)
    except Exception as exc:  # noqa: BLE001 - e.g. a fact the editor cannot take: this fact's failure
        fail_edits(state.store, [routed.edit_id], f"{type(exc).__name__}: {exc}")


def apply_gist(gist, facts: Sequence[Fact], edit_ids: Sequence[int]) -> str | None:
    """Compress `facts` into the pool (GistState drains every pending gist row, these among them).
    A failure marks their rows failed, so each is retried on its own; returns the error, if any."""
    try:
        gist.add(list(facts))
    except Exception as exc:  # noqa: BLE001 - the batch's failure, recorded per fact
        error = f"{type(exc).__name__}: {exc}"
        fail_edits(gist.store, edit_ids, error)
        return error
    return None


def fail_edits(store: FactStore, edit_ids: Sequence[int], error: str) -> None:
    """Pending edit rows whose work failed: settle() counts the attempt."""
    with store.transaction() as s:
        s.execute(update(Edit).where(Edit.id.in_(list(edit_ids)), Edit.status == "pending")
                  .values(status="failed", error=error))


def pending_gist_edits(store: FactStore) -> list[int]:
    with store.transaction() as s:
        return list(s.scalars(select(Edit.id).where(Edit.backend == GIST, Edit.status == "pending")))


def load_facts(store: FactStore, fact_ids: Sequence[int]) -> dict[int, Fact]:
    with store.transaction() as s:
        return {f.id: f for f in s.scalars(select(Fact).where(Fact.id.in_(list(fact_ids))))}


def resume_routed(store: FactStore, fact_id: int) -> Routed:
    """The routing of a fact claimed at `routed`: routed by a process that stopped before applying it."""
    with store.transaction() as s:
        row = s.get(Stage, fact_id)
        backend = s.scalar(select(Edit.backend).where(Edit.id == row.edit_id)) or row.route
        return Routed(fact_id, row.route, backend, "routed before a restart", row.edit_id)
