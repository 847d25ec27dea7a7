"""The `chat` section of `engram bench`: what one chat answer costs on each route of `engram serve`.

Measured in process through ChatEngine (prepare, start, read the stream), not over HTTP, so the figures
are the engine's own and carry no server or client overhead. The fixture is a temp store holding N
generated facts, all of them in the gist pool, so `engram` reads a real pool and `rag`, `rag-subject` and
`icl` have facts to retrieve or show. Per route, over R repeats (after one unmeasured warm-up, which
also builds the RAG index), with greedy decoding and a fixed max_tokens:

- ttft_ms: from start() to the first text event (prefill plus the first token; prepare() excluded);
- prepare_ms: prepare() alone (retrieval for rag/rag-subject, the prompt build for icl, provenance);
- tokens_per_second: decode speed after the first token, (completion_tokens - 1) / (end - first text);
- latency_ms: end to end, from prepare() to the stream's end.

EOS is held back until max_tokens (min_new_tokens on the model's generation config while the section
runs), so every route decodes the same number of tokens; the real count is reported in any case.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.chat.engine import ROUTES, ChatEngine, EngineConfig, SamplingParams
from agent.chat.prompts import ChatInputError

HOW = "in process through ChatEngine (prepare/start/stream), not over HTTP"


@dataclass(frozen=True)
class ChatBenchConfig:
    facts: int = 100
    repeats: int = 3
    max_tokens: int = 32
    warmup: int = 1
    routes: tuple[str, ...] = ROUTES


def _question(i: int) -> list[dict]:
    # asks about a stored fact (evaluation.bench.synthetic_facts), so retrieval and the pool have a hit
    return [{"role": "user", "content": f"What is the favourite colour of person {i}?"}]


@contextlib.contextmanager
def _full_length(model, tokens: int):
    """Hold EOS back for `tokens` new tokens, so a greedy answer that would end early still decodes them all."""
    config = getattr(model, "generation_config", None)
    if config is None:
        yield
        return
    before = config.min_new_tokens
    config.min_new_tokens = tokens
    try:
        yield
    finally:
        config.min_new_tokens = before


def _sync(model) -> None:
    import torch

    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def measure(engine: ChatEngine, route: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy answer on `route`, timed."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    prepared = engine.prepare(route, messages, max_tokens=max_tokens)
    t_start = time.perf_counter()
    stream = engine.start(prepared, params)
    t_first = None
    for event in stream:
        if event.text and t_first is None:
            t_first = time.perf_counter()
    _sync(engine.model)
    t_end = time.perf_counter()
    n = stream.completion_tokens
    t_first = t_first if t_first is not None else t_end  # no visible text at all: the answer's end stands in
    decode_s = t_end - t_first
    return {"prepare_ms": (t_start - t0) * 1000, "ttft_ms": (t_first - t_start) * 1000,
            "latency_ms": (t_end - t0) * 1000, "prompt_tokens": stream.prompt_tokens, "completion_tokens": n,
            "tokens_per_second": (n - 1) / decode_s if n > 1 and decode_s > 0 else None}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _gist_memory(loaded, addon):
    """The gist memory `engram serve` would open (the trained add-on, gates on), else an untrained add-on:
    speed does not depend on what the add-on learned."""
    from editors.incomes.memory import GistMemory, default_addon_dir
    from editors.incomes.modules import GistAddon

    if addon is not None:
        return GistMemory(loaded.model, loaded.tokenizer, addon), "given"
    trained = default_addon_dir(loaded.name)
    if trained is not None:
        return GistMemory.open(loaded.model, loaded.tokenizer, loaded.name), str(trained)
    return GistMemory(loaded.model, loaded.tokenizer, GistAddon.for_model(loaded.model)), "untrained (speed only)"


def bench_chat(loaded, cfg: ChatBenchConfig | None = None, addon=None, embedder=None) -> dict:
    """The chat figures for every route in `cfg.routes`. `loaded`: model, tokenizer, name (a LoadedModel or
    alike); `addon`: a gist add-on to use instead of the model's trained one; `embedder`: RAG's embedder
    (default: the packaged MiniLM, as `engram serve` uses)."""
    from editors.gist_state import GIST, GistState
    from editors.state import ModelState
    from evaluation.bench import synthetic_facts
    from memory.facts import FactInput
    from memory.store import FactStore

    cfg = cfg or ChatBenchConfig()
    model = loaded.model
    with tempfile.TemporaryDirectory(prefix="engram-bench-chat-") as tmp:
        store = FactStore(f"sqlite:///{Path(tmp) / 'store.sqlite'}")
        memory = None
        engine = None
        try:
            # queued for the gist route as ingestion queues them; GistState.open compresses them into the pool
            store.add_facts([FactInput(**f) for f in synthetic_facts(cfg.facts)], pending_backend=GIST)
            state = ModelState(store, model)
            state.rebuild(sweep=False)
            memory, addon_used = _gist_memory(loaded, addon)
            started = time.perf_counter()
            gist = GistState(store, memory)
            pooled = gist.open()
            compress_s = time.perf_counter() - started
            engine = ChatEngine(model, loaded.tokenizer, loaded.name, state=state, gist=gist, store=store,
                                config=EngineConfig(), embedder=embedder)
            out: dict = {"measured": HOW, "model": loaded.name, "device": str(next(model.parameters()).device),
                         "decoding": "greedy", "max_tokens": cfg.max_tokens, "eos": "held back until max_tokens",
                         "repeats": cfg.repeats, "warmup": cfg.warmup, "facts": cfg.facts, "pool_facts": pooled,
                         "gist_addon": addon_used, "compress_seconds": round(compress_s, 2),
                         "routes": list(cfg.routes)}
            with _full_length(model, cfg.max_tokens):
                for route in cfg.routes:
                    try:
                        for w in range(cfg.warmup):  # first-use costs (the RAG index, MiniLM, kernels) stay out
                            measure(engine, route, _question((cfg.facts - 1 - w) % max(cfg.facts, 1)), cfg.max_tokens)
                        runs = [measure(engine, route, _question(r % max(cfg.facts, 1)), cfg.max_tokens)
                                for r in range(cfg.repeats)]
                    except ChatInputError as exc:  # e.g. a prompt past the context window: say so, no number
                        out.setdefault("unavailable", {})[route] = str(exc)
                        continue
                    out.update(_summary(route, runs))
            return out
        finally:
            if engine is not None:
                engine.close()
            if memory is not None:
                memory.close()  # detaches the add-on: the model is the plain base model again
            store.engine.dispose()


def _summary(route: str, runs: list[dict]) -> dict:
    def rounded(key: str, digits: int):
        value = _median([r[key] for r in runs])
        return None if value is None else round(value, digits)

    return {f"chat_ttft_ms_{route}": rounded("ttft_ms", 1),
            f"chat_tokens_per_second_{route}": rounded("tokens_per_second", 2),
            f"chat_latency_ms_{route}": rounded("latency_ms", 1),
            f"chat_prepare_ms_{route}": rounded("prepare_ms", 1),
            f"chat_prompt_tokens_{route}": rounded("prompt_tokens", 1),
            f"chat_completion_tokens_{route}": rounded("completion_tokens", 1)}
