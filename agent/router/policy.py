"""The routing policy (a typed, replaceable config) and the decision it produces.

The defaults were chosen by measurement: one 336-fact validation stream through three policies
(docs/agent.md). Sending everything with a prompt to the pool beat the mixed policy that sent subjectless
facts, and facts the pool missed, to ICE: each weight edit bled into the neighbours of every other fact
(locality 0.22 against 0.50 at the end). So subjectless facts go to the pool too, and a fact the pool
missed is not moved into the weights; both stay fields, so a policy can be swapped without code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from memory.errors import ConfigError
from memory.facts import SCOPES

ICE, GIST = "ice", "gist"
ROUTES = (ICE, GIST)
POLICY_META_KEY = "route_policy"  # where a store keeps its policy (JSON of RoutePolicy.to_dict())


@dataclass(frozen=True)
class RoutePolicy:
    """Which route a fact takes. The rules run in this order; the first that applies decides.

    1. scope: a fact whose scope is not in `weight_scopes` goes to the gist pool (user and session facts
       never enter the weights every user shares).
    2. text only: a fact without prompt + target goes to the gist pool; ICE needs both (not a field: there
       is no other choice).
    3. supersede: a fact replacing one whose weight edit is still applied goes to `supersede_route`. The
       stale edit is rolled back either way; "ice" re-edits the weights in its place (the rollback +
       re-edit path), "gist" leaves the weights at the rollback and serves the new target from the pool.
    4. no subject: the mention gate cannot scope such a fact, so in the pool every query would read it;
       it goes to `subjectless_route`.
    5. default: `default_route`.
    Then the backlog override: an ICE decision while more than `max_ice_backlog` facts wait for ICE goes
    to the gist pool now, flagged `consolidate_later` so consolidation moves it into the weights later.
    """

    default_route: str = GIST  # the pool keeps locality far better (README); the issue measures this
    weight_scopes: tuple[str, ...] = ("global",)  # only these scopes may enter the shared weights
    subjectless_route: str = GIST  # an unscoped gist is read by every query, but ICE edits cost more (measured)
    supersede_route: str = ICE  # the old target lives in the weights: replace it there
    max_ice_backlog: int = 25  # ~1 minute of ICE work at ~2.4 s a fact
    retry_other_route: bool = False  # True: a fact its route did not learn is tried once on the other (measured worse)
    undo_failed_route: bool = True  # a failed ICE edit still bleeds into neighbours: take it out on retry
    verify_max_new_tokens: int = 16  # the greedy check's budget; enough for a several-token target

    def __post_init__(self) -> None:
        for name in ("default_route", "subjectless_route", "supersede_route"):
            if getattr(self, name) not in ROUTES:
                raise ConfigError(f"route policy: {name} must be one of {', '.join(ROUTES)}, "
                                  f"got {getattr(self, name)!r}")
        scopes = self.weight_scopes
        if isinstance(scopes, str) or not all(s in SCOPES for s in scopes):
            raise ConfigError(f"route policy: weight_scopes must be a list of {', '.join(SCOPES)}, got {scopes!r}")
        object.__setattr__(self, "weight_scopes", tuple(scopes))  # a list from JSON stays hashable
        for name in ("max_ice_backlog", "verify_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_ice_backlog" else 1):
                raise ConfigError(f"route policy: {name} must be a whole number "
                                  f"{'>= 0' if name == 'max_ice_backlog' else '>= 1'}, got {value!r}")
        for name in ("retry_other_route", "undo_failed_route"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"route policy: {name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weight_scopes"] = list(self.weight_scopes)
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> RoutePolicy:
        """A policy from a dict (missing keys keep their defaults); unknown keys are refused by name."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"route policy: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(f.name for f in fields(cls))}")
        return cls(**data)

    def with_changes(self, **changes) -> RoutePolicy:
        return RoutePolicy.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class RouteDecision:
    """Where one fact goes, why (a reason that starts with its rule's name), and what the rule looked at."""

    route: str
    reason: str
    inputs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ConfigError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")

    @property
    def rule(self) -> str:
        return self.inputs.get("rule", "")

    @property
    def is_retry(self) -> bool:
        return self.inputs.get("retry_of") is not None

    def to_dict(self) -> dict:
        return {"route": self.route, "reason": self.reason, "inputs": dict(self.inputs)}

    @classmethod
    def from_dict(cls, data: dict) -> RouteDecision:
        return cls(route=data["route"], reason=data["reason"], inputs=dict(data.get("inputs") or {}))


def policy_from_store(store) -> RoutePolicy:
    """The store's recorded policy, or the default when none was saved."""
    raw = store.get_meta(POLICY_META_KEY)
    if raw is None:
        return RoutePolicy()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the store's route policy is not valid JSON: {exc}") from exc
    return RoutePolicy.from_dict(data)


def save_policy(store, policy: RoutePolicy, session=None) -> None:
    store.set_meta(POLICY_META_KEY, json.dumps(policy.to_dict(), sort_keys=True), session=session)
