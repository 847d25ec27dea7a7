"""Bad input gets a line, never a traceback (issue 20 §6): each crafted file costs only its bad records."""
from __future__ import annotations

import io
import json
import sys

import pytest

from agent import ingest as ingest_module
from agent.ingest import MAX_LINE_CHARS, ingest_path, ingest_stream
from memory.errors import EngramError, StoreError, ValidationError
from memory.facts import MAX_CONTEXT_LEN, MAX_CONTEXTS, MAX_LEN, parse_fact
from memory.store import AddReport

BOM = b"\xef\xbb\xbf"


def fact_line(i: int, **extra) -> str:
    return json.dumps({"prompt": f"Person {i} likes", "target": f"colour {i}", **extra})


def write(tmp_path, name: str, data: bytes | str):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def reasons(report) -> dict[int, str]:
    return {e.line: e.reason for e in report.errors}


# -- per-record failures are that record's rejection ---------------------------------------------

def test_lone_surrogate_rejects_its_line_and_keeps_the_batch(store):
    text = "\n".join([json.dumps({"prompt": "Her favourite emoji is", "target": "\U0001F600"}),
                      '{"prompt": "p", "target": "\\ud800"}',
                      fact_line(3)]) + "\n"
    report = ingest_stream(store, io.StringIO(text))
    assert (report.stored, report.rejected) == (2, 1)
    assert reasons(report) == {2: "field 'target' contains an unpaired surrogate \\ud800"}
    assert {f.target for f in store.list_facts()} == {"\U0001F600", "colour 3"}


def test_deep_nesting_and_huge_numbers_reject_only_their_line(store):
    text = "\n".join([fact_line(1), "[" * 100_000, '{"prompt": "p", "target": ' + "9" * 5000 + "}",
                      fact_line(4)]) + "\n"
    report = ingest_stream(store, io.StringIO(text))
    assert (report.stored, report.rejected) == (2, 2)
    assert reasons(report)[2] == "nested too deeply"
    assert reasons(report)[3] == f"invalid JSON (a number has more than {sys.get_int_max_str_digits()} digits)"


def test_duplicate_json_key_is_rejected(store):
    text = '{"prompt": "p", "target": "a", "target": "b"}\n' + fact_line(2) + "\n"
    report = ingest_stream(store, io.StringIO(text))
    assert (report.stored, report.rejected) == (1, 1)
    assert reasons(report) == {1: "duplicate key 'target'"}


def test_control_characters_are_rejected_by_field():
    with pytest.raises(ValidationError, match=r"field 'prompt' contains a control character \\u0000"):
        parse_fact({"prompt": "a\x00b", "target": "c"})
    for ch in "\t\x1b\x7f\x85":
        with pytest.raises(ValidationError, match="field 'target' contains a control character"):
            parse_fact({"prompt": "a", "target": f"b{ch}c"})
    with pytest.raises(ValidationError, match=r"contexts\[1\] contains a control character \\u0007"):
        parse_fact({"text": "t", "contexts": ["fine", "bell\x07"]})
    # Multi-line fields keep tabs and line breaks (CSV cells from Excel carry \r\n).
    fact = parse_fact({"text": "line one\n\tline two\r\nthree", "contexts": ["a\tb\nc"]})
    assert fact.text == "line one\n\tline two\r\nthree" and fact.contexts == ("a\tb\nc",)
    # Leading/trailing whitespace controls are stripped, as before, not rejected.
    assert parse_fact({"prompt": "a\n", "target": "b"}).prompt == "a"


def test_escaped_nul_is_rejected_not_stored(store):
    report = ingest_stream(store, io.StringIO('{"prompt": "a\\u0000b", "target": "c"}\n'))
    assert report.stored == 0 and "control character \\u0000" in reasons(report)[1]


# -- encodings: BOM, invalid UTF-8, UTF-16 ---------------------------------------------------------

