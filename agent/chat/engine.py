"""ChatEngine: the loaded model state answering chat messages, one generation at a time.

One lock guards the model: a generation holds it from its first token to its last (all `n` choices), so
no answer mixes two model versions, and the weights swapped in by `base` (`ModelState.unedited`) or the
pool hooks of `engram` are never seen by another request. The lock is taken by the caller of `start`
(so the version it reports is the one that answers) and released by the worker thread that generates.

Beside a writer on the same store (`engram run`, `engram edit`), each answer first catches up with it:
new edits, rollbacks and pool facts (agent/chat/follow.py), at most once every `follow_every_s`.

Weights: `engram` answers with the edited weights and reads the gist pool for the request's user;
`base`, `icl`, `rag` and `rag-subject` answer with the base weights (`ModelState.unedited`, which swaps
only the tensors an edit touched back) and no pool, as the evaluation baselines do.

Provenance: `prepare` records what is known before generation (the weight edits, the pool rows the prompt's
subject mention opens, the facts put in the prompt); once an `engram` answer's generation ends, its
`provenance["pool"]["rows_read"]` is the facts whose rows its forwards actually read (every gate applied,
subjects the answer itself names included), set before the stream's end is signalled.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from agent.chat import prompts
from agent.chat.follow import StoreFollower
from agent.chat.prompts import ChatInputError, Prepared

log = logging.getLogger(__name__)

ROUTES = ("engram", "base", "icl", "rag", "rag-subject")


class UnknownModelError(LookupError):
    """A model id this engine does not serve (the server's 404)."""


@dataclass(frozen=True)
class EngineConfig:
    rag_k: int = 10  # facts a RAG answer shows, as the evaluation's RAG baseline
    default_max_tokens: int = 256  # when the request names none (always cut to the context window)
    follow_every_s: float = 1.0  # how often an answer first checks the store for new edits (agent/chat/follow.py)


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's knobs. temperature 0 (or top_p 0) is greedy; `seed` makes sampling repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_p <= 0


@dataclass
class Event:
    """One step of a stream: text for choice `index`, or its end (`finish_reason` set)."""

    index: int
    text: str = ""
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None


@dataclass
class Answer:
    """A whole (non-streamed) answer."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    model_version: int
    route: str
    provenance: dict = field(default_factory=dict)


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that may be a stop's beginning."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending, self.stopped = "", False

    def feed(self, text: str) -> str:
        """The text safe to emit now; `stopped` is set once a stop string appeared (it is not emitted)."""
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class _Tokens:
    """A generate() streamer: new token ids in, decoded text out (whole characters only), stop strings cut."""

    def __init__(self, tokenizer, stops: Sequence[str], emit):
        self.tokenizer, self.emit, self.stop = tokenizer, emit, StopText(stops)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already passed on
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        new, self.sent = text[self.sent:], len(text)
        out = self.stop.feed(new)
        if out:
            self.emit(out)

    def end(self) -> None:
        out = self.stop.flush()
        if out:
            self.emit(out)


class _Cancel:
    """A stopping criterion: ends generation once a stop string was seen or the reader went away."""

    def __init__(self, tokens: _Tokens, cancelled: threading.Event):
        self.tokens, self.cancelled = tokens, cancelled

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = self.tokens.stop.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """A generation under way: iterate for Events; `completion_tokens` is final once iteration ends."""

    def __init__(self, prepared: Prepared, prompt_tokens: int, version: int, n: int):
        self.prepared, self.prompt_tokens, self.model_version = prepared, prompt_tokens, version
        self.completion_tokens = 0
        self.n = n
        self.queue: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    @property
    def route(self) -> str:
        return self.prepared.route

    @property
    def provenance(self) -> dict:
        return self.prepared.provenance

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class ChatEngine:
    """Owns the loaded model (and its store, state and gist pool) and answers chats through `ROUTES`."""

    def __init__(self, model, tokenizer, name: str, state=None, gist=None, store=None,
                 config: EngineConfig | None = None, embedder=None, open_memory=None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.state, self.gist, self.store = state, gist, store if store is not None else getattr(state, "store", None)
        self.config = config or EngineConfig()
        self.embedder = embedder
        self.lock = threading.Lock()
        self._rag_lock = threading.Lock()
        self._index = None
        self.follower = (StoreFollower(state, gist, self.config.follow_every_s, open_memory)
                         if state is not None else None)
        self.model_version = state.version if state is not None else 0
        self.weight_edits = [e.fact_id for e in state.applied_edits()] if state is not None else []
        self.window = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)

    @classmethod
    def from_args(cls, args, config: EngineConfig | None = None, store=None) -> ChatEngine:
        """What `engram ask` loads: the store, the model rebuilt from its edits, the gist pool."""
        from agent.commands.common import load_state, open_gist

        store, loaded, state = load_state(args, store=store)
        gist = open_gist(args, store, loaded)

        def open_memory():  # the pool appeared after startup (the agent beside us wrote its first gist)
            from editors.incomes.memory import GistMemory

            return GistMemory.open(loaded.model, loaded.tokenizer, loaded.name, getattr(args, "gist_addon", None))
        return cls(loaded.model, loaded.tokenizer, loaded.name, state=state, gist=gist, store=store, config=config,
                   open_memory=open_memory)

    def routes(self) -> list[str]:
        return [r for r in ROUTES if r in ("engram", "base") or self.store is not None]

    # -- prompts ------------------------------------------------------------------------------------
    def prepare(self, model_id: str, messages: Sequence[dict], user: str | None = None,
                max_tokens: int | None = None) -> Prepared:
        """The prompt for `model_id` and its provenance; UnknownModelError / ChatInputError when it cannot."""
        if model_id not in self.routes():
            raise UnknownModelError(f"the model {model_id!r} does not exist; this server has "
                                    f"{', '.join(self.routes())}")
        chat = prompts.normalize_messages(messages)
        provenance: dict = {"route": model_id, "user": user}
        if model_id == "engram":
            prompt = prompts.render(self.tokenizer, chat)
            provenance.update(weights="edited", weight_edits=self.weight_edits, pool=self._pool(prompt, user))
        elif model_id == "base":
            prompt = prompts.render(self.tokenizer, chat)
            provenance.update(weights="base", weight_edits=[], pool=None)
        else:
            provenance.update(weights="base", weight_edits=[], pool=None)
            if model_id == "icl":
                budget = self.window - (max_tokens or self.config.default_max_tokens)
                prompt, found = prompts.icl(self.store, self.tokenizer, chat, user, max(budget, 1))
            else:
                prompt, found = prompts.rag(self.store, self._rag_index(), self.tokenizer, chat, user,
                                            self.config.rag_k, by_subject=model_id == "rag-subject")
            provenance.update(found)
        return Prepared(model_id, prompt, user, provenance)

    def _pool(self, prompt: str, user: str | None) -> dict | None:
        if self.gist is None:
            return None
        try:
            return prompts.pool_rows(self.gist.memory, self.tokenizer, prompt, user)
        except Exception as exc:  # provenance must never cost the answer
            log.warning("pool provenance failed: %s", exc)
            return {"error": str(exc)}

    def _rag_index(self):
        from memory.vector import VectorIndex

        with self._rag_lock:  # opened on first use (MiniLM loads then), brought up to date on every request
            if self._index is None:
                self._index = VectorIndex.open(self.store, self.embedder)
            else:
                self._index.sync(self.store)
            return self._index

    # -- generation ---------------------------------------------------------------------------------
    def start(self, prepared: Prepared, params: SamplingParams) -> ChatStream:
        """Take the model lock, then generate in a thread that releases it after the last choice."""
        ids = list(self.tokenizer(prepared.prompt)["input_ids"])  # as `engram ask` tokenizes
        room = self.window - len(ids)
        if room < 1:
            raise ChatInputError(f"the prompt takes {len(ids)} tokens; the model's context window is "
                                 f"{self.window}", "messages", "context_length_exceeded")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ChatInputError(f"max_tokens {params.max_tokens} and the prompt's {len(ids)} tokens exceed the "
                                 f"context window of {self.window}", "max_tokens", "context_length_exceeded")
        budget = params.max_tokens or min(self.config.default_max_tokens, room)
        self.lock.acquire()
        try:
            self._follow(prepared)
            stream = ChatStream(prepared, len(ids), self.model_version, params.n)
            threading.Thread(target=self._generate, args=(stream, ids, params, budget), daemon=True,
                             name="engram-generate").start()
        except BaseException:
            self.lock.release()
            raise
        return stream

    def _follow(self, prepared: Prepared) -> None:
        """With the lock held: catch up with the store's writer, so this answer uses its newest version."""
        if self.follower is None or not self.follower.refresh():
            return
        self.gist = self.follower.gist
        self.model_version = self.follower.version
        self.weight_edits = [e.fact_id for e in self.state.applied_edits()]
        if prepared.route == "engram":  # prepared before the catch-up: its provenance is redone
            prepared.provenance.update(weight_edits=self.weight_edits, pool=self._pool(prepared.prompt, prepared.user))

    def _weights(self, prepared: Prepared, read: set | None):
        if prepared.route == "engram":
            return (self.gist.memory.reading(prepared.user, read) if self.gist is not None
                    else contextlib.nullcontext())
        return self.state.unedited() if self.state is not None else contextlib.nullcontext()

    def _generate(self, stream: ChatStream, ids: list[int], params: SamplingParams, budget: int) -> None:
        read: set | None = set() if stream.route == "engram" and self.gist is not None else None
        try:
            with self._weights(stream.prepared, read):
                if params.seed is not None:
                    torch.manual_seed(params.seed)  # safe: the lock makes this the only generation
                for index in range(params.n):
                    if stream.cancelled.is_set():
                        break
                    reason, n_new = self._one(stream, index, ids, params, budget)
                    stream.completion_tokens += n_new
                    stream.queue.put(Event(index, finish_reason=reason))
            if read is not None:  # filled as `reading` ended; before the stream's end, so every reader sees it
                pool = stream.provenance.get("pool") or {}
                # a new dict, not a new key in the old one: a reader may be serialising that one now
                stream.provenance["pool"] = {**pool, "rows_read": sorted(read)}
        except BaseException as exc:  # goes to the reader, which reports it
            log.exception("generation failed")
            stream.queue.put(exc)
        finally:
            self.lock.release()
            stream.queue.put(None)

    @torch.no_grad()
    def _one(self, stream: ChatStream, index: int, ids: list[int], params: SamplingParams,
             budget: int) -> tuple[str, int]:
        from transformers import StoppingCriteriaList

        device = next(self.model.parameters()).device
        tokens = _Tokens(self.tokenizer, params.stop, lambda text: stream.queue.put(Event(index, text)))
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        sampling = ({"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if params.greedy else
                    {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": None})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=budget,
                            num_beams=1, pad_token_id=pad, streamer=tokens,
                            stopping_criteria=StoppingCriteriaList([_Cancel(tokens, stream.cancelled)]), **sampling)
        n_new = len(tokens.ids)
        hit_eos = bool(tokens.ids) and tokens.ids[-1] in self._eos_ids()
        reason = "stop" if tokens.stop.stopped or hit_eos or n_new < budget else "length"
        return reason, n_new

    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        if self.tokenizer.eos_token_id is not None:
            found.add(self.tokenizer.eos_token_id)
        return found

    def complete(self, prepared: Prepared, params: SamplingParams) -> Answer:
        return self.collect(self.start(prepared, params))

    @staticmethod
    def collect(stream: ChatStream) -> Answer:
        """Read a stream to its end into one Answer (a generation error is raised here)."""
        prepared = stream.prepared
        choices = [Choice(i) for i in range(stream.n)]
        for event in stream:
            choice = choices[event.index]
            choice.text += event.text
            if event.finish_reason:
                choice.finish_reason = event.finish_reason
        return Answer(choices, stream.prompt_tokens, stream.completion_tokens, stream.model_version,
                      prepared.route, prepared.provenance)

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
