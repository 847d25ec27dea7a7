"""Facts over HTTP: `POST/GET /v1/facts`, `GET/DELETE /v1/facts/{id}`, one more source for the agent.

A posted fact is validated as a JSONL line is (memory/facts.py), then stored with its stage rows in one
transaction, exactly as `engram run` ingests a source line, so the agent (in this process or beside it on
the same store) routes and applies it. A DELETE marks the fact deleted; the agent's housekeeping then rolls
its weight edit back or removes its gist, and the RAG index lets it go. `Idempotency-Key`: a repeated POST
with the same key and body answers what the first did and stores nothing again; the same key with another
body is refused (409).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from agent.server.errors import APIError, bad_request
from memory.errors import NotFoundError, ValidationError
from memory.facts import parse_fact
from memory.stages import open_stages
from memory.store import FactStore

MAX_FACTS_PER_POST = 1000
IDEMPOTENCY_PREFIX = "idempotency:"
STATUSES = ("active", "superseded", "deleted", "all")
FIELDS = ("id", "subject", "relation", "prompt", "target", "text", "scope", "user_id", "status", "superseded_by")


def fact_json(fact) -> dict:
    out = {k: getattr(fact, k) for k in FIELDS}
    out["created_at"] = fact.created_at.isoformat() if fact.created_at else None
    return out


def _records(body) -> list:
    """One fact, a list of facts, or {"facts": [...]}."""
    if isinstance(body, dict) and set(body) == {"facts"}:
        body = body["facts"]
    records = body if isinstance(body, list) else [body]
    if not records:
        raise bad_request("no facts in the body", "facts")
    if len(records) > MAX_FACTS_PER_POST:
        raise bad_request(f"at most {MAX_FACTS_PER_POST} facts per request, got {len(records)}", "facts")
    return records


def store_facts(store: FactStore, body, key: str | None) -> dict:
    """Validate every record, then store the good ones with their stages (one commit). Every bad record is
    named by its index; when none is good the request is refused whole (400)."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if key:
        seen = store.get_meta(IDEMPOTENCY_PREFIX + key)
        if seen is not None:
            first = json.loads(seen)
            if first["digest"] != digest:
                raise APIError(409, f"Idempotency-Key {key!r} was used with another body", code="idempotency_conflict",
                               type_="invalid_request_error")
            return {**first["response"], "replayed": True}
    good, rejected = [], []
    for i, record in enumerate(_records(body)):
        try:
            good.append(parse_fact(record))
        except ValidationError as exc:
            rejected.append({"index": i, "reason": str(exc)})
    if not good:
        first = rejected[0]
        raise bad_request(f"fact {first['index']}: {first['reason']}" + (
            f" (and {len(rejected) - 1} more rejected)" if len(rejected) > 1 else ""), f"facts[{first['index']}]")
    with store.transaction() as s:
        added = store.add_facts(good, session=s)
        open_stages(s, added.new_ids)
        response = {"stored": added.stored, "duplicates": added.duplicates, "superseded": added.superseded,
                    "reactivated": added.reactivated, "ids": list(added.fact_ids), "rejected": rejected}
        if key:
            store.set_meta(IDEMPOTENCY_PREFIX + key, json.dumps({"digest": digest, "response": response}), session=s)
    return response


def facts_router(get_store: Callable[[], FactStore], read_body: Callable[[Request], Awaitable[bytes]]) -> APIRouter:
    """The routes over `get_store()`; `read_body` reads a request body within the server's size limit."""
    router = APIRouter()

    @router.post("/v1/facts")
    async def post_facts(request: Request):
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise bad_request("the request body is not valid JSON") from exc
        key = request.headers.get("idempotency-key") or None
        return await run_in_threadpool(store_facts, get_store(), body, key)

    @router.get("/v1/facts")
    async def list_facts(user: str | None = None, status: str = "active", subject: str | None = None,
                         limit: int = 100, offset: int = 0):
        if status not in STATUSES:
            raise bad_request(f"status must be one of {', '.join(STATUSES)}, got {status!r}", "status")
        if not 1 <= limit <= 1000 or offset < 0:
            raise bad_request("limit must be 1-1000 and offset at least 0", "limit")

        def read():
            facts = get_store().list_facts(status=None if status == "all" else status, user_id=user)
            if subject is not None:
                facts = [f for f in facts if (f.subject or "").casefold() == subject.casefold()]
            return facts[offset:offset + limit], len(facts)
        facts, total = await run_in_threadpool(read)
        return {"object": "list", "data": [fact_json(f) for f in facts], "total": total}

    @router.get("/v1/facts/{fact_id}")
    async def get_fact(fact_id: int):
        def read():
            store = get_store()
            fact = store.get_fact(fact_id)
            return fact, store.history(fact_id), stage_of(store, fact_id)
        fact, events, stage = await run_in_threadpool(_found, read)
        return {**fact_json(fact), "stage": stage,
                "history": [{"kind": e.kind, "detail": e.detail,
                             "at": e.created_at.isoformat() if e.created_at else None} for e in events]}

    @router.delete("/v1/facts/{fact_id}")
    async def delete_fact(fact_id: int):
        fact = await run_in_threadpool(_found, lambda: get_store().delete_fact(fact_id, reason="deleted over HTTP"))
        return {"id": fact.id, "object": "fact", "deleted": True}

    @router.delete("/v1/facts")
    async def delete_all():  # a delete with no id is refused: there is no "forget everything" by accident
        raise bad_request("DELETE needs a fact id: DELETE /v1/facts/{id}", "id")

    return router


def _found(read):
    try:
        return read()
    except NotFoundError as exc:
        raise APIError(404, str(exc), "id", "fact_not_found") from exc


def stage_of(store: FactStore, fact_id: int) -> dict | None:
    """Where the fact stands in the agent's stages (None: it never entered them)."""
    from memory.models import Stage

    with store.transaction() as s:
        row = s.get(Stage, fact_id)
        if row is None:
            return None
        return {"stage": row.stage, "route": row.route, "attempts": row.attempts, "error": row.error}
