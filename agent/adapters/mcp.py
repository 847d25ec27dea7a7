"""Engram as an MCP memory server (`engram mcp`), on the `mcp` package's v2 server API (MCPServer).

Tools: `remember` (a sentence or a fact object), `recall` (search), `list_facts`, `forget` (one id),
`history`, and `ask` (an answer from the edited model with its provenance). Every tool takes `user`: a
user sees the global facts and their own scoped ones, never another user's.

`remember` stores a fact with its stage rows exactly as `POST /v1/facts` does (agent/server/facts.py), so
the agent (the one `engram mcp` runs in its process, or an `engram run` on the same store) routes and
applies it. The memory tools need no model: the chat engine is built by `engine_factory` on the first
`ask` only, and follows the store's edits from then on. User mistakes come back as tool errors
(`is_error`) with a readable message, never as a crash.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from agent.adapters.langchain import EngramRetriever
from agent.server.errors import APIError
from agent.server.facts import STATUSES, fact_json, store_facts
from memory.errors import EngramError
from memory.store import FactStore

TRANSPORTS = {"stdio": "stdio", "http": "streamable-http"}
INSTRUCTIONS = ("Engram's long-term memory. `remember` stores a fact (a sentence, or an object with prompt and "
                "target); the agent then writes it into the model. `recall` searches the facts, `ask` answers "
                "from the edited model and says which facts shaped the answer. Pass `user` to keep a user's "
                "facts private to them.")


def _visible(fact, user: str | None) -> bool:
    from agent.chat.prompts import visible

    return visible(fact, user)


def _record(fact: str | dict, user: str | None) -> dict[str, Any]:
    """The POST /v1/facts body for one fact: a sentence is {"text": ...}; `user` scopes it to that user."""
    if isinstance(fact, str):
        record: dict = {"text": fact}
    elif isinstance(fact, dict):
        record = dict(fact)
    else:
        raise ToolError(f"fact must be a sentence or an object, got {type(fact).__name__}")
    if user is not None:
        owner = record.get("user_id")
        if owner not in (None, user):  # one user cannot store facts in another's name
            raise ToolError(f"the fact's user_id {owner!r} is not the caller's user {user!r}")
        record["user_id"] = user
        record.setdefault("scope", "user")
    return record


class _Memory:
    """What the tools share: the store, one retriever (its index is synced on every search), one engine."""

    def __init__(self, store: FactStore, engine_factory: Callable[[], Any] | None, embedder=None):
        self.store = store
        self.engine_factory = engine_factory
        self.retriever = EngramRetriever(store=store, embedder=embedder)
        self._engine = None
        self._engine_lock = threading.Lock()

    def fact(self, fact_id: int, user: str | None):
        """The fact if this user may see it; another user's scoped fact is as missing as an unknown id."""
        try:
            fact = self.store.get_fact(fact_id)
        except EngramError as exc:
            raise ToolError(str(exc)) from exc
        if not _visible(fact, user):
            raise ToolError(f"no fact with id {fact_id}")
        return fact

    def engine(self):
        with self._engine_lock:  # the first ask loads the model; concurrent asks wait for that one load
            if self._engine is None:
                if self.engine_factory is None:
                    raise ToolError("this server has no model: `ask` is not available")
                # no stdout guard needed: the SDK's stdio transport diverts fd 1 to stderr while it serves
                try:
                    self._engine = self.engine_factory()
                except Exception as exc:  # noqa: BLE001 - the caller reads why; the memory tools carry on
                    raise ToolError(f"the model failed to load: {exc}") from exc
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def build_server(store: FactStore, engine_factory: Callable[[], Any] | None = None, embedder=None,
                 name: str = "engram") -> MCPServer:
    """The MCP server over `store`; `engine_factory()` makes the agent.chat.ChatEngine on the first `ask`.
    `embedder`: recall's embedder (None: the RAG baseline's MiniLM). `server.engram` holds the shared state."""
    from agent.cli import version

    memory = _Memory(store, engine_factory, embedder)
    server = MCPServer(name, version=version(), instructions=INSTRUCTIONS)
    server.engram = memory  # for the command (to close the engine) and for tests

    @server.tool()
    def remember(fact: str | dict, user: str | None = None) -> dict[str, Any]:
        """Store a fact: a sentence ("Zorbia's capital is Quellmarsh.") or an object with prompt and target
        (and subject, relation, ...). With `user`, only that user's answers will use it. Returns the stored
        ids and whether the fact was already known."""
        try:
            out = store_facts(store, _record(fact, user), None)
        except APIError as exc:
            raise ToolError(exc.message) from exc
        return {"ids": out["ids"], "duplicate": out["duplicates"] > 0 and out["stored"] == 0, "stored": out["stored"],
                "superseded": out["superseded"], "reactivated": out["reactivated"]}

    @server.tool()
    def recall(query: str, k: int = 5, user: str | None = None) -> list[dict[str, Any]]:
        """The k stored facts most similar to `query` that `user` may see, best first."""
        if not 1 <= k <= 100:
            raise ToolError(f"k must be 1-100, got {k}")
        documents = memory.retriever.invoke(query, k=k, user=user)
        return [{"id": d.metadata["fact_id"], "statement": d.page_content, "score": d.metadata["score"],
                 "subject": d.metadata["subject"], "scope": d.metadata["scope"]} for d in documents]

    @server.tool()
    def list_facts(user: str | None = None, status: str = "active", limit: int = 100) -> list[dict[str, Any]]:
        """The stored facts `user` may see (the global ones and their own; no user: the global ones only),
        oldest first. `status`: active, superseded, deleted or all."""
        if status not in STATUSES:
            raise ToolError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if not 1 <= limit <= 1000:
            raise ToolError(f"limit must be 1-1000, got {limit}")
        facts = store.list_facts(status=None if status == "all" else status, user_id=user)
        return [fact_json(f) for f in facts if _visible(f, user)][:limit]

    @server.tool()
    def forget(fact_id: int, user: str | None = None) -> dict[str, Any]:
        """Delete one fact by id: the agent then rolls back its weight edit or removes its gist."""
        memory.fact(fact_id, user)
        fact = store.delete_fact(fact_id, reason="forgotten over MCP")
        return {"id": fact.id, "deleted": True}

    @server.tool()
    def history(fact_id: int, user: str | None = None) -> dict[str, Any]:
        """One fact with its history: stored, routed, applied, superseded, deleted, ..."""
        from agent.server.facts import stage_of

        fact = memory.fact(fact_id, user)
        events = store.history(fact_id)
        return {**fact_json(fact), "stage": stage_of(store, fact_id),
                "history": [{"kind": e.kind, "detail": e.detail,
                             "at": e.created_at.isoformat() if e.created_at else None} for e in events]}

    @server.tool()
    def ask(question: str, user: str | None = None, model: str = "engram", max_tokens: int = 64) -> dict[str, Any]:
        """Answer from the model Engram keeps editing (greedy). `model` picks the route: engram (the edited
        weights and the gist pool), base, rag, icl. Returns the text, the model version and the provenance:
        which stored facts shaped the answer."""
        from agent.chat import ChatInputError, SamplingParams, UnknownModelError

        if not 1 <= max_tokens <= 1024:
            raise ToolError(f"max_tokens must be 1-1024, got {max_tokens}")
        engine = memory.engine()
        try:
            prepared = engine.prepare(model, [{"role": "user", "content": question}], user, max_tokens)
            answer = engine.complete(prepared, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        except (UnknownModelError, ChatInputError) as exc:
            raise ToolError(str(exc)) from exc
        choice = answer.choices[0]
        return {"text": choice.text, "finish_reason": choice.finish_reason, "model": model,
                "model_version": answer.model_version, "route": answer.route, "provenance": answer.provenance}

    return server


def run(server: MCPServer, transport: str = "stdio", host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until the client goes (stdio) or the process is stopped (http: streamable HTTP at /mcp)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=port)
