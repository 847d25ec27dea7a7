"""Ingestion: JSONL or CSV facts into the store, validated per record and written in batches.

A bad record is reported as `line N: reason` and every good record is still stored. Each batch is one
transaction, so a crash leaves every batch either fully written or not written at all.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.progress import progress
from memory.errors import EngramError, ValidationError
from memory.facts import FactInput, parse_fact
from memory.store import FactStore

BATCH_SIZE = 1000


@dataclass
class IngestError:
    line: int
    reason: str


@dataclass
class IngestReport:
    stored: int = 0
    duplicates: int = 0
    superseded: int = 0
    rejected: int = 0
    errors: list[IngestError] = field(default_factory=list)
    fact_ids: list[int] = field(default_factory=list)  # ids of newly stored facts, in input order
    seconds: float = 0.0

    @property
    def facts_per_second(self) -> float:
        total = self.stored + self.duplicates
        return total / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return f"stored {self.stored}, duplicates {self.duplicates}, superseded {self.superseded}, rejected {self.rejected}"

    def to_json(self) -> dict:
        return {
            "stored": self.stored, "duplicates": self.duplicates, "superseded": self.superseded,
            "rejected": self.rejected, "errors": [asdict(e) for e in self.errors],
            "seconds": round(self.seconds, 3), "facts_per_second": round(self.facts_per_second, 1),
        }


def _jsonl_records(stream: io.TextIOBase) -> Iterator[tuple[int, object, str | None]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON ({exc.msg} at column {exc.colno})"


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


def _csv_records(stream: io.TextIOBase) -> Iterator[tuple[int, object, str | None]]:
    reader = csv.DictReader(stream)
    if not reader.fieldnames:
        return
    for row in reader:
        number = reader.line_num
        if None in row:
            yield number, None, f"{len(row[None])} more cell(s) than the header has columns"
            continue
        try:
            # CSV cannot tell empty from absent: empty cells mean "not given".
            record = {k.strip(): _csv_value(k.strip(), v) for k, v in row.items() if v is not None and v.strip()}
            yield number, record, None
        except ValidationError as exc:
            yield number, None, str(exc)


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "csv"):
            raise EngramError(f"unknown format {fmt!r}: use auto, jsonl or csv")
        return fmt
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def ingest_stream(store: FactStore, stream: io.TextIOBase, fmt: str = "jsonl", batch_size: int = BATCH_SIZE,
                  total_bytes: int | None = None) -> IngestReport:
    report = IngestReport()
    start = time.perf_counter()
    records = _csv_records(stream) if fmt == "csv" else _jsonl_records(stream)
    batch: list[tuple[int, FactInput]] = []
    bar = progress(total=total_bytes, unit="B", unit_scale=True, desc="ingest") if total_bytes else progress(desc="ingest", unit=" facts")
    last_pos = 0
    with bar:
        for number, record, error in records:
            if error is None:
                try:
                    batch.append((number, parse_fact(record)))
                except ValidationError as exc:
                    error = str(exc)
            if error is not None:
                report.rejected += 1
                report.errors.append(IngestError(number, error))
            if len(batch) >= batch_size:
                _flush(store, batch, report)
                batch = []
                last_pos = _advance(bar, stream, last_pos, total_bytes, batch_size)
        _flush(store, batch, report)
        _advance(bar, stream, last_pos, total_bytes, len(batch))
    report.errors.sort(key=lambda e: e.line)
    report.seconds = time.perf_counter() - start
    return report


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


def _flush(store: FactStore, batch: list[tuple[int, FactInput]], report: IngestReport) -> None:
    if not batch:
        return
    try:
        added = store.add_facts([fact for _, fact in batch])
    except EngramError as exc:
        # The batch's transaction rolled back: nothing of it is written, every line is named.
        report.rejected += len(batch)
        report.errors.extend(IngestError(number, f"not stored: {exc}") for number, _ in batch)
        return
    report.stored += added.stored
    report.duplicates += added.duplicates
    report.superseded += added.superseded
    report.fact_ids.extend(added.new_ids)


def ingest_path(store: FactStore, path: str, fmt: str = "auto", batch_size: int = BATCH_SIZE) -> IngestReport:
    fmt = detect_format(path, fmt)
    if path == "-":
        return ingest_stream(store, sys.stdin, fmt, batch_size)
    file = Path(path)
    if not file.is_file():
        raise EngramError(f"no such file: {path}")
    with open(file, encoding="utf-8", newline="" if fmt == "csv" else None, errors="strict") as stream:
        try:
            return ingest_stream(store, stream, fmt, batch_size, total_bytes=file.stat().st_size)
        except UnicodeDecodeError as exc:
            raise EngramError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
