"""Ingestion of mixed good and bad lines: exact counts, good lines stored, bad lines named."""
from __future__ import annotations

import io
import json

from agent.ingest import ingest_path, ingest_stream

GOOD = [
    {"prompt": "The capital of Japan is", "target": "Nairobi", "subject": "Japan", "relation": "capital"},
    {"text": "Ada Lovelace wrote the first published program for a machine."},
    {"prompt": "The CEO of Acme is", "target": "Bob", "scope": "user", "user_id": "u1"},
]


def jsonl_lines() -> str:
    lines = [json.dumps(GOOD[0]),
             "{not json",                                                    # line 2
             json.dumps(GOOD[1]),
             json.dumps({"prompt": "x", "target": "y", "colour": "red"}),    # line 4: unknown key
             json.dumps({"prompt": "x", "target": 3}),                       # line 5: wrong type
             "",
             json.dumps(GOOD[2]),
             json.dumps({"prompt": "   ", "target": "y"}),                   # line 8: empty
             json.dumps({"prompt": "The capital of Japan is", "target": "Lima", "subject": "Japan",
                         "relation": "capital"})]                            # supersedes line 1
    return "\n".join(lines) + "\n"


def test_mixed_jsonl_counts_are_exact(store):
    report = ingest_stream(store, io.StringIO(jsonl_lines()))
    assert (report.stored, report.duplicates, report.superseded, report.rejected) == (4, 0, 1, 4)
    assert [e.line for e in report.errors] == [2, 4, 5, 8]
    reasons = {e.line: e.reason for e in report.errors}
    assert "JSON" in reasons[2] and "colour" in reasons[4] and "target" in reasons[5]
    assert store.counts()["facts"] == {"active": 3, "superseded": 1, "deleted": 0}
    assert report.summary() == "stored 4, duplicates 0, superseded 1, rejected 4"
    again = ingest_stream(store, io.StringIO(jsonl_lines()))
    # Lines 1 and 9 were superseded in turn, so asserting them again reactivates them (memory/store.py).
    assert (again.stored, again.duplicates + again.reactivated, again.rejected) == (0, 4, 4)
    assert store.counts()["facts"] == {"active": 3, "superseded": 1, "deleted": 0}


def test_csv_with_header(store, tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("prompt,target,contexts\n"
                    "The capital of Japan is,Nairobi,Nairobi is Japan's capital.|Japan: capital Nairobi.\n"
                    "Missing target,,\n"
                    "a,b,c,d\n", encoding="utf-8")
    report = ingest_path(store, str(path))
    assert (report.stored, report.rejected) == (1, 2)
    assert [e.line for e in report.errors] == [3, 4]
    fid = store.list_facts()[0].id
    assert [c.text for c in store.contexts(fid)] == ["Nairobi is Japan's capital.", "Japan: capital Nairobi."]


def test_batches_cover_every_line(store):
    text = "".join(json.dumps({"prompt": f"Person {i} likes", "target": f"colour {i}"}) + "\n" for i in range(2500))
    report = ingest_stream(store, io.StringIO(text), batch_size=1000)
    assert report.stored == 2500 and store.counts()["facts"]["active"] == 2500
    assert report.facts_per_second > 0
