"""The router the loop asks: agent/router's Router when it is there, else a minimal fallback.

Both answer `decide(fact, backlog, session=...) -> decision` (with `route`, `reason`, `inputs`; the
session lets the router look up what the fact supersedes) and `record(session, fact_id, decision)`,
which writes the "routed" event in the caller's transaction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from memory.models import Event

log = logging.getLogger(__name__)

ICE, GIST = "ice", "gist"


class RouterLike(Protocol):
    def decide(self, fact, backlog: int, *, session=None): ...

    def record(self, session, fact_id: int, decision) -> None: ...


@dataclass(frozen=True)
class FallbackDecision:
    route: str
    reason: str
    inputs: dict = field(default_factory=dict)


class FallbackRouter:
    """Scoped facts, text facts and facts with a subject go to the gist pool (the mention gate can scope
    them); global prompt/target facts with no subject go to ICE."""

    def decide(self, fact, backlog: int, *, session=None) -> FallbackDecision:
        inputs = {"scope": fact.scope, "has_subject": bool(fact.subject), "backlog": backlog}
        if fact.scope != "global":
            return FallbackDecision(GIST, f"{fact.scope}-scoped facts never go into the shared weights", inputs)
        if fact.prompt is None or fact.target is None:
            return FallbackDecision(GIST, "text only: ICE needs a prompt and a target", inputs)
        if fact.subject:
            return FallbackDecision(GIST, "has a subject: the gist pool's mention gate scopes it", inputs)
        return FallbackDecision(ICE, "no subject: the mention gate cannot scope it, so ICE edits the weights", inputs)

    def record(self, session, fact_id: int, decision) -> None:
        session.add(Event(fact_id=fact_id, kind="routed", detail={
            "route": decision.route, "reason": decision.reason, "inputs": decision.inputs, "policy": "fallback"}))


def default_router(store=None) -> RouterLike:
    """agent/router's Router with the store's recorded policy (or its default), else the fallback."""
    try:
        from agent.router import Router
    except ImportError:
        log.info("agent.router is not installed: routing with the fallback (subject -> gist, else ice)")
        return FallbackRouter()
    try:
        from agent.router import policy_from_store
    except ImportError:
        return Router()
    return Router(policy_from_store(store) if store is not None else None)
