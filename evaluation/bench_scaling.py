"""`engram bench --scaling`: how each memory holds up as facts pile up, in one run on one machine.

For 10, 100, 1k, 10k and 100k facts: ms per generated token, memory, and the cost of adding one fact, for
the gist pool, ICL (facts in a prefilled context, up to the model's window) and RAG (FAISS + the real
embedder); and for the weight route, seconds per ICE edit as edits accumulate and the restart time as
recorded edits accumulate. Writes a JSON, a CSV (one row per method and size) and a plot.

The pool's rows beyond the few real facts are random gists under distinct subjects, as in the scale
section: decoding speed does not depend on what a gist holds, and the query mentions one real fact.
"""
from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SIZES = (10, 100, 1000, 10_000, 100_000)
CSV_FIELDS = ("method", "facts", "edits", "ms_per_token", "query_ms", "memory_bytes", "add_ms", "seconds", "note")


@dataclass(frozen=True)
class ScalingConfig:
    sizes: tuple[int, ...] = SIZES
    decode_tokens: int = 16
    repeats: int = 3  # alternating base / gist decoding runs at each size (medians)
    ice_edits: int = 20  # real ICE edits in sequence, each timed
    startup_sizes: tuple[int, ...] = (10, 49, 100, 149, 1000, 1049)  # on a checkpoint, and the most deltas after one
    rag_queries: int = 50
    seed: int = 0


def _fact(i: int) -> str:
    return f"The favourite colour of person number {i} is colour {i % 97}."


def _row(method: str, **values) -> dict:
    return {"method": method, **values}


@torch.no_grad()
def gist_curve(loaded, cfg: ScalingConfig) -> list[dict]:
    """The pool grown through each size in turn: base and gist ms per token side by side, the pool's
    bytes, and one real fact compressed and appended at that size."""
    from editors.incomes.bench import _append_ms, _decode_ms_per_token, _prefill, bench_memory, fill_random

    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    memory, _ = bench_memory(loaded)
    rows = []
    try:
        _append_ms(memory, first_id=-100, repeats=1)  # warm-up: the first compression pays one-time costs
        memory.remove(-100)
        memory.add([0], ["Quorbin Vesk lives in Talloway."], subjects=["Quorbin Vesk"])
        question = tok("Where does Quorbin Vesk live?", return_tensors="pt")["input_ids"].to(device)
        pool, generator, held = memory.pool, torch.Generator().manual_seed(cfg.seed), 1
        for n in cfg.sizes:
            if n > held:
                fill_random(memory, held, n, generator)
                held = n
            base, gist = [], []
            for _ in range(cfg.repeats):
                past, _ = _prefill(model, question)
                base.append(_decode_ms_per_token(model, question, past, cfg.decode_tokens))
                with memory.reading():
                    past, _ = _prefill(model, question)
                    gist.append(_decode_ms_per_token(model, question, past, cfg.decode_tokens))
            add_ms = _append_ms(memory, first_id=-10 - n)
            for i in range(3):
                memory.remove(-10 - n - i)
            rows.append(_row("base", facts=n, ms_per_token=round(statistics.median(base), 2), memory_bytes=0))
            rows.append(_row("gist", facts=n, ms_per_token=round(statistics.median(gist), 2),
                             memory_bytes=int(pool.nbytes()), add_ms=add_ms))
    finally:
        memory.close()
    return rows