def test_bom_is_stripped_from_jsonl_csv_and_stdin(store, tmp_path, monkeypatch):
    jsonl = write(tmp_path, "f.jsonl", BOM + (fact_line(1) + "\n" + fact_line(2) + "\n").encode())
    csv_file = write(tmp_path, "f.csv", BOM + b"prompt,target\r\nPerson 3 likes,colour 3\r\nPerson 4 likes,colour 4\r\n")
    assert (ingest_path(store, jsonl).stored, ingest_path(store, csv_file).stored) == (2, 2)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(BOM + (fact_line(5) + "\n").encode())))
    report = ingest_path(store, "-")
    assert (report.stored, report.rejected) == (1, 0)
    assert store.counts()["facts"]["active"] == 5


def test_invalid_utf8_mid_file_rejects_only_that_line(store, tmp_path):
    lines = [fact_line(i).encode() for i in range(1, 9)]
    lines[4] = b'{"prompt": "caf\xe9 owner is", "target": "x"}'  # Latin-1 é on line 5
    path = write(tmp_path, "f.jsonl", b"\n".join(lines) + b"\n")
    report = ingest_path(store, path, batch_size=2)
    assert (report.stored, report.rejected) == (7, 1)
    assert reasons(report) == {5: "not valid UTF-8 (byte 0xe9 at column 16)"}
    csv_path = write(tmp_path, "f.csv", b"prompt,target\nPerson 1 likes,red\ncaf\xe9,x\nPerson 2 likes,blue\n")
    report = ingest_path(store, csv_path)
    assert (report.stored, report.rejected) == (2, 1) and reasons(report)[3].startswith("not valid UTF-8")


def test_invalid_utf8_inside_a_quoted_csv_cell_rejects_that_row(store, tmp_path):
    path = write(tmp_path, "f.csv", b'text\n"first line\nbad \xff here\nlast"\nA plain fact.\n')
    report = ingest_path(store, path)
    assert (report.stored, report.rejected) == (1, 1)
    assert reasons(report) == {3: "not valid UTF-8 (byte 0xff at column 5)"}
    assert [f.text for f in store.list_facts()] == ["A plain fact."]


def test_utf16_file_is_one_clear_error(store, tmp_path):
    path = write(tmp_path, "f.jsonl", (fact_line(1) + "\n").encode("utf-16"))
    with pytest.raises(EngramError, match="UTF-16"):
        ingest_path(store, path)


# -- duplicate CSV columns, long lines, csv errors -----------------------------------------------

def test_duplicate_csv_column_is_a_file_error_and_stores_nothing(store, tmp_path):
    path = write(tmp_path, "f.csv", "prompt,target,target\nPerson 1 likes,red,blue\n")
    with pytest.raises(EngramError, match=r"duplicate column 'target' \(columns 2 and 3\)"):
        ingest_path(store, path)
    assert store.counts()["facts"]["active"] == 0


class ReadlineSpy(io.StringIO):
    """Records the longest string one readline returned: the line cap must bound it."""
    longest = 0

    def readline(self, size=-1):
        line = super().readline(size)
        self.longest = max(self.longest, len(line))
        return line


def test_overlong_line_is_skipped_without_loading_it(store):
    text = fact_line(1) + "\n" + '{"text": "' + "x" * (3 * MAX_LINE_CHARS) + '"}\n' + fact_line(3) + "\n"
    stream = ReadlineSpy(text)
    report = ingest_stream(store, stream)
    assert (report.stored, report.rejected) == (2, 1)
    assert reasons(report) == {2: f"line is longer than {MAX_LINE_CHARS:,} characters"}
    assert stream.longest <= MAX_LINE_CHARS + 2


def test_longest_valid_record_fits_under_the_line_cap(store):
    wide = "\U0001F600"  # escaped by json.dumps as a surrogate pair: 12 characters per character
    record = {key: wide * n for key, n in MAX_LEN.items()} | {"scope": "user"}
    record["contexts"] = [f"{i}" + wide * (MAX_CONTEXT_LEN - 2) for i in range(MAX_CONTEXTS)]
    line = json.dumps(record)
    assert len(line) < MAX_LINE_CHARS
    report = ingest_stream(store, io.StringIO(line + "\n"))
    assert (report.stored, report.rejected) == (1, 0), report.errors


