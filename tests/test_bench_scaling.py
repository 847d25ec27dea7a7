"""`engram bench --scaling` on a tiny config-built model: every curve's rows, the CSV, the plot, and where
each method stops. No speed goals here; the figures come from the bench on the default model."""
from __future__ import annotations

import csv
from types import SimpleNamespace

from editors.model import tiny_llama, tiny_tokenizer
from evaluation.bench_figures import headline, missing_figures
from evaluation.bench_scaling import CSV_FIELDS, ScalingConfig, run_scaling
from memory.embeddings import HashEmbedder

TINY = ScalingConfig(sizes=(1, 2, 40), decode_tokens=3, repeats=1, ice_edits=2, startup_sizes=(2, 4), rag_queries=3)


def test_every_curve_reaches_the_csv_and_the_plot(tmp_path):
    model = tiny_llama()  # 256 positions: 40 facts of the character-level tokenizer do not fit
    loaded = SimpleNamespace(model=model, tokenizer=tiny_tokenizer(), name="tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_scaling(loaded, TINY, tmp_path, note=lambda _: None, embedder=HashEmbedder())
    rows = out["rows"]
    by = {(r["method"], r.get("facts", r.get("edits"))): r for r in rows}
    for n in TINY.sizes:
        gist, base, rag = by[("gist", n)], by[("base", n)], by[("rag", n)]
        assert gist["ms_per_token"] > 0 and base["ms_per_token"] > 0 and gist["add_ms"] > 0
        assert gist["memory_bytes"] == n * by[("gist", 2)]["memory_bytes"] // 2 and rag["memory_bytes"] == (n + 1) * HashEmbedder().dim * 4
        assert rag["query_ms"] > 0 and rag["add_ms"] > 0
    assert by[("gist", 40)]["memory_bytes"] == 20 * by[("gist", 2)]["memory_bytes"]  # bytes grow with the rows
    assert by[("icl", 2)]["ms_per_token"] > 0 and by[("icl", 2)]["memory_bytes"] > 0
    assert "beyond the context window" in by[("icl", 40)]["note"]
    assert [r["edits"] for r in rows if r["method"] == "ice_edit"] == [1, 2]
    assert [r["edits"] for r in rows if r["method"] == "startup"] == [2, 4]
    assert all(r["seconds"] > 0 for r in rows if r["method"] in ("ice_edit", "startup"))
    assert out["usable"]["icl"] == "fits up to 2 facts; 40 do not fit the window" and "at 40 facts" in out["usable"]["gist"]
    with open(tmp_path / "scaling.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and list(table[0]) == list(CSV_FIELDS)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())  # the model is put back


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_the_schema_check_names_what_a_section_left_out():
    results = {"ingest": {"facts_per_second": 9000.0}, "rag": {"facts": 100_000, "end_to_end_p50_ms": 12.5},
               "memory": {"peak_rss_mib": 900.0}, "startup": {"edits": 1000}}
    figures = headline(results)
    assert figures["rag_query_ms_100k"] == 12.5 and figures["ingest_facts_per_second"] == 9000.0
    assert missing_figures(figures, ["ingest", "rag", "memory"]) == []
    assert missing_figures(figures, ["ingest", "startup"]) == ["startup_seconds_N"]
    assert "ice_seconds_per_edit" in missing_figures(figures, ["edits"])
