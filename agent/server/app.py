"""The FastAPI app of `engram serve`: OpenAI's /v1/models and /v1/chat/completions, /health, /metrics.

The engine may arrive after the app is up (`set_engine`): until then /health says 503 and /v1 answers
503, so a client can start with the server. Every failure leaves as OpenAI's error shape (errors.py);
the outer middleware turns anything that escapes into a 500 of that shape, so no request crashes it.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.chat import ROUTES, ChatInputError, SamplingParams, UnknownModelError
from agent.server.errors import APIError, bad_request, server_error
from agent.server.metrics import Metrics
from agent.server.schemas import ChatRequest

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # never behind the API key: probes and scrapers hold none
HEADER_IDS = 32  # fact ids per list in X-Engram-Provenance; the rest are counted as `+N`


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20  # 413 above
    max_messages: int = 256  # 400 above
    max_tokens: int = 4096  # max_tokens / max_completion_tokens: 400 above
    max_n: int = 8  # choices per request: 400 above


class _Edge:
    """Pure ASGI middleware: X-Request-Id in and out, the Bearer check on /v1, and a 500 for anything that
    escapes (pure ASGI rather than BaseHTTPMiddleware, so streamed bodies pass through untouched)."""

    def __init__(self, app, api_keys: Sequence[str]):
        self.app, self.keys = app, [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        if self.keys and not scope["path"].startswith(OPEN_PATHS) and not self._authorized(headers):
            error = APIError(401, "a valid API key is required: send `Authorization: Bearer KEY`",
                             code="invalid_api_key")
            return await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send_with_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # the last net: logged, answered, never raised to uvicorn
            log.exception("request %s failed", request_id)
            if not started:
                await server_error(exc).response()(scope, receive, send_with_id)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(given, key) for key in self.keys)


def set_engine(app: FastAPI, engine) -> None:
    app.state.engine = engine


def set_load_error(app: FastAPI, message: str) -> None:
    app.state.load_error = message


def create_app(engine=None, api_keys: Sequence[str] = (), limits: ServerLimits | None = None,
               store=None) -> FastAPI:
    """The app over `engine` (a ChatEngine, or None until `set_engine`); `api_keys`: any of them opens /v1.
    `store`: the fact store of /v1/facts, which needs no model (default: the engine's)."""
    from agent.server.facts import facts_router

    limits = limits or ServerLimits()
    app = FastAPI(title="Engram", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.load_error, app.state.started = engine, None, int(time.time())

    def fact_store():
        found = store if store is not None else getattr(app.state.engine, "store", None)
        if found is None:
            raise APIError(503, "the fact store is not open yet; retry shortly", code="model_loading")
        return found
    app.include_router(facts_router(fact_store, lambda request: _read_body(request, limits.max_body_bytes)))
    metrics = Metrics()
    app.add_middleware(_Edge, api_keys=list(api_keys))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation(exc.errors()).response()

    def ready():
        if app.state.engine is None:
            message = (f"the model failed to load: {app.state.load_error}" if app.state.load_error
                       else "the model is still loading; retry shortly")
            raise APIError(503, message, code="model_loading")
        return app.state.engine

    # the small endpoints are async: they never wait for a threadpool thread that chats may all be holding
    @app.get("/health")
    async def health():
        engine = app.state.engine
        if engine is None:
            status = "failed" if app.state.load_error else "loading"
            return JSONResponse({"status": status, "error": app.state.load_error}, status_code=503)
        return {"status": "ok", "model": engine.name, "model_version": engine.model_version,
                "routes": engine.routes()}

    @app.get("/metrics")
    async def _metrics():
        return PlainTextResponse(metrics.text(app.state.engine), media_type="text/plain; version=0.0.4")

    def card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": app.state.started, "owned_by": "engram"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(m) for m in ready().routes()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id not in ready().routes():
            raise APIError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        engine, received = ready(), time.perf_counter()
        body = _parse(await _read_body(request, limits.max_body_bytes))
        _check(body, limits)
        user = request.headers.get("x-engram-user") or body.user
        params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, max_tokens=body.wanted_tokens(),
                                stop=body.stops(), seed=body.seed, n=body.n or 1)
        try:
            prepared = await run_in_threadpool(engine.prepare, body.model, body.messages, user, params.max_tokens)
            stream = await run_in_threadpool(engine.start, prepared, params)
        except UnknownModelError as exc:
            metrics.count(body.model, 404)
            raise APIError(404, str(exc), "model", "model_not_found") from exc
        except ChatInputError as exc:
            metrics.count(body.model, 400)
            raise bad_request(str(exc), exc.param, exc.code) from exc
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        extra = {"model_version": stream.model_version, "route": stream.route, "model": engine.name,
                 "provenance": stream.provenance}
        headers = {"X-Engram-Model-Version": str(stream.model_version), "X-Engram-Route": stream.route}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _sse(stream, body.model, completion_id, created, extra, include_usage, metrics, received)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={
                **headers, "X-Engram-Provenance": provenance_header(stream.provenance, answered=False),
                "Cache-Control": "no-cache"})
        try:
            answer = await run_in_threadpool(engine.collect, stream)
        except Exception as exc:
            stream.cancel()
            metrics.count(body.model, 500)
            raise server_error(exc) from exc
        metrics.count(body.model, 200, answer.prompt_tokens, answer.completion_tokens,
                      e2e_s=time.perf_counter() - received)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
            "system_fingerprint": f"engram-v{answer.model_version}",
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason} for c in answer.choices],
            "usage": _usage(answer.prompt_tokens, answer.completion_tokens), "engram": extra},
            headers={**headers, "X-Engram-Provenance": provenance_header(answer.provenance, answered=True)})

    return app