def test_csv_cells_past_the_default_field_limit_are_rejected_by_row(store, tmp_path):
    big = "y" * 200_000  # past csv's default 131072-character field limit
    runaway = "\n".join(["z" * 1000] * 1100)  # one quoted cell over the whole line cap, across many lines
    path = write(tmp_path, "f.csv", f'prompt,target\nPerson 1 likes,red\n"{big}",x\nPerson 3 likes,green\n'
                                    f'"{runaway}",x\n')
    report = ingest_path(store, path)
    assert report.stored == 2
    assert "field 'prompt' is too long" in reasons(report)[3]
    assert any("CSV" in r for r in reasons(report).values())


# -- files that are empty, missing, a directory, unreadable --------------------------------------

def test_empty_file_and_header_only_csv_warn(store, tmp_path):
    empty = write(tmp_path, "empty.jsonl", b"")
    report = ingest_path(store, empty)
    assert report.warnings == [f"{empty} is empty: no records"]
    assert report.summary().endswith(f"warning: {empty} is empty: no records")
    header = write(tmp_path, "h.csv", "prompt,target\n")
    assert ingest_path(store, header).warnings == [f"{header} has a header but no rows"]
    blank = write(tmp_path, "b.jsonl", "\n  \n\n")
    assert ingest_path(store, blank).warnings == [f"{blank} has no records, only blank lines"]
    assert ingest_path(store, write(tmp_path, "ok.jsonl", fact_line(1) + "\n")).warnings == []


def test_directory_missing_and_unreadable_paths(store, tmp_path, monkeypatch):
    with pytest.raises(EngramError, match="is a directory; give a JSONL or CSV file"):
        ingest_path(store, str(tmp_path))
    with pytest.raises(EngramError, match="no such file"):
        ingest_path(store, str(tmp_path / "nope.jsonl"))
    path = write(tmp_path, "locked.jsonl", fact_line(1) + "\n")

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ingest_module, "open", denied, raising=False)  # chmod means nothing to root
    with pytest.raises(EngramError, match="cannot read .*locked.jsonl: permission denied"):
        ingest_path(store, path)


# -- line endings still work ----------------------------------------------------------------------

def test_crlf_jsonl_and_cr_only_csv_still_ingest(store, tmp_path):
    crlf = write(tmp_path, "f.jsonl", (fact_line(1) + "\r\n" + fact_line(2) + "\r\n").encode())
    mac = write(tmp_path, "f.csv", b"prompt,target\rPerson 3 likes,c3\rPerson 4 likes,c4\r")
    assert ingest_path(store, crlf).stored == 2
    report = ingest_path(store, mac)
    assert (report.stored, report.rejected) == (2, 0)


# -- the store side: failing batches, pending_backend, reactivated --------------------------------

class StubStore:
    """A store whose n-th batch fails, as a locked database's would."""

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on

    def add_facts(self, facts, pending_backend=None):
        self.calls += 1
        if self.calls == self.fail_on:
            raise StoreError("database is locked")
        return AddReport(stored=len(facts), new_ids=list(range(len(facts))))


def test_failed_batch_rejects_its_lines_and_later_batches_are_stored():
    text = "".join(fact_line(i) + "\n" for i in range(1, 6))
    report = ingest_stream(StubStore(fail_on=2), io.StringIO(text), batch_size=2)
    assert (report.stored, report.rejected) == (3, 2)
    assert reasons(report) == {3: "not stored: database is locked", 4: "not stored: database is locked"}


def test_pending_backend_queues_the_facts_and_reactivations_are_counted(tmp_path, store):
    from sqlalchemy import select

    from memory.models import Edit

    old, new = fact_line(1), json.dumps({"prompt": "Person 1 likes", "target": "another colour"})
    ingest_stream(store, io.StringIO(old + "\n"))
    ingest_stream(store, io.StringIO(new + "\n"))  # supersedes the old value
    report = ingest_path(store, write(tmp_path, "f.jsonl", old + "\n"), pending_backend="gist")
    assert report.reactivated == 1 and report.duplicates == 0 and report.to_json()["reactivated"] == 1
    assert report.summary() == "stored 0, reactivated 1, duplicates 0, superseded 1, rejected 0"
    with store.transaction() as s:
        rows = s.execute(select(Edit.fact_id, Edit.backend, Edit.status)).all()
    assert rows == [(report.fact_ids[0], "gist", "pending")]
