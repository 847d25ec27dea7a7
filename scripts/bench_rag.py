"""Benchmark the RAG baseline on this machine: embedding/add throughput and query latency at 100k facts.

Two parts, because embedding 100k texts with MiniLM on a small CPU takes many minutes:
1. The real packaged MiniLM on `--embed-n` synthetic fact sentences: texts/s embedded, vectors/s added,
   and end-to-end latency of one text query (embed + search) on that index.
   Also recall@k of HNSW and IVF against flat on those real vectors.
2. `--n` random unit vectors (384-d, as MiniLM's) in each index kind: build time, single-query search
   latency (p50/p95), how often a query's source vector is in the top k, and recall@k against flat.
   Queries are noisy copies of stored vectors. Random high-dimensional data has no cluster structure,
   the worst case for HNSW and IVF, so their recall here is a floor; the real-vector recall is the guide.

    .venv/bin/python scripts/bench_rag.py --out rag_bench.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import faiss
import numpy as np

from memory.embeddings import default_embedder
from memory.vector import VectorConfig, VectorIndex

log = logging.getLogger("bench_rag")

SUBJECTS = ["Ada Varga", "Tomas Lind", "the river Osk", "Mount Keller", "Harbor Bank", "the Veld Prize", "Nia Obi"]
RELATIONS = ["was born in", "works for", "is located in", "is a member of", "speaks", "was founded by", "plays"]
OBJECTS = ["Lisbon", "the violin", "Acme Corporation", "Portuguese", "the Royal Society", "Kenya", "chess"]


class ShapeOnly:
    """Stands in for an embedder when vectors are supplied directly."""

    name, dim = "random-384", 384

    def embed(self, texts, batch_size=64):
        raise RuntimeError("vectors are supplied directly in this benchmark")


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def synthetic_statements(n: int, rng: np.random.Generator) -> list[str]:
    picks = rng.integers(0, len(SUBJECTS), size=(n, 3))
    return [f"{SUBJECTS[a]} {i} {RELATIONS[b]} {OBJECTS[c]} since {1900 + i % 120}"
            for i, (a, b, c) in enumerate(picks)]


def bench_real_embedder(n: int, n_queries: int, k: int, rng: np.random.Generator) -> dict:
    embedder = default_embedder()
    started = time.perf_counter()
    embedder.embed(["warm up"])
    load_s = time.perf_counter() - started
    texts = synthetic_statements(n, rng)
    started = time.perf_counter()
    vectors = embedder.embed(texts, batch_size=64)
    embed_s = time.perf_counter() - started
    index = VectorIndex(embedder)
    started = time.perf_counter()
    index.add_vectors(range(n), vectors)
    add_s = time.perf_counter() - started
    questions = [f"Where was {SUBJECTS[i % len(SUBJECTS)]} {i} born?" for i in range(n_queries)]
    ann = ann_recall_on_real(vectors, embedder.embed(questions), k)
    query_s, embed_q_s = [], []
    for question in questions:
        t0 = time.perf_counter()
        embedder.embed([question])
        embed_q_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        index.search(question, k=k)
        query_s.append(time.perf_counter() - t0)
    return {"n": n, "load_s": round(load_s, 2), "embed_s": round(embed_s, 2),
            "embed_texts_per_s": round(n / embed_s, 1), "faiss_add_s": round(add_s, 4),
            "add_facts_per_s": round(n / (embed_s + add_s), 1),
            "query_embed": percentiles(embed_q_s), "query_end_to_end": percentiles(query_s), **ann}


def recall(found: list[list[int]], exact: list[list[int]]) -> float:
    return round(float(np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(found, exact)])), 4)


def ann_recall_on_real(vectors: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """Recall@k of HNSW and IVF against flat on real MiniLM vectors (clustered, unlike random ones)."""
    found = {}
    for kind in ("flat", "hnsw", "ivf"):
        index = VectorIndex(ShapeOnly(), VectorConfig(kind=kind, ivf_min_train=min(1000, len(vectors))))
        index.add_vectors(range(len(vectors)), vectors)
        found[kind] = [[i for i, _ in row] for row in index.search_vectors(queries, k=k)]
    return {f"{kind}_recall_at_{k}": recall(found[kind], found["flat"]) for kind in ("hnsw", "ivf")}


def bench_kind(kind: str, data: np.ndarray, queries: np.ndarray, sources: np.ndarray, k: int,
               exact: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    index = VectorIndex(ShapeOnly(), VectorConfig(kind=kind))
    started = time.perf_counter()
    index.add_vectors(range(len(data)), data)
    build_s = time.perf_counter() - started
    index.search_vectors(queries[:1], k=k)  # warm up
    latencies, found = [], []
    for query in queries:
        t0 = time.perf_counter()
        hits = index.search_vectors(query[None, :], k=k)[0]
        latencies.append(time.perf_counter() - t0)
        found.append([fact_id for fact_id, _ in hits])
    out = {"kind": kind, "n": len(data), "build_s": round(build_s, 2), "search": percentiles(latencies),
           f"source_in_top_{k}": round(float(np.mean([s in f for s, f in zip(sources.tolist(), found)])), 4)}
    if exact is not None:
        out[f"recall_at_{k}"] = recall(found, exact)
    if kind == "hnsw" and len(data) > 20_000:
        out["remove_100_s"] = None  # a removal rebuilds the graph: the same time as build_s
        return out, found
    started = time.perf_counter()
    index.remove(range(0, 1000, 10))  # 100 removals in one batch, as one sync does
    out["remove_100_s"] = round(time.perf_counter() - started, 3)
    return out, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors for the latency test")
    parser.add_argument("--embed-n", type=int, default=5_000, help="texts for the real-embedder test")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", default="flat,hnsw,ivf")
    parser.add_argument("--noise", type=float, default=0.03, help="per-dimension noise on the query copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: their defaults)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rng = np.random.default_rng(args.seed)
    import torch

    if args.threads:  # on a shared, oversubscribed CPU one thread each is often faster
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    result = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                          "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                          "faiss": faiss.__version__}}
    if args.embed_n:
        log.info("real MiniLM on %d texts", args.embed_n)
        result["embedder"] = bench_real_embedder(args.embed_n, min(args.queries, 50), args.k, rng)
        log.info("%s", result["embedder"])
    data = rng.standard_normal((args.n, 384)).astype(np.float32)
    faiss.normalize_L2(data)
    picks = rng.integers(0, args.n, size=args.queries)
    queries = data[picks] + args.noise * rng.standard_normal((args.queries, 384)).astype(np.float32)
    result["kinds"], exact = [], None
    for kind in args.kinds.split(","):
        log.info("%s index with %d random vectors", kind, args.n)
        stats, found = bench_kind(kind, data, queries, picks, args.k, exact)
        exact = found if kind == "flat" else exact
        result["kinds"].append(stats)
        log.info("%s", stats)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
