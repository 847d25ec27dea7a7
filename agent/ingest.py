"""Ingestion: JSONL or CSV facts into the store, validated per record and written in batches.

A bad record is reported as `line N: reason` and every good record is still stored: a line that is not
UTF-8, too long, nested too deeply or otherwise unreadable is that line's rejection, never the file's.
Only what makes every record ambiguous (a duplicate CSV column, a UTF-16 file) fails the whole file,
before anything is stored. Each batch is one transaction, so a crash leaves every batch either fully
written or not written at all.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agent.progress import progress
from memory.errors import EngramError, ValidationError
from memory.facts import FactInput, parse_fact
from memory.store import FactStore

BATCH_SIZE = 1000
# The longest valid record is ~26,000 characters of fields and contexts (memory.facts MAX_LEN, 20 contexts
# of 1,000); JSON-escaped as surrogate pairs that is ~312,000 characters. A line past 1 Mi characters can
# only be garbage, and it is skipped in chunks instead of being read into memory.
MAX_LINE_CHARS = 1 << 20
_SKIP_CHUNK = 1 << 16
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SURROGATE = re.compile("[\ud800-\udfff]")

Record = tuple[int, object, str | None]  # (line number, decoded record, rejection reason)


@dataclass
class IngestError:
    line: int
    reason: str


@dataclass
class IngestReport:
    stored: int = 0
    reactivated: int = 0
    duplicates: int = 0
    superseded: int = 0
    rejected: int = 0
    errors: list[IngestError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the input as a whole, e.g. an empty file
    fact_ids: list[int] = field(default_factory=list)  # the store's new_ids: facts to route, in input order
    seconds: float = 0.0

    @property
    def facts_per_second(self) -> float:
        total = self.stored + self.duplicates
        return total / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        # `reactivated` only when it happened, so the usual line reads as it always has.
        revived = f", reactivated {self.reactivated}" if self.reactivated else ""
        line = (f"stored {self.stored}{revived}, duplicates {self.duplicates}, superseded {self.superseded}, "
                f"rejected {self.rejected}")
        return "\n".join([line, *(f"warning: {w}" for w in self.warnings)])

    def to_json(self) -> dict:
        return {
            "stored": self.stored, "reactivated": self.reactivated, "duplicates": self.duplicates,
            "superseded": self.superseded, "rejected": self.rejected, "errors": [asdict(e) for e in self.errors],
            "warnings": list(self.warnings), "seconds": round(self.seconds, 3),
            "facts_per_second": round(self.facts_per_second, 1),
        }


@dataclass
class StreamShape:
    """What the reader saw of the input as a whole, for the empty-input warnings."""
    lines: int = 0
    records: int = 0
    header: bool = False


def rejection_reason(exc: Exception) -> str:
    """A per-record failure as its rejection reason: whatever went wrong, it costs only this record."""
    if isinstance(exc, ValidationError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, ValueError):
        if str(exc).startswith("Exceeds the limit"):  # Python's guard against quadratic int parsing
            return f"invalid JSON (a number has more than {sys.get_int_max_str_digits()} digits)"
        return f"invalid JSON ({exc})"
    return f"cannot be read ({type(exc).__name__}: {exc})"


def _text_problem(line: str) -> str | None:
    """Surrogates in a raw line are bytes that were not UTF-8 (decoded with surrogateescape)."""
    found = _SURROGATE.search(line)
    if found is None:
        return None
    ch, column = found.group(), found.start() + 1
    if "\udc80" <= ch <= "\udcff":
        return f"not valid UTF-8 (byte 0x{ord(ch) - 0xDC00:02x} at column {column})"
    return f"contains an unpaired surrogate \\u{ord(ch):04x} at column {column}"


def _lines(stream: io.TextIOBase, shape: StreamShape) -> Iterator[tuple[int, str, str | None]]:
    """Physical lines, each read with a size limit; a bad line comes with its reason instead of its text."""
    number = 0
    while True:
        line = stream.readline(MAX_LINE_CHARS + 2)  # + 2: the cap does not count the line ending
        if not line:
            return
        number += 1
        shape.lines = number
        if number == 1 and line.startswith("\ufeff"):  # a text stream that kept its BOM
            line = line[1:]
        if len(line.rstrip("\r\n")) > MAX_LINE_CHARS:
            while line and not line.endswith(("\n", "\r")):
                line = stream.readline(_SKIP_CHUNK)
            yield number, "", f"line is longer than {MAX_LINE_CHARS:,} characters"
            continue
        problem = _text_problem(line)
        yield number, ("" if problem else line), problem


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):  # a plain dict would silently keep the last value
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValidationError(f"duplicate key '{key}'")
            seen.add(key)
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)  # one decoder: json.loads(hook=) builds one per call


def jsonl_records(stream: io.TextIOBase, shape: StreamShape) -> Iterator[Record]:
    for number, line, problem in _lines(stream, shape):
        if problem is None and not line.strip():
            continue
        shape.records += 1
        if problem is not None:
            yield number, None, problem
            continue
        try:
            # A BOM at a line's start (files joined with cat) is not JSON, and cannot change its meaning.
            yield number, _DECODER.decode(line.lstrip("\ufeff")), None
        except Exception as exc:  # noqa: BLE001 - any decoding failure is this line's rejection
            yield number, None, rejection_reason(exc)


def _csv_value(key: str, value: str):
    if key == "contexts":
        value = value.strip()
        if value.startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"field 'contexts' is not a JSON list ({exc.msg})") from exc
        return [part for part in value.split("|") if part.strip()]
    return value


def _csv_header(names: list[str]) -> list[str]:
    names = [name.strip() for name in names]
    first: dict[str, int] = {}
    for column, name in enumerate(names, start=1):
        if name and name in first:
            # Every row would be ambiguous, so this is the file's error, raised before anything is stored.
            raise EngramError(f"CSV header has a duplicate column '{name}' (columns {first[name]} and {column}); "
                              "nothing was stored")
        first.setdefault(name, column)
    return names


def _csv_records(stream: io.TextIOBase, shape: StreamShape) -> Iterator[Record]:
    bad: dict[int, str] = {}  # physical line -> reason; the reader sees a blank line in its place

    def feed() -> Iterator[str]:
        for number, line, problem in _lines(stream, shape):
            if problem is not None:
                bad[number] = problem
                yield "\n"
            else:
                yield line

    reader = csv.reader(feed())
    previous_limit = csv.field_size_limit(MAX_LINE_CHARS)  # a legal cell can pass csv's default 131,072
    try:
        names: list[str] | None = None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row, problem = None, f"CSV error ({exc})"
            else:
                problem = None
            hit = sorted(bad)  # only lines of this row: each row clears what it used
            if hit:  # a bad physical line inside this row rejects the row
                problem = problem or bad[hit[0]]
                bad.clear()
            if names is None:
                if problem is not None:
                    raise EngramError(f"the CSV header on line {reader.line_num} cannot be read: {problem}")
                if row:  # blank lines before the header are skipped
                    names = _csv_header(row)
                    shape.header = True
                continue
            if problem is None and not row:
                continue
            shape.records += 1
            number = hit[0] if hit else reader.line_num
            if problem is not None:
                yield number, None, problem
            elif len(row) > len(names):
                yield number, None, f"{len(row) - len(names)} more cell(s) than the header has columns"
            else:
                yield number, *_csv_row(names, row)
    finally:
        csv.field_size_limit(previous_limit)


def _csv_row(names: list[str], row: list[str]) -> tuple[object, str | None]:
    record: dict[str, object] = {}
    try:
        for column, (name, value) in enumerate(zip(names, row), start=1):
            if not value.strip():
                continue  # CSV cannot tell empty from absent: empty cells mean "not given".
            if not name:
                return None, f"column {column} has a value but no header name"
            record[name] = _csv_value(name, value)
    except Exception as exc:  # noqa: BLE001 - e.g. a contexts cell nested too deeply
        return None, rejection_reason(exc)
    return record, None


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "csv"):
            raise EngramError(f"unknown format {fmt!r}: use auto, jsonl or csv")
        return fmt
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def ingest_stream(store: FactStore, stream: io.TextIOBase, fmt: str = "jsonl", batch_size: int = BATCH_SIZE,
                  total_bytes: int | None = None, *, source: str = "the input",
                  pending_backend: str | None = None) -> IngestReport:
    """Ingest a text stream. Open files with `open_text` so bad bytes become per-line rejections."""
    report = IngestReport()
    start = time.perf_counter()
    shape = StreamShape()
    records = _csv_records(stream, shape) if fmt == "csv" else jsonl_records(stream, shape)
    bar = progress(total=total_bytes, unit="B", unit_scale=True, desc="ingest") if total_bytes else progress(desc="ingest", unit=" facts")
    try:
        with bar:
            _ingest_records(store, stream, records, report, batch_size, bar, total_bytes, pending_backend)
    except UnicodeDecodeError as exc:  # a caller's strict text stream; open_text never raises this
        raise EngramError(f"{source} is not UTF-8 text ({exc.reason}); batches before it are stored") from None
    except OSError as exc:  # the disk or pipe failed mid-file
        raise EngramError(f"cannot read {source}: {exc.strerror or exc}; batches before it are stored") from None
    if shape.records == 0:
        report.warnings.append(f"{source} has a header but no rows" if shape.header
                               else f"{source} has no records, only blank lines" if shape.lines
                               else f"{source} is empty: no records")
    report.errors.sort(key=lambda e: e.line)
    report.seconds = time.perf_counter() - start
    return report


def _ingest_records(store: FactStore, stream: io.TextIOBase, records: Iterator[Record], report: IngestReport,
                    batch_size: int, bar, total_bytes: int | None, pending_backend: str | None) -> None:
    batch: list[tuple[int, FactInput]] = []
    last_pos = 0
    for number, record, error in records:
        if error is None:
            try:
                fact = parse_fact(record)
                fact.content_hash  # noqa: B018 - hashing fails here, for this record, not in the batch
                batch.append((number, fact))
            except Exception as exc:  # noqa: BLE001 - any per-record failure is its rejection
                error = rejection_reason(exc)
        if error is not None:
            report.rejected += 1
            report.errors.append(IngestError(number, error))
        if len(batch) >= batch_size:
            _flush(store, batch, report, pending_backend)
            batch = []
            last_pos = _advance(bar, stream, last_pos, total_bytes, batch_size)
    _flush(store, batch, report, pending_backend)
    _advance(bar, stream, last_pos, total_bytes, len(batch))


def _advance(bar, stream, last_pos: int, total_bytes: int | None, n: int) -> int:
    if not total_bytes:
        bar.update(n)
        return last_pos
    try:
        pos = stream.buffer.tell() if hasattr(stream, "buffer") else last_pos
    except (OSError, ValueError):
        return last_pos
    bar.update(max(0, pos - last_pos))
    return pos


def _flush(store: FactStore, batch: list[tuple[int, FactInput]], report: IngestReport,
           pending_backend: str | None = None) -> None:
    if not batch:
        return
    facts = [fact for _, fact in batch]
    try:
        added = store.add_facts(facts, pending_backend=pending_backend)
    except (EngramError, SQLAlchemyError) as exc:  # e.g. a locked or full database
        # The batch's transaction rolled back: nothing of it is written, every line is named.
        report.rejected += len(batch)
        report.errors.extend(IngestError(number, f"not stored: {exc}") for number, _ in batch)
        return
    report.stored += added.stored
    report.reactivated += added.reactivated
    report.duplicates += added.duplicates
    report.superseded += added.superseded
    report.fact_ids.extend(added.new_ids)


def open_text(binary: io.BufferedIOBase, fmt: str, source: str) -> io.TextIOWrapper:
    """A text view of a byte stream: BOM dropped, bytes that are not UTF-8 kept as surrogates (per-line errors)."""
    peek = getattr(binary, "peek", None)
    head = peek(2)[:2] if peek else b""
    if head in _UTF16_BOMS:
        raise EngramError(f"{source} is UTF-16 text; save it as UTF-8 (a BOM is fine)")
    # newline="" lets csv see the line endings it needs; JSONL lines end in \n, \r\n or \r.
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape",
                            newline="" if fmt == "csv" else None)


def _open_file(path: str) -> tuple[io.BufferedReader, int | None]:
    file = Path(path)
    if file.is_dir():
        raise EngramError(f"{path} is a directory; give a JSONL or CSV file")
    try:
        binary = open(file, "rb")  # noqa: SIM115 - closed by ingest_path
    except FileNotFoundError:
        raise EngramError(f"no such file: {path}") from None
    except PermissionError:
        raise EngramError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise EngramError(f"cannot read {path}: {exc.strerror or exc}") from None
    # A pipe or device (`<(gunzip -c f.gz)`) has no size: the bar then counts facts.
    size = file.stat().st_size if file.is_file() else None
    return binary, size or None


def ingest_path(store: FactStore, path: str, fmt: str = "auto", batch_size: int = BATCH_SIZE, *,
                pending_backend: str | None = None) -> IngestReport:
    fmt = detect_format(path, fmt)
    options = {"batch_size": batch_size, "pending_backend": pending_backend}
    if path == "-":
        binary = getattr(sys.stdin, "buffer", None)
        if binary is None:  # stdin replaced by a text stream (tests, embedding)
            return ingest_stream(store, sys.stdin, fmt, source="standard input", **options)
        stream = open_text(binary, fmt, "standard input")
        try:
            return ingest_stream(store, stream, fmt, source="standard input", **options)
        finally:
            stream.detach()  # leave sys.stdin's buffer open for the caller
    binary, size = _open_file(path)
    with binary:
        return ingest_stream(store, open_text(binary, fmt, path), fmt, total_bytes=size, source=path, **options)
