"""Where the agent's facts come from: one small protocol, and JSONL sources (a tailed file, a folder of
them, standard input). The chat issue adds HTTP and chat sources behind the same protocol.

A source hands out complete lines only, in chunks, each chunk with the position the source stands at
after it. The loop stores a chunk's facts and that position in one transaction (memory.stages) and only
then moves the source on, so a kill never loses or repeats a line. A file's last line with no newline
yet is left where it is until its writer finishes it. Lines are decoded and checked by agent/ingest.py's
reader, so a bad line is rejected with its line number exactly as `engram ingest` rejects it.
"""
from __future__ import annotations

import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from agent.ingest import MAX_LINE_CHARS, StreamShape, jsonl_records, rejection_reason
from memory.errors import ConfigError
from memory.facts import FactInput, parse_fact

log = logging.getLogger(__name__)

READ_BYTES = 8 << 20  # per poll of one file: more than the longest line ingest accepts, in UTF-8
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS + 2


@dataclass(frozen=True)
class SourceLine:
    number: int
    record: object | None
    error: str | None


@dataclass
class Chunk:
    """Lines read from one source and where it stands after them (`key` None: not persisted)."""

    source: str  # the name messages use: "facts.jsonl line 7: ..."
    key: str | None
    lines: list[SourceLine]
    offset: int = 0
    line: int = 0

    def parse(self) -> tuple[list[tuple[int, FactInput]], list[tuple[int, str]]]:
        """(line, fact) for the good lines and (line, reason) for the rest."""
        good, bad = [], []
        for item in self.lines:
            error = item.error
            if error is None:
                try:
                    fact = parse_fact(item.record)
                    fact.content_hash  # noqa: B018 - a record that cannot be hashed fails here, alone
                    good.append((item.number, fact))
                except Exception as exc:  # noqa: BLE001 - any per-record failure is that line's rejection
                    error = rejection_reason(exc)
            if error is not None:
                bad.append((item.number, error))
        return good, bad


class Source(Protocol):
    """Anything that yields chunks of fact lines."""

    name: str

    def poll(self, limit: int) -> Iterator[Chunk]:
        """The new complete lines, at most `limit` per chunk; nothing when there are none yet."""
        ...

    def exhausted(self) -> bool:
        """Whether this source can never give more (standard input at its end)."""
        ...

    def leftover(self) -> list[str]:
        """Input held back for now, described for the user (a last line with no newline yet)."""
        ...


class Offsets:
    """Where each persisted source stands: loaded from the store once, moved after each commit."""

    def __init__(self, load: Callable[[str], tuple[int, int]]):
        self._load, self._at = load, {}

    def get(self, key: str) -> tuple[int, int]:
        if key not in self._at:
            self._at[key] = self._load(key)
        return self._at[key]

    def moved(self, chunk: Chunk) -> None:
        if chunk.key is not None:
            self._at[chunk.key] = (chunk.offset, chunk.line)