def provenance_header(provenance: dict, answered: bool) -> str:
    """X-Engram-Provenance: `pool=<rows read>; pool_mentioned=<rows the prompt opens>; rag=<hits>; icl=<facts>;
    weight_edits=<edits>`, fact ids comma-separated, each list cut after HEADER_IDS ids (`,+N` more).
    `answered`: the answer is complete, so the pool rows its forwards read are known; a streamed answer's
    headers leave before generation, so they carry only what is known then (no `pool=`, the rows its
    prompt's mention opens, the RAG hits): the rows it read come in its last finish chunk's `engram` field."""
    pool = provenance.get("pool") or {}
    lists = {"pool": pool.get("rows_read") or []} if answered else {}
    lists.update(pool_mentioned=pool.get("rows_mentioned") or [],
                 rag=[hit["fact_id"] for hit in provenance.get("rag_hits") or []],
                 icl=provenance.get("icl_facts") or [], weight_edits=provenance.get("weight_edits") or [])
    return "; ".join(f"{name}={_header_ids(ids)}" for name, ids in lists.items())


def _header_ids(ids: Sequence) -> str:
    # fact ids are ints, or strings in a hand-built pool: only header-safe ASCII characters of them are kept
    shown = ["".join(c for c in str(i) if c.isascii() and (c.isalnum() or c in "-_.")) for i in ids[:HEADER_IDS]]
    more = len(ids) - HEADER_IDS
    return ",".join(shown + ([f"+{more}"] if more > 0 else []))


def _validation(errors: Sequence[dict]) -> APIError:
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or None
    return bad_request(f"invalid request: {param or 'body'}: {first.get('msg', 'invalid')}", param)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than `limit` bytes (413 past it, declared or not)."""
    too_big = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(raw)
    except ValidationError as exc:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            raise bad_request("the request body is not valid JSON") from exc
        raise _validation(exc.errors()) from exc


def _check(body: ChatRequest, limits: ServerLimits) -> None:
    refused = body.refusals()
    if refused:
        param, reason = refused[0]
        raise bad_request(reason, param, "unsupported_parameter")
    if len(body.messages) > limits.max_messages:
        raise bad_request(f"at most {limits.max_messages} messages per request", "messages")
    wanted = body.wanted_tokens()
    if wanted is not None and wanted > limits.max_tokens:
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise bad_request(f"{param} may be at most {limits.max_tokens}", param)
    if (body.n or 1) > limits.max_n:
        raise bad_request(f"n may be at most {limits.max_n}", "n")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _data(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _sse(stream, model: str, completion_id: str, created: int, extra: dict, include_usage: bool,
         metrics: Metrics, received: float) -> Iterator[str]:
    """SSE chunks: a role chunk per choice (with the `engram` field as known before generation), content
    deltas, a finish chunk per choice (the last one with the `engram` field again, its provenance now holding
    the pool rows the answer read), the usage chunk only when asked for, then [DONE]. A failure midway is the
    last data chunk."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": f"engram-v{stream.model_version}"}
    null_usage = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, **more) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data({**base, "choices": [choice], **null_usage, **more})

    first = None  # seconds from the request to its first content token
    held = None  # (index, reason) of the latest finish: sent once more comes, or, the last, with `engram`
    try:
        for index in range(stream.n):
            yield chunk(index, {"role": "assistant", "content": ""}, engram=extra)
        for event in stream:
            if held is not None:
                yield chunk(held[0], {}, held[1])
                held = None
            if event.finish_reason:
                held = (event.index, event.finish_reason)
            elif event.text:
                if first is None:
                    first = time.perf_counter() - received
                yield chunk(event.index, {"content": event.text})
        if held is not None:  # the stream has ended: the engine has set the rows the answer read
            yield chunk(held[0], {}, held[1], engram=extra)
        if include_usage:
            yield _data({**base, "choices": [], "usage": _usage(stream.prompt_tokens, stream.completion_tokens)})
        metrics.count(model, 200, stream.prompt_tokens, stream.completion_tokens, ttft_s=first,
                      e2e_s=time.perf_counter() - received)
        yield "data: [DONE]\n\n"
    except Exception as exc:
        log.exception("stream %s failed", completion_id)
        metrics.count(model, 500)
        yield _data(server_error(exc).body())
    finally:
        stream.cancel()  # a reader that went away stops the generation at its next token
