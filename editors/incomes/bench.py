"""Gist pool against ICL, side by side on one model: compression vs prefill time, memory per fact, and
decoding speed with N facts (gists in the pool vs facts in a prefilled KV cache).

Speed and memory do not depend on what the add-on learned, so an untrained add-on is used when no
trained one exists; the result says which.
"""
from __future__ import annotations

import statistics
import time

import torch

from editors.prefix_cache import cache_kwarg as _cache_kw
from editors.prefix_cache import cache_of as _cache_of
from editors.incomes.memory import GistMemory, default_addon_dir
from editors.incomes.modules import GistAddon


def _facts(n: int) -> list[str]:
    return [f"The favourite colour of person number {i} is colour {i % 97}." for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _decode_ms_per_token(model, input_ids: torch.Tensor, past, tokens: int) -> float:
    """Greedy decoding from an already prefilled cache; the median ms of one new token."""
    device = input_ids.device
    next_id = input_ids[:, -1:]
    times = []
    for _ in range(tokens):
        _sync(device)
        t = time.perf_counter()
        out = model(input_ids=next_id, use_cache=True, **{_cache_kw(model): past})
        past = _cache_of(out)
        next_id = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@torch.no_grad()
def _prefill(model, ids: torch.Tensor):
    device = ids.device
    _sync(device)
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(device)
    return _cache_of(out), time.perf_counter() - t


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = next(model.parameters()).element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * element


def bench_memory(loaded) -> tuple[GistMemory, object]:
    """A fresh GistMemory on the loaded model with its shipped add-on (an untrained one when there is
    none: speed and memory do not depend on what it learned), and the add-on's directory or None."""
    trained = default_addon_dir(loaded.name)
    addon = GistAddon.load(trained, loaded.model) if trained else GistAddon.for_model(loaded.model)
    return GistMemory(loaded.model, loaded.tokenizer, addon), trained


def fill_random(memory: GistMemory, start: int, stop: int, generator: torch.Generator) -> None:
    """Rows start..stop-1 of random gists, each under a subject of its own (so the mention gate keeps
    them from a query about another subject)."""
    from editors.incomes.compress import CompressedGists

    pool = memory.pool
    shape = (len(pool.layers), stop - start, pool.n_kv_heads, pool.head_dim)
    gists = CompressedGists(pool.layers, 0.1 * torch.randn(shape, generator=generator),
                            0.1 * torch.randn(shape, generator=generator))
    pool.append(list(range(start, stop)), gists, anchors=[memory.anchors(f"Person {i} Zed") for i in range(start, stop)])


@torch.no_grad()
def gist_vs_icl(loaded, cfg) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    memory, trained = bench_memory(loaded)
    try:
        out: dict = {"addon": str(trained) if trained else "untrained (speed and memory only)",
                     "device": str(device)}
        # 1. compress N facts vs prefill the same N facts for ICL
        facts = _facts(cfg.gist_compress_n)
        _sync(device)
        t = time.perf_counter()
        memory.add(list(range(len(facts))), facts)
        _sync(device)
        out["compress_seconds"] = round(time.perf_counter() - t, 3)
        block = "Facts:\n" + "".join(f"- {f}\n" for f in facts)
        ids = tok(block, return_tensors="pt")["input_ids"].to(device)
        _, prefill_s = _prefill(model, ids)
        out["icl_prefill_seconds"] = round(prefill_s, 3)
        out["compress_facts"] = len(facts)
        # 2. memory per fact
        tokens_per_fact = ids.shape[1] / len(facts)
        icl_bytes = tokens_per_fact * kv_bytes_per_token(model)
        out["gist_bytes_per_fact"] = memory.pool.bytes_per_fact()
        out["icl_kv_bytes_per_fact"] = round(icl_bytes)
        out["memory_ratio"] = round(icl_bytes / memory.pool.bytes_per_fact(), 1)
        # 3. decoding with N facts: gists in the pool vs facts in a prefilled cache
        n = cfg.gist_decode_n
        more = _facts(n)[len(facts):]
        memory.add(list(range(len(facts), n)), more)
        question = tok("The favourite colour of person number 7 is", return_tensors="pt")["input_ids"].to(device)
        with memory.reading():
            past, _ = _prefill(model, question)
            out["gist_ms_per_token"] = round(_decode_ms_per_token(model, question, past, cfg.decode_tokens), 2)
        block = "Facts:\n" + "".join(f"- {f}\n" for f in _facts(n)) + "\nThe favourite colour of person number 7 is"
        ids = tok(block, return_tensors="pt")["input_ids"].to(device)
        past, prefill_s = _prefill(model, ids)
        out["icl_context_tokens"] = int(ids.shape[1])
        out["icl_prefill_seconds_n"] = round(prefill_s, 2)
        out["icl_ms_per_token"] = round(_decode_ms_per_token(model, ids, past, cfg.decode_tokens), 2)
        out["decode_facts"] = n
        out["decode_speedup"] = round(out["icl_ms_per_token"] / out["gist_ms_per_token"], 2)
        return out
    finally:
        memory.close()


@torch.no_grad()
def decode_at_scale(loaded, n: int, tokens: int = 32, repeats: int = 3) -> dict:
    """ms per generated token of the base model alone and with `n` facts in the pool, side by side (medians
    over `repeats` alternating runs). The rows are random gists under distinct subjects: speed does not
    depend on what a gist holds, and the query mentions one real fact, so the mention gate lets it read that
    row alone, as a chat about one subject does."""
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    memory, _ = bench_memory(loaded)
    try:
        _append_ms(memory, first_id=-100, repeats=1)  # warm up: the first compression pays one-time costs
        memory.remove(-100)
        empty = _append_ms(memory, first_id=-10)  # one fact at a time into an empty pool
        for fact_id in memory.pool.fact_ids:
            memory.remove(fact_id)
        memory.add([0], ["Quorbin Vesk lives in Talloway."], subjects=["Quorbin Vesk"])
        started = time.perf_counter()
        fill_random(memory, 1, n + 1, torch.Generator().manual_seed(0))
        fill_s = time.perf_counter() - started
        question = tok("Where does Quorbin Vesk live?", return_tensors="pt")["input_ids"].to(device)
        base, gist = [], []
        for _ in range(repeats):
            past, _ = _prefill(model, question)
            base.append(_decode_ms_per_token(model, question, past, tokens))
            with memory.reading():
                past, _ = _prefill(model, question)
                gist.append(_decode_ms_per_token(model, question, past, tokens))
        full = _append_ms(memory, first_id=-20)  # the same, into the pool of n + 1 facts
        out = {"facts": n + 1, "fill_seconds": round(fill_s, 1),
               "gist_append_ms_per_fact_empty": empty, "gist_append_ms_per_fact_full": full,
               "base_decode_ms_per_token": round(statistics.median(base), 2),
               "gist_decode_ms_per_token": round(statistics.median(gist), 2)}
        out["gist_vs_base_ratio"] = round(out["gist_decode_ms_per_token"] / out["base_decode_ms_per_token"], 3)
        return out
    finally:
        memory.close()


def _append_ms(memory: GistMemory, first_id: int, repeats: int = 3) -> float:
    """Median ms to compress one fact and append it to the pool as it is (`repeats` facts, one at a time)."""
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        memory.add([first_id - i], [f"Marlo Quint {i} plays the oboe."], subjects=[f"Marlo Quint {i}"])
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)
