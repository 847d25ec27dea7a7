"""What the router decided for a fact, why, and what happened after: read from the store alone.

A fact's story is its event log in order: each "routed" event opens a step (a decision), and the
"applied", "edit_failed", "verified" and "rolled_back" events after it, up to the next decision, say what
came of it. The edits table gives the current state of the latest route.
"""
from __future__ import annotations

from sqlalchemy import select

from agent.router.policy import ROUTES
from agent.router.router import ROUTED, route_of_backend
from agent.router.verify import VERIFIED
from memory.models import Edit, Event, Fact

OUTCOME_KINDS = ("applied", "edit_failed", VERIFIED, "rolled_back")


def _at(value) -> str | None:
    return value.isoformat() if value is not None else None


def _event_route(event: Event, edit_routes: dict[int, str]) -> str | None:
    detail = event.detail or {}
    if "route" in detail:
        return detail["route"]
    if "backend" in detail:
        return route_of_backend(detail["backend"])
    return edit_routes.get(detail.get("edit"))  # a weight rollback names its edit row, not its backend


def _steps(events: list[Event], edit_routes: dict[int, str]) -> list[dict]:
    """One step per decision; each outcome event goes to the latest decision of its route."""
    steps: list[dict] = []
    for event in events:
        detail = event.detail or {}
        if event.kind == ROUTED:
            steps.append({"route": detail.get("route"), "reason": detail.get("reason"),
                          "inputs": detail.get("inputs", {}), "policy": detail.get("policy", {}),
                          "at": _at(event.created_at), "events": []})
        elif event.kind in OUTCOME_KINDS:
            route = _event_route(event, edit_routes)
            owner = next((step for step in reversed(steps) if step["route"] == route), None)
            if owner is not None:
                owner["events"].append({"kind": event.kind, "detail": detail, "at": _at(event.created_at)})
    return steps


def _step_summary(step: dict) -> str:
    parts = []
    for e in step["events"]:
        d = e["detail"]
        if e["kind"] == "applied":
            parts.append("applied")
        elif e["kind"] == "edit_failed":
            parts.append(f"edit failed ({d.get('error')})")
        elif e["kind"] == "rolled_back":
            parts.append("rolled back" + (f" ({d['reason']})" if d.get("reason") else ""))
        elif d.get("ok") is True:
            parts.append("verified")
        elif d.get("ok") is False:
            parts.append(f"not learned (answered {d.get('answer')!r}, target {d.get('target')!r})")
        else:
            parts.append("not checked" + (f" ({d['note']})" if d.get("note") else ""))
    head = ("retried on " if step["inputs"].get("retry_of") else "routed to ") + str(step["route"])
    return head + ": " + (", ".join(parts) if parts else "not applied yet")


def explain(store, fact_id: int) -> dict:
    """The latest decision of a fact (route, reason, inputs, policy), every decision, its verifications, its
    edits, and the outcome. NotFoundError for an unknown fact; a fact never routed says so in "message"."""
    fact = store.get_fact(fact_id)
    with store.transaction() as s:
        events = list(s.scalars(select(Event).where(Event.fact_id == fact_id).order_by(Event.id)))
        edits = list(s.scalars(select(Edit).where(Edit.fact_id == fact_id).order_by(Edit.id)))
    steps = _steps(events, {e.id: route_of_backend(e.backend) for e in edits})
    payload = {
        "fact_id": fact.id, "statement": fact.statement, "status": fact.status, "scope": fact.scope,
        "routed": bool(steps),
        "decision": None,
        "decisions": [{k: v for k, v in step.items() if k != "events"} for step in steps],
        "verifications": [{"route": (e.detail or {}).get("route"), **{k: (e.detail or {}).get(k) for k in
                                                                       ("ok", "answer", "target", "note")},
                           "at": _at(e.created_at)} for e in events if e.kind == VERIFIED],
        "edits": [{"id": e.id, "backend": e.backend, "route": route_of_backend(e.backend), "status": e.status,
                   "model_version": e.model_version, "error": e.error, "at": _at(e.created_at)} for e in edits],
    }
    if not steps:
        pending = [e.backend for e in edits if e.status == "pending"]
        payload["message"] = (f"fact {fact.id} was never routed: no routing decision is recorded for it"
                              + (f" (queued for {', '.join(pending)} by hand, without the router)" if pending
                                 else " (stored by `engram ingest`, or still waiting for `engram run`)"))
        payload["outcome"] = None
        return payload
    latest = steps[-1]
    payload["decision"] = payload["decisions"][-1]
    on_route = [e for e in edits if route_of_backend(e.backend) == latest["route"]]
    checks = [e["detail"].get("ok") for e in latest["events"] if e["kind"] == VERIFIED]
    payload["outcome"] = {
        "route": latest["route"],
        "state": on_route[-1].status if on_route else "not applied",
        "verified": checks[-1] if checks else None,
        "retried": any(step["inputs"].get("retry_of") for step in steps),
        "summary": "; ".join(_step_summary(step) for step in steps),
    }
    return payload


def route_counts(store) -> dict:
    """Per route, over active facts: routed (latest decision), applied (an applied edit on the route),
    verified and not_learned (the latest check on that route), and retried (facts that moved to it)."""
    counts = {route: {"routed": 0, "applied": 0, "verified": 0, "not_learned": 0, "retried": 0} for route in ROUTES}
    with store.transaction() as s:
        active = select(Fact.id).where(Fact.status == "active")
        applied = {(fid, route_of_backend(b)) for fid, b in s.execute(
            select(Edit.fact_id, Edit.backend).where(Edit.status == "applied", Edit.fact_id.in_(active)))}
        rows = s.execute(select(Event.fact_id, Event.kind, Event.detail)
                         .where(Event.kind.in_((ROUTED, VERIFIED)), Event.fact_id.in_(active)).order_by(Event.id))
        latest_route: dict[int, dict] = {}
        latest_check: dict[tuple[int, str], bool | None] = {}
        for fid, kind, detail in rows:
            detail = detail or {}
            if kind == ROUTED:
                latest_route[fid] = detail
            elif detail.get("route") in ROUTES:
                latest_check[(fid, detail["route"])] = detail.get("ok")
    for detail in latest_route.values():
        if detail.get("route") in ROUTES:
            counts[detail["route"]]["routed"] += 1
            counts[detail["route"]]["retried"] += bool((detail.get("inputs") or {}).get("retry_of"))
    for fid, route in applied:
        counts[route]["applied"] += 1
        ok = latest_check.get((fid, route))
        counts[route]["verified"] += ok is True
        counts[route]["not_learned"] += ok is False
    return counts