@torch.no_grad()
def icl_curve(loaded, cfg: ScalingConfig) -> list[dict]:
    """Facts prefilled in the context, while they fit the model's window: ms per token, the KV cache's
    bytes, and the cost of adding one fact (prefilling its tokens onto the cache)."""
    from editors.incomes.bench import _decode_ms_per_token, _prefill, kv_bytes_per_token
    from editors.prefix_cache import cache_kwarg, cache_of

    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    window = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    rows = []
    for n in cfg.sizes:
        block = "Facts:\n" + "".join(f"- {_fact(i)}\n" for i in range(n))
        tokens = len(tok(block)["input_ids"])
        if window and tokens + 64 > window:
            rows.append(_row("icl", facts=n, note=f"beyond the context window ({tokens} tokens > {window})"))
            continue
        ids = tok(block + "\nThe favourite colour of person number 7 is", return_tensors="pt")["input_ids"].to(device)
        past, _ = _prefill(model, ids)
        ms = _decode_ms_per_token(model, ids, past, cfg.decode_tokens)
        past, _ = _prefill(model, tok(block, return_tensors="pt")["input_ids"].to(device))
        more = tok(f"- {_fact(n)}\n", return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        started = time.perf_counter()
        model(input_ids=more, use_cache=True, **{cache_kwarg(model): past})
        add_ms = (time.perf_counter() - started) * 1000
        del past
        rows.append(_row("icl", facts=n, ms_per_token=round(ms, 2), memory_bytes=int(ids.shape[1] * kv_bytes_per_token(model)),
                         add_ms=round(add_ms, 2)))
    return rows


def rag_curve(loaded, cfg: ScalingConfig, embedder=None) -> list[dict]:
    """The RAG baseline's VectorIndex (default kind) holding n embedder-shaped unit vectors: one query end
    to end (`search`: embedding + search), the vectors' bytes, one fact embedded and added; ms per token
    with the k=3 retrieved facts in the prompt."""
    from editors.incomes.bench import _decode_ms_per_token, _prefill
    from memory.embeddings import default_embedder
    from memory.vector import VectorIndex

    embedder = embedder or default_embedder()
    embedder.embed(["warm-up"])
    rng = np.random.default_rng(cfg.seed)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    prompt = "".join(f"{_fact(i)}\n" for i in range(3)) + "The favourite colour of person number 1 is"
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        past, _ = _prefill(model, ids)
        ms_per_token = round(_decode_ms_per_token(model, ids, past, cfg.decode_tokens), 2)
    rows = []
    for n in cfg.sizes:
        index = VectorIndex(embedder)
        index.add_vectors(range(n), rng.standard_normal((n, index.dim)).astype(np.float32))
        query_ms = []
        for q in range(cfg.rag_queries):
            started = time.perf_counter()
            index.search(f"Where was person {q} born?", k=3)
            query_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        index.add([n], [_fact(n)])
        add_ms = (time.perf_counter() - started) * 1000
        rows.append(_row("rag", facts=n, ms_per_token=ms_per_token, query_ms=round(statistics.median(query_ms), 3),
                         memory_bytes=int(index.ntotal * index.dim * 4), add_ms=round(add_ms, 2)))
    return rows


def ice_curve(loaded, cfg: ScalingConfig) -> list[dict]:
    """`ice_edits` real ICE edits (the default constraint) in sequence on the live model, each timed; the
    model is put back afterwards."""
    from editors.base import EditRequest, restore, snapshot
    from editors.registry import make_editor

    editor = make_editor("ice", loaded.model, loaded.tokenizer)
    base = snapshot(loaded.model, editor.parameter_names())
    preserve = getattr(editor, "preserve", None)
    if preserve is not None:
        preserve([])  # the preserved-key statistics load once, before the clock
    rows = []
    try:
        for i in range(cfg.ice_edits):
            request = EditRequest(f"The code name of agent {i} is", f"Falcon {i}", (f"The code name of agent {i} is Falcon {i}.",),
                                  fact_id=i, subject=f"agent {i}")
            result = editor.edit(request)
            rows.append(_row("ice_edit", edits=i + 1, seconds=round(result.seconds, 2)))
    finally:
        restore(loaded.model, base)
    return rows


def startup_curve(loaded, cfg: ScalingConfig) -> list[dict]:
    from evaluation.bench_state import startup_times

    return [_row("startup", edits=n, seconds=s) for n, s in startup_times(loaded, cfg.startup_sizes)]


def run_scaling(loaded, cfg: ScalingConfig, out_dir: Path, note=print, embedder=None) -> dict:
    """Every curve in turn; the rows also go to out_dir/scaling.csv and the plot to out_dir/scaling.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    timings = {}
    for name, curve in (("gist", gist_curve), ("icl", icl_curve), ("rag", lambda l, c: rag_curve(l, c, embedder)),
                        ("ice", ice_curve), ("startup", startup_curve)):
        note(f"bench --scaling: {name} ...")
        started = time.perf_counter()
        rows.extend(curve(loaded, cfg))
        timings[name] = round(time.perf_counter() - started, 1)
    with open(out_dir / "scaling.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)
    plot(rows, out_dir / "scaling.png")
    return {"rows": rows, "usable": usable(rows), "section_seconds": timings,
            "csv": str(out_dir / "scaling.csv"), "plot": str(out_dir / "scaling.png")}


def usable(rows: list[dict]) -> dict:
    """Where each method stops being usable, from the rows: ICL at its window; the gist pool and RAG by
    their cost against the base model at the largest size measured."""
    base = {r["facts"]: r["ms_per_token"] for r in rows if r["method"] == "base"}
    out = {}
    icl_fit = [r["facts"] for r in rows if r["method"] == "icl" and "ms_per_token" in r]
    icl_over = [r["facts"] for r in rows if r["method"] == "icl" and "note" in r]
    out["icl"] = (f"fits up to {max(icl_fit) if icl_fit else 0} facts; {min(icl_over)} do not fit the window"
                  if icl_over else f"fits every size measured (up to {max(icl_fit)})")
    gist = [r for r in rows if r["method"] == "gist"]
    if gist:
        top = gist[-1]
        out["gist"] = f"{top['ms_per_token'] / base[top['facts']]:.2f}x the base model's ms per token at {top['facts']} facts"
    rag = [r for r in rows if r["method"] == "rag"]
    if rag:
        out["rag"] = f"{rag[-1]['query_ms']} ms a query at {rag[-1]['facts']} facts (flat index: grows linearly)"
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colours = {"base": "tab:gray", "gist": "tab:blue", "icl": "tab:orange", "rag": "tab:green"}
    series = {m: [r for r in rows if r["method"] == m and r.get("ms_per_token") not in (None, "")]
              for m in ("base", "gist", "icl", "rag")}
    for (ax, key, label) in ((axes[0][0], "ms_per_token", "ms per generated token"),
                             (axes[0][1], "memory_bytes", "memory (bytes)"), (axes[1][0], "add_ms", "ms to add one fact")):
        for method, points in series.items():
            points = [r for r in points if r.get(key) not in (None, "", 0)]
            if points:
                ax.plot([r["facts"] for r in points], [r[key] for r in points], marker="o", label=method,
                        color=colours[method])
        ax.set_xscale("log")
        if key != "ms_per_token":
            ax.set_yscale("log")
        ax.set_xlabel("facts")
        ax.set_ylabel(label)
        ax.legend()
    ax = axes[1][1]
    for method, label in (("ice_edit", "seconds per ICE edit"), ("startup", "startup seconds")):
        points = [r for r in rows if r["method"] == method]
        if points:
            ax.plot([r["edits"] for r in points], [r["seconds"] for r in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("weight edits so far")
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
