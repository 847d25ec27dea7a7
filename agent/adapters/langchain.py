"""LangChain over Engram: `ChatEngram` (a BaseChatModel) and `EngramRetriever` (a BaseRetriever).

ChatEngram talks to Engram one of two ways, with the same results:
- over HTTP, to `engram serve` (`base_url` like "http://127.0.0.1:8000/v1", with the official `openai`
  client, so it works against any OpenAI-compatible endpoint too);
- in process, given a ChatEngine (`engine=`), with no server at all.

Both paths run as one stream of events (text, finish, usage, metadata), so `invoke` and `stream` answer
alike; a plain `invoke` is the stream read to its end. Every answer carries `usage_metadata` and
`response_metadata["model_name"]` (the model id that answered: engram, base, rag, rag-subject, icl) and
`response_metadata["engram"]`: the model version, route and provenance (which stored facts shaped it).
Engram has no tool calling, structured output or non-text inputs: those are refused, never dropped.

EngramRetriever ranks the store's visible facts with the RAG baseline's index (memory/vector.py, MiniLM
by default; any `memory.embeddings` embedder may be injected), scoped by `user` as the chat routes are.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.utils import from_env, secret_from_env
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

# chunk_position arrived in langchain-core 1.0; older cores mark nothing (the last chunk is just last)
_MARKS_LAST = "chunk_position" in AIMessageChunk.model_fields
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}
# per-call keyword arguments a request can take (anything else is refused, not silently dropped)
_CALL_KEYS = ("model", "temperature", "top_p", "max_tokens", "seed", "user", "n")


def _text(content: str | list, what: str) -> str:
    """A message's text; images, audio, files and tool blocks cannot be honoured, so they are refused."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"Engram takes text only: {what} has a {kind!r} content block")
    return "".join(parts)


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages as OpenAI chat messages (role and text; `name` passed on, which Engram ignores)."""
    out = []
    for i, message in enumerate(messages):
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
        if role is None:
            raise ValueError(f"messages[{i}] is a {message.type!r} message: Engram has no tool calling")
        entry = {"role": role, "content": _text(message.content, f"messages[{i}]")}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}


class ChatEngram(BaseChatModel):
    """Engram's chat routes as a LangChain chat model, over HTTP (`base_url`) or in process (`engine`).

    `model` picks the route; `user` scopes the gist pool and the baselines' facts to one user."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str = Field(default="engram", alias="model_name")
    temperature: float | None = None  # None: the server's default (1.0); 0 is greedy
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    user: str | None = None
    seed: int | None = None
    n: int = 1
    streaming: bool = False
    base_url: str | None = Field(default_factory=from_env("ENGRAM_BASE_URL", default=None))
    api_key: SecretStr | None = Field(default_factory=secret_from_env("ENGRAM_API_KEY", default=None))
    timeout: float | None = None
    max_retries: int = 2
    engine: Any = Field(default=None, exclude=True)  # an agent.chat.ChatEngine: answer in process
    _client: Any = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "engram-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        where = {"engine": self.engine.name} if self.engine is not None else {"base_url": self.base_url}
        return {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "stop": self.stop, "seed": self.seed, "n": self.n, **where}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="engram", ls_model_name=kwargs.get("model") or self.model,
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        stops = stop if stop is not None else self.stop
        if temperature is not None:
            params["ls_temperature"] = temperature
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stops:
            params["ls_stop"] = list(stops)
        return params

    # -- one request ----------------------------------------------------------------------------------
    def _request(self, stop: list[str] | None, kwargs: dict) -> dict:
        unknown = sorted(k for k in kwargs if k not in _CALL_KEYS and not k.startswith("ls_"))
        if unknown:
            raise ValueError(f"ChatEngram cannot honour {', '.join(unknown)} (Engram has no tools, structured "
                             f"output or logprobs)")
        request = {key: kwargs.get(key, getattr(self, key)) for key in _CALL_KEYS}
        stops = stop if stop is not None else self.stop
        request["stop"] = list(stops) if stops else None
        return request

    def _events(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> Iterator[tuple]:
        """("meta", dict), ("text", index, str), ("finish", index, reason), ("usage", prompt, completion)."""
        request = self._request(stop, kwargs)
        chat = to_openai_messages(messages)
        if self.engine is not None:
            return self._local(chat, request)
        return self._remote(chat, request)

    def _local(self, chat: list[dict], request: dict) -> Iterator[tuple]:
        from agent.chat import SamplingParams

        engine = self.engine
        params = SamplingParams(temperature=1.0 if request["temperature"] is None else request["temperature"],
                                top_p=1.0 if request["top_p"] is None else request["top_p"],
                                max_tokens=request["max_tokens"], stop=tuple(request["stop"] or ()),
                                seed=request["seed"], n=request["n"])
        prepared = engine.prepare(request["model"], chat, request["user"], params.max_tokens)
        stream = engine.start(prepared, params)
        try:
            yield "meta", {"model_name": request["model"], "system_fingerprint": f"engram-v{stream.model_version}",
                           "engram": {"model_version": stream.model_version, "route": stream.route,
                                      "model": engine.name, "provenance": stream.provenance}}
            for event in stream:
                if event.finish_reason:
                    yield "finish", event.index, event.finish_reason
                elif event.text:
                    yield "text", event.index, event.text
        finally:
            stream.cancel()  # a reader that stops early stops the generation (and frees the model lock)
        yield "usage", stream.prompt_tokens, stream.completion_tokens

    def _openai(self):
        if self._client is None:
            import openai

            if not self.base_url:
                raise ValueError("ChatEngram needs base_url (an `engram serve` URL ending in /v1) or engine")
            options = {"timeout": self.timeout} if self.timeout is not None else {}
            key = self.api_key.get_secret_value() if self.api_key is not None else "none"
            self._client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=self.max_retries,
                                         **options)
        return self._client

    def _remote(self, chat: list[dict], request: dict) -> Iterator[tuple]:
        body = {k: v for k, v in request.items() if v is not None and not (k == "n" and v == 1)}
        # include_usage: the server sends usage only when asked (a usage chunk has no choices)
        stream = self._openai().chat.completions.create(messages=chat, stream=True,
                                                        stream_options={"include_usage": True}, **body)
        with stream:
            headers, extra = stream.response.headers, None
            for chunk in stream:
                # the first chunk carries the `engram` field (the headers say the same); the last finish
                # chunk carries it again with what generation added (the pool rows the answer read)
                more = (chunk.model_extra or {}).get("engram")
                if extra is None or more:
                    extra = {**(extra or {}), **(more or {})}
                    version = extra.get("model_version", headers.get("x-engram-model-version"))
                    extra.setdefault("route", headers.get("x-engram-route"))
                    extra["model_version"] = int(version) if version is not None else None
                    yield "meta", {"model_name": chunk.model or request["model"],
                                   "system_fingerprint": chunk.system_fingerprint, "engram": extra}
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield "text", choice.index, choice.delta.content
                    if choice.finish_reason:
                        yield "finish", choice.index, choice.finish_reason
                if chunk.usage is not None:
                    yield "usage", chunk.usage.prompt_tokens, chunk.usage.completion_tokens

    # -- LangChain's entry points ---------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        meta: dict = {}
        usage = None
        for kind, *rest in self._events(messages, stop, kwargs):
            if kind == "meta":
                meta = rest[0]
            elif kind == "text":
                texts[rest[0]] = texts.get(rest[0], "") + rest[1]
            elif kind == "finish":
                finish[rest[0]] = rest[1]
            else:
                usage = _usage(*rest)
        generations = []
        for index in sorted(set(texts) | set(finish)) or [0]:
            # usage covers every choice: on the first message only, so callbacks do not count it n times
            message = AIMessage(content=texts.get(index, ""), usage_metadata=usage if not generations else None,
                                response_metadata={**meta, "finish_reason": finish.get(index)})
            generations.append(ChatGeneration(message=message, generation_info={"finish_reason": finish.get(index)}))
        token_usage = ({"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
                        "total_tokens": usage["total_tokens"]} if usage else {})
        return ChatResult(generations=generations,
                          llm_output={"model_name": meta.get("model_name"), "token_usage": token_usage})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        if kwargs.get("n", self.n) != 1:
            raise ValueError("ChatEngram streams one choice: use n=1 (or invoke for n > 1)")
        meta: dict = {}
        usage, reason = None, None
        for kind, *rest in self._events(messages, stop, kwargs):
            if kind == "meta":
                meta = rest[0]
            elif kind == "text":
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=rest[1]))
                if run_manager:
                    run_manager.on_llm_new_token(rest[1], chunk=chunk)
                yield chunk
            elif kind == "finish":
                reason = rest[1]
            else:
                usage = _usage(*rest)
        # the metadata goes on the last chunk only: merging chunks concatenates repeated strings
        last = {"chunk_position": "last"} if _MARKS_LAST else {}
        message = AIMessageChunk(content="", usage_metadata=usage,
                                 response_metadata={**meta, "finish_reason": reason}, **last)
        chunk = ChatGenerationChunk(message=message, generation_info={"finish_reason": reason})
        if run_manager:
            run_manager.on_llm_new_token("", chunk=chunk)
        yield chunk


