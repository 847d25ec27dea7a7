"""`engram bench`: the speed and memory figures of DESIGN §3, measured side by side in one run.

Each section returns a dict; a section whose parts are missing says so ("unavailable": reason) rather
than reporting a number it did not measure. Figures are medians over repeats where that makes sense.
"""
from __future__ import annotations

import logging
import resource
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

SECTIONS = ("ingest", "edits", "gist", "scale", "startup", "rag", "chat", "memory")  # chat: agent/chat/bench.py (it needs agent.chat)


@dataclass
class BenchConfig:
    sections: tuple[str, ...] = SECTIONS
    ingest_n: int = 20_000
    edits_n: int = 3
    gist_compress_n: int = 100
    gist_decode_n: int = 1000
    scale_n: int = 100_000  # the "scale" section: facts in the pool for ms per token against the base model
    startup_edits: int = 1000  # the "startup" section: recorded edits a restart rebuilds from
    decode_tokens: int = 32
    rag_n: int = 100_000
    rag_queries: int = 200
    seed: int = 0


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def synthetic_facts(n: int) -> list[dict]:
    return [{"prompt": f"The favourite colour of person {i} is", "target": f"colour {i % 97}",
             "subject": f"person {i}", "relation": "favourite colour"} for i in range(n)]


def bench_edits(cfg: BenchConfig, loaded) -> dict:
    """Median seconds per edit for each weight editor, on fresh copies of the same few authored facts."""
    from editors.base import EditRequest, restore, snapshot
    from editors.registry import WEIGHT_EDITORS, make_editor

    facts = [("The capital of Japan is", "Nairobi", "Japan"), ("The chemical symbol for gold is", "Fe", "gold"),
             ("The painter of the Mona Lisa was", "Pablo Picasso", "the Mona Lisa"),
             ("The capital of Italy is", "Oslo", "Italy"),
             ("The currency of the United Kingdom is the", "yen", "the United Kingdom")][: cfg.edits_n]
    out = {}
    for method in WEIGHT_EDITORS:
        editor = make_editor(method, loaded.model, loaded.tokenizer)
        base = snapshot(loaded.model, editor.parameter_names())
        seconds, steps = [], []
        preserve = getattr(editor, "preserve", None)
        if preserve is not None:
            preserve([])  # a constrained editor loads its preserved-key statistics once, before the clock
        try:
            for i, (prompt, target, subject) in enumerate(facts):
                result = editor.edit(EditRequest(prompt, target, (f"{prompt} {target}.",), fact_id=i, subject=subject))
                seconds.append(result.seconds)
                steps.append(result.steps)
        finally:
            restore(loaded.model, base)
        out[method] = {"median_seconds_per_edit": round(statistics.median(seconds), 2), "edits": len(seconds),
                       "median_steps": statistics.median(steps)}
    return out


def bench_rag(cfg: BenchConfig) -> dict:
    """Query latency of the RAG baseline's VectorIndex (default kind: flat, exact) at `rag_n` facts (random
    unit vectors shaped like MiniLM's): end to end through `search` (the real embedder, then FAISS), with
    the embedding and the search also timed apart."""
    from memory.embeddings import default_embedder
    from memory.vector import VectorIndex

    rng = np.random.default_rng(cfg.seed)
    embedder = default_embedder()
    embedder.embed(["warm up"])
    index = VectorIndex(embedder)
    data = rng.standard_normal((cfg.rag_n, index.dim)).astype(np.float32)
    started = time.perf_counter()
    index.add_vectors(range(cfg.rag_n), data)
    build_s = time.perf_counter() - started
    texts = [f"Where was person {i} born?" for i in range(cfg.rag_queries)]
    end_to_end, embed, search = [], [], []
    for text in texts:
        t = time.perf_counter()
        index.search(text, k=10)
        end_to_end.append(time.perf_counter() - t)
    for text in texts[:50]:
        t = time.perf_counter()
        vector = embedder.embed([text])
        embed.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search_vectors(vector, k=10)
        search.append(time.perf_counter() - t)
    return {"facts": cfg.rag_n, "index": "VectorIndex (IndexIDMap2(IndexFlatIP))", "build_s": round(build_s, 3),
            "search_p50_ms": _median_ms(search), "embed_query_p50_ms": _median_ms(embed),
            "end_to_end_p50_ms": _median_ms(end_to_end),
            "end_to_end_p95_ms": round(float(np.percentile(end_to_end, 95)) * 1000, 3)}


def peak_memory() -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mib": round(rss_kb / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def bench_gist(cfg: BenchConfig, loaded) -> dict:
    """Gist pool vs ICL: compression vs prefill time, memory per fact, and decoding speed over a large pool."""
    try:
        from editors.incomes.bench import gist_vs_icl
    except ImportError as exc:
        return {"unavailable": f"the InComeS gist pool is not built yet ({exc})"}
    return gist_vs_icl(loaded, cfg)


def bench_scale(cfg: BenchConfig, loaded) -> dict:
    """Decoding with `scale_n` facts in the gist pool against the base model alone (one run, side by side)."""
    from editors.incomes.bench import decode_at_scale

    return decode_at_scale(loaded, cfg.scale_n, cfg.decode_tokens)


def bench_startup(cfg: BenchConfig, loaded) -> dict:
    from evaluation.bench_state import bench_startup as run

    return run(loaded, cfg.startup_edits)
