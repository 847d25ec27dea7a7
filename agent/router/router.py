"""The router: one decision per fact from a RoutePolicy, recorded as a "routed" event with its reasons.

`decide` is pure (fact fields + backlog + which superseded facts still sit in the weights, looked up in
the caller's session when one is given). `record` writes the decision in the caller's transaction, so a
decision is committed with the stage that acts on it, or not at all.
"""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.router.policy import GIST, ICE, RouteDecision, RoutePolicy
from memory.errors import ConfigError, EditError
from memory.models import Edit, Event, Fact

ROUTED = "routed"
MAX_CHAIN = 64  # how far back a supersession chain is followed for a stale weight edit


def other_route(route: str) -> str:
    return GIST if route == ICE else ICE


def route_of_backend(backend: str) -> str:
    """The route an edit backend belongs to: the gist pool, or the weights (ice, ftm)."""
    return GIST if backend == GIST else ICE


def replaced_in_weights(session: Session, fact_id: int) -> list[int]:
    """Facts this one superseded (directly or along a chain) whose weight edit is still applied."""
    found, frontier = [], [fact_id]
    for _ in range(MAX_CHAIN):
        older = list(session.scalars(select(Fact.id).where(Fact.superseded_by.in_(frontier))))
        older = [i for i in older if i not in found and i != fact_id]
        if not older:
            break
        found += older
        frontier = older
    if not found:
        return []
    query = select(Edit.fact_id).where(Edit.fact_id.in_(found), Edit.status == "applied", Edit.backend != GIST)
    return sorted(set(session.scalars(query)))


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


class Router:
    def __init__(self, policy: RoutePolicy | None = None):
        self.policy = policy if policy is not None else RoutePolicy()

    # -- deciding ---------------------------------------------------------------------------------
    def decide(self, fact, backlog: int, *, session: Session | None = None,
               replaced: Sequence[int] | None = None) -> RouteDecision:
        """The route of `fact` (a memory.models.Fact, or anything with its fields). `backlog`: facts waiting
        for ICE now. `replaced`: superseded facts still in the weights; when None it is looked up in
        `session` (if given), else taken as none, and `inputs["supersession_checked"]` says which."""
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0:
            raise ConfigError(f"backlog must be a whole number >= 0, got {backlog!r}")
        checked = replaced is not None or (session is not None and getattr(fact, "id", None) is not None)
        if replaced is None:
            replaced = replaced_in_weights(session, fact.id) if checked else []
        p = self.policy
        scope = getattr(fact, "scope", None) or "global"
        has_pt = _text(getattr(fact, "prompt", None)) and _text(getattr(fact, "target", None))
        has_subject = _text(getattr(fact, "subject", None))
        inputs = {"scope": scope, "has_prompt_target": has_pt, "has_subject": has_subject, "backlog": backlog,
                  "max_ice_backlog": p.max_ice_backlog, "replaces_in_weights": list(replaced),
                  "rollback_first": list(replaced), "supersession_checked": checked, "consolidate_later": False}
        if scope not in p.weight_scopes:
            route, rule = GIST, "scope"
            reason = f"scope: {scope}-scoped facts never go into the shared weights (weight_scopes: " \
                     f"{', '.join(p.weight_scopes) or 'none'})"
        elif not has_pt:
            route, rule = GIST, "text_only"
            reason = "text only: ICE needs a prompt and a target, so the sentence goes to the gist pool"
        elif replaced:
            route, rule = p.supersede_route, "supersede"
            ids = ", ".join(map(str, replaced))
            reason = (f"supersede: replaces fact {ids} in the weights; its stale edit is rolled back and " +
                      ("ICE re-edits the weights with the new target" if route == ICE
                       else "the new target goes to the gist pool") + f" (supersede_route={route})")
        elif not has_subject:
            route, rule = p.subjectless_route, "no_subject"
            reason = ("no subject: the mention gate cannot scope it, and in the gist pool every query would "
                      f"read it (subjectless_route={route})")
        else:
            route, rule = p.default_route, "default"
            why = "the gist pool keeps locality and takes effect at once" if route == GIST \
                else "ICE is exact at gap-0"
            reason = f"default: a global fact with subject and prompt/target; {why} (default_route={route})"
        if route == ICE and backlog > p.max_ice_backlog:
            inputs["overridden"] = {"route": route, "rule": rule, "reason": reason}
            inputs["consolidate_later"] = True
            route, rule = GIST, "backlog"
            reason = (f"backlog: {backlog} facts wait for ICE (max_ice_backlog={p.max_ice_backlog}); "
                      f"gist now, weights later (instead of: {reason})")
        if route == GIST and not has_subject:
            inputs["warning"] = "no subject: every query reads this fact's gist"
        inputs["rule"] = rule
        return RouteDecision(route, reason, inputs)

    # -- retrying ---------------------------------------------------------------------------------
    def can_retry(self, decision: RouteDecision) -> tuple[bool, str]:
        """Whether a fact that `decision`'s route did not learn may be tried on the other route, and why not."""
        if not self.policy.retry_other_route:
            return False, "the policy does not retry: retry_other_route=false"
        if decision.is_retry:
            return False, f"already retried once (after {decision.inputs['retry_of']} did not learn it)"
        if decision.route == GIST:  # the way back into the weights obeys the same hard rules
            if decision.inputs.get("scope", "global") not in self.policy.weight_scopes:
                return False, f"{decision.inputs.get('scope')}-scoped facts never go into the shared weights"
            if not decision.inputs.get("has_prompt_target", False):
                return False, "ICE needs a prompt and a target"
        return True, ""

    def retry_route(self, decision: RouteDecision) -> RouteDecision:
        """The other route for a fact the first one did not learn. A fact is retried at most once:
        retrying a retry raises EditError (and so does `record` on a second retry of a fact)."""
        ok, why = self.can_retry(decision)
        if not ok:
            raise EditError(f"cannot retry on {other_route(decision.route)}: {why}")
        inputs = {**decision.inputs, "rule": "retry", "retry_of": decision.route, "previous_reason": decision.reason,
                  "undo_previous": self.policy.undo_failed_route, "consolidate_later": False}
        inputs.pop("overridden", None)
        return RouteDecision(other_route(decision.route), f"retry: {decision.route} did not learn it", inputs)

    # -- recording --------------------------------------------------------------------------------
    def record(self, session: Session, fact_id: int, decision: RouteDecision) -> None:
        """Add the "routed" event in the caller's transaction (committed with it, or not at all)."""
        if decision.is_retry and _retried(session, fact_id):
            raise EditError(f"fact {fact_id} was already retried on another route once; a fact is retried at most once")
        session.add(Event(fact_id=fact_id, kind=ROUTED, detail={
            "route": decision.route, "reason": decision.reason, "inputs": decision.inputs,
            "policy": self.policy.to_dict()}))


def _retried(session: Session, fact_id: int) -> bool:
    """Whether the fact was retried since it was last asserted (a reactivated fact may be retried anew)."""
    rows = session.execute(select(Event.kind, Event.detail).where(
        Event.fact_id == fact_id, Event.kind.in_((ROUTED, "reactivated"))).order_by(Event.id))
    retried = False
    for kind, detail in rows:
        retried = False if kind == "reactivated" else retried or bool((detail or {}).get("inputs", {}).get("retry_of"))
    return retried
