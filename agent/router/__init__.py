"""The router: ice or gist per fact, by a replaceable policy, recorded with its reason, verified, explained.

Light to import (no torch): `verify_fact` loads the model code only when it runs.
"""
from agent.router.explain import explain, route_counts
from agent.router.policy import (GIST, ICE, POLICY_META_KEY, ROUTES, RouteDecision, RoutePolicy, policy_from_store,
                                 save_policy)
from agent.router.router import ROUTED, Router, other_route, replaced_in_weights, route_of_backend
from agent.router.verify import VERIFIED, Verification, record_verification, verify_fact

__all__ = [
    "GIST", "ICE", "POLICY_META_KEY", "ROUTED", "ROUTES", "VERIFIED", "RouteDecision", "RoutePolicy", "Router",
    "Verification", "explain", "other_route", "policy_from_store", "record_verification", "replaced_in_weights",
    "route_counts", "route_of_backend", "save_policy", "verify_fact",
]