class EngramRetriever(BaseRetriever):
    """The store's facts most similar to a query, as Documents: `k` of them, in the constructor or per
    call (`invoke(query, k=3)`), exactly k while the store has k facts visible to `user`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: Any  # a memory.store.FactStore, or its URL ("sqlite:///path/store.sqlite")
    k: int = Field(default=4, ge=1)
    user: str | None = None  # global facts plus this user's scoped ones; None: global facts only
    embedder: Any = None  # None: the RAG baseline's MiniLM (memory.embeddings.default_embedder)
    _store: Any = PrivateAttr(default=None)
    _index: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def _fact_store(self):
        if self._store is None:
            from memory.store import FactStore

            self._store = FactStore(self.store, create=False) if isinstance(self.store, str) else self.store
        return self._store

    def _synced_index(self):
        from memory.vector import VectorIndex

        store = self._fact_store()
        with self._lock:  # opened once, brought up to date on every call (the agent may have added facts)
            if self._index is None:
                self._index = VectorIndex.open(store, self.embedder)
            else:
                self._index.sync(store)
            return self._index

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, user: str | None = None) -> list[Document]:
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        hits = self._synced_index().search(query, k=k, user_id=user if user is not None else self.user)
        store, documents = self._fact_store(), []
        for fact_id, score in hits:
            fact = store.get_fact(int(fact_id))
            documents.append(Document(
                id=str(fact.id), page_content=fact.statement,
                metadata={"fact_id": fact.id, "subject": fact.subject, "relation": fact.relation,
                          "scope": fact.scope, "user": fact.user_id, "score": round(float(score), 4)}))
        return documents
