"""The headline figures of one `engram bench` run, by the names the README's Performance table uses, taken
from the sections' own results (a figure whose section did not run, or could not, is absent, never guessed)."""
from __future__ import annotations


def _ratio(a, b, digits: int = 2):
    return round(a / b, digits) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def headline(results: dict) -> dict:
    out: dict = {}
    edits = results.get("edits") or {}
    if "ice" in edits and "ftm" in edits:
        out["ice_seconds_per_edit"] = edits["ice"]["median_seconds_per_edit"]
        out["ftm_seconds_per_edit"] = edits["ftm"]["median_seconds_per_edit"]
        out["ice_vs_ftm_time_ratio"] = _ratio(out["ice_seconds_per_edit"], out["ftm_seconds_per_edit"])
    gist = results.get("gist") or {}
    if "compress_seconds" in gist:
        n = gist["compress_facts"]
        out[f"gist_compress_seconds_{n}"] = gist["compress_seconds"]
        out[f"icl_prefill_seconds_{n}"] = gist["icl_prefill_seconds"]
        out["gist_vs_icl_compress_speedup"] = _ratio(gist["icl_prefill_seconds"], gist["compress_seconds"])
        out["gist_pool_bytes_per_fact"] = gist["gist_bytes_per_fact"]
        out["icl_kv_bytes_per_fact"] = gist["icl_kv_bytes_per_fact"]
        out["gist_vs_icl_memory_ratio"] = gist["memory_ratio"]
        d = gist["decode_facts"]
        out[f"gist_decode_ms_per_token_{d}"] = gist["gist_ms_per_token"]
        out[f"icl_decode_ms_per_token_{d}"] = gist["icl_ms_per_token"]
        out["gist_vs_icl_decode_speedup"] = gist["decode_speedup"]
    scale = results.get("scale") or {}
    if "gist_decode_ms_per_token" in scale:
        label = _count(scale["facts"] - 1)
        out["base_decode_ms_per_token"] = scale["base_decode_ms_per_token"]
        out[f"gist_decode_ms_per_token_{label}"] = scale["gist_decode_ms_per_token"]
        out[f"gist_vs_base_decode_ratio_{label}"] = scale["gist_vs_base_ratio"]
        for key in ("gist_append_ms_per_fact_empty", "gist_append_ms_per_fact_full"):
            if key in scale:
                out[key.replace("_full", f"_at_{label}")] = scale[key]
    rag = results.get("rag") or {}
    if "end_to_end_p50_ms" in rag:
        out[f"rag_query_ms_{_count(rag['facts'])}"] = rag["end_to_end_p50_ms"]
    ingest = results.get("ingest") or {}
    if "facts_per_second" in ingest:
        out["ingest_facts_per_second"] = ingest["facts_per_second"]
    startup = results.get("startup") or {}
    if "startup_seconds" in startup:
        out[f"startup_seconds_{startup['edits']}_edits"] = startup["startup_seconds"]
        if "worst_case_startup_seconds" in startup:  # the most deltas after a checkpoint
            out[f"startup_seconds_{startup['worst_case_edits']}_edits"] = startup["worst_case_startup_seconds"]
    memory = results.get("memory") or {}
    if "peak_rss_mib" in memory:
        out["peak_rss_mb"] = memory["peak_rss_mib"]
    return out


def _count(n: int) -> str:
    """100000 -> "100k", 1000 -> "1000" (the names the issue and README use)."""
    return f"{n // 1000}k" if n >= 10_000 and n % 1000 == 0 else str(n)


# The figures each section owes (names with a size end in `_N`, matched by prefix), for the schema check.
EXPECTED = {
    "edits": ("ice_seconds_per_edit", "ftm_seconds_per_edit", "ice_vs_ftm_time_ratio"),
    "gist": ("gist_compress_seconds_", "icl_prefill_seconds_", "gist_vs_icl_compress_speedup", "gist_pool_bytes_per_fact",
             "icl_kv_bytes_per_fact", "gist_vs_icl_memory_ratio", "gist_decode_ms_per_token_", "icl_decode_ms_per_token_",
             "gist_vs_icl_decode_speedup"),
    "scale": ("base_decode_ms_per_token", "gist_vs_base_decode_ratio_", "gist_append_ms_per_fact_empty",
              "gist_append_ms_per_fact_at_"),
    "rag": ("rag_query_ms_",),
    "ingest": ("ingest_facts_per_second",),
    "startup": ("startup_seconds_",),
    "memory": ("peak_rss_mb",),
}


def missing_figures(figures: dict, sections) -> list[str]:
    """The expected figures of the sections that ran which are absent or not numbers."""
    missing = []
    for section in sections:
        for name in EXPECTED.get(section, ()):
            found = [v for k, v in figures.items() if k == name or (name.endswith("_") and k.startswith(name))]
            if not found or not all(isinstance(v, (int, float)) for v in found):
                missing.append(name.rstrip("_") + ("_N" if name.endswith("_") else ""))
    return missing
