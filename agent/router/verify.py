"""Verified routing: after a fact is applied, one greedy check of its own prompt says whether the model
now gives the target (the generation protocol's exact match at the start, evaluation/metrics.py).

The model imports are lazy: `engram route explain` reads the store only and must not pay for torch.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from agent.router.policy import ROUTES, RoutePolicy
from memory.errors import ConfigError
from memory.models import Event

VERIFIED = "verified"
DEFAULT_MAX_NEW_TOKENS = RoutePolicy().verify_max_new_tokens


@dataclass(frozen=True)
class Verification:
    """ok: True (learned), False (not learned), None (nothing to check: a text-only fact has no prompt)."""

    ok: bool | None
    answer: str
    prompt: str | None = None
    target: str | None = None
    seconds: float = 0.0
    note: str | None = None

    @property
    def checked(self) -> bool:
        return self.ok is not None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "answer": self.answer, "prompt": self.prompt, "target": self.target,
                "seconds": round(self.seconds, 4), "note": self.note}


def verify_fact(model, tokenizer, fact, reading=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Verification:
    """Greedy-decode the fact's own prompt and check that the answer starts with its target.

    `reading`: a context manager the check runs inside, e.g. `gist.memory.reading(fact.user_id)` so a
    gist-routed fact is read from the pool as its user would read it; None for the weights alone."""
    from editors.answer import generate_greedy
    from evaluation.metrics import exact_match_at_start

    prompt, target = getattr(fact, "prompt", None), getattr(fact, "target", None)
    if not (prompt and prompt.strip() and target and target.strip()):
        return Verification(None, "", prompt, target, note="no prompt/target to check (a text-only fact)")
    start = time.perf_counter()
    with reading if reading is not None else contextlib.nullcontext():
        answer = generate_greedy(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
    ok = exact_match_at_start(answer, target)
    return Verification(ok, answer, prompt, target, time.perf_counter() - start)


def record_verification(session: Session, fact_id: int, route: str, verification: Verification) -> None:
    """Add the "verified" event (ok, answer, route) in the caller's transaction."""
    if route not in ROUTES:
        raise ConfigError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    session.add(Event(fact_id=fact_id, kind=VERIFIED, detail={"route": route, **verification.to_dict()}))