def _decode(data: bytes, first_line: int) -> list[SourceLine]:
    """Complete lines (bytes ending in a newline) through ingest's reader, numbered from `first_line`."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape", newline="\n")
    return [SourceLine(first_line + n - 1, record, error) for n, record, error in jsonl_records(text, StreamShape())]


@dataclass
class FileSource:
    """A JSONL file that may still grow: each poll reads the complete lines appended since the last."""

    path: Path
    offsets: Offsets
    name: str = ""
    partial: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.name = self.name or str(self.path)
        self.key = str(Path(self.path).resolve())

    def poll(self, limit: int) -> Iterator[Chunk]:
        offset, line = self.offsets.get(self.key)
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return  # moved away (rotated): nothing to read until it is back
        if size < offset:
            log.warning("%s is shorter than the %d bytes already read (truncated or replaced); reading it "
                        "again from the start", self.name, offset)
            offset, line = 0, 0
        if size == offset:
            self.partial = False
            return
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(min(size - offset, READ_BYTES))
        end = _cut(data, limit)
        if end == 0:
            if len(data) >= MAX_LINE_BYTES:  # one line longer than any valid record: skip it whole
                yield self._oversized(offset, line)
            self.partial = True
            return
        rest = data[end:]
        self.partial = bool(rest) and b"\n" not in rest and offset + len(data) == size
        complete = data[:end]
        yield Chunk(self.name, self.key, _decode(complete, line + 1), offset + end, line + complete.count(b"\n"))

    def _oversized(self, offset: int, line: int) -> Chunk:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            skipped = 0
            while block := fh.read(1 << 20):
                at = block.find(b"\n")
                if at >= 0:
                    skipped += at + 1
                    break
                skipped += len(block)
        reason = f"line is longer than {MAX_LINE_CHARS:,} characters"
        return Chunk(self.name, self.key, [SourceLine(line + 1, None, reason)], offset + skipped, line + 1)

    def exhausted(self) -> bool:
        return False

    def leftover(self) -> list[str]:
        return [f"{self.name}: its last line has no newline yet; it is read once it has one"] if self.partial else []


def _cut(data: bytes, limit: int) -> int:
    """The length of the first `limit` complete lines of `data` (0: not one complete line)."""
    end = 0
    for _ in range(limit):
        at = data.find(b"\n", end)
        if at < 0:
            break
        end = at + 1
    return end


@dataclass
class FolderSource:
    """A folder of JSONL files: every *.jsonl in it, present or added later, is tailed (in name order)."""

    path: Path
    offsets: Offsets
    name: str = ""
    files: dict[str, FileSource] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.name = self.name or str(self.path)

    def poll(self, limit: int) -> Iterator[Chunk]:
        for found in sorted(Path(self.path).glob("*.jsonl")):
            if found.name not in self.files and found.is_file():
                self.files[found.name] = FileSource(found, self.offsets, str(Path(self.name) / found.name))
        for _, source in sorted(self.files.items()):
            yield from source.poll(limit)

    def exhausted(self) -> bool:
        return False

    def leftover(self) -> list[str]:
        return [note for source in self.files.values() for note in source.leftover()]


class StdinSource:
    """Standard input, read by a thread so the loop never blocks on it. A pipe cannot be read again, so
    its position is not persisted: lines read but not yet stored when a kill lands are lost (use a file
    source where every line must survive a kill)."""

    def __init__(self, stream: BinaryIO, name: str = "standard input"):
        self.name = name
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._held: list[bytes | None] = []  # taken off the queue by wait(), not polled yet
        self._ended = False
        self._count = 0
        threading.Thread(target=self._read, args=(stream,), daemon=True, name="engram-stdin").start()

    def _read(self, stream: BinaryIO) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._lines.put(raw if raw.endswith(b"\n") else raw + b"\n")  # the last line of a closed pipe is whole
        except (OSError, ValueError) as exc:
            log.warning("stopped reading %s: %s", self.name, exc)
        finally:
            self._lines.put(None)

    def wait(self, timeout: float) -> None:
        """Block until a line arrives or input ends (for --until-idle on a pipe)."""
        if not self._ended and not self._held and self._lines.empty():
            try:
                self._held.append(self._lines.get(timeout=timeout))
            except queue.Empty:
                pass

    def poll(self, limit: int) -> Iterator[Chunk]:
        data = []
        while len(data) < limit and not self._ended:
            try:
                item = self._held.pop(0) if self._held else self._lines.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._ended = True
            else:
                data.append(item)
        if data:
            first = self._count + 1
            self._count += len(data)
            yield Chunk(self.name, None, _decode(b"".join(data), first), 0, self._count)

    def exhausted(self) -> bool:
        return self._ended

    def leftover(self) -> list[str]:
        return []


def open_sources(specs: list[str], offsets: Offsets, stdin: BinaryIO | None = None) -> list[Source]:
    """`--source` values as sources: '-' is standard input (once), a folder is tailed file by file, a file
    is tailed. A name that is none of these fails before anything is read."""
    sources: list[Source] = []
    if specs.count("-") > 1:
        raise ConfigError("--source - (standard input) can be given only once")
    for spec in specs:
        if spec == "-":
            import sys

            sources.append(StdinSource(stdin if stdin is not None else sys.stdin.buffer))
        elif Path(spec).is_dir():
            sources.append(FolderSource(Path(spec), offsets, spec))
        elif Path(spec).is_file():
            sources.append(FileSource(Path(spec), offsets, spec))
        else:
            raise ConfigError(f"--source {spec}: no such file or folder")
    if not sources:
        raise ConfigError("give at least one --source (a JSONL file, a folder of them, or - for standard input)")
    return sources
