"""PoolSegments: a gist pool on disk as append-only segments, so adding a fact writes its rows and no others.

A pool directory (`<data dir>/gist/pool/`) holds segments (`pool-NNNNNN.safetensors`: the keys/values of the
rows one write added; `pool-NNNNNN.jsonl` beside it: those rows' fact ids, scopes, anchors, relations,
answers), `manifest.json` (the pool's shape and add-on tag, its segments in order with their row counts and
their tombstones: the fact ids removed since each was written), and `lock`, flocked by every write, so two
writers (the agent, an ingest, a chat engine draining the queue) never interleave and each changes the
manifest it reads under the lock. editors/incomes/segment_files.py has the formats.

The pool is the segments in order minus their tombstones. `append` writes one segment and the manifest: the
new rows plus O(#segments + #tombstones), whatever the pool's size; `remove` writes the manifest only;
`rewrite` writes a whole in-memory pool as one segment (rows whose metadata changed in place); `compact`
merges everything into one segment without the removed rows.

Crash safety: every file is written under a temp name and renamed (memory.atomic); a segment is in place
before the manifest that lists it, and a file is deleted only once the manifest no longer lists it. The
manifest's rename is the commit point: a kill at any moment leaves the old pool or the new one. `recover`
(on open, under the lock) removes what an interrupted write left (files no manifest lists, temp files) and
migrates `<data dir>/gist/pool.safetensors`, the single pool file of older versions.

Readers take no lock: a reader that finds a listed segment gone (a compaction deleted it after the reader
read the manifest) reads the manifest again. `refresh` brings a pool this object loaded up to date by
reading only the new segments and applying the new tombstones.
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from editors.incomes import segment_files as files
from editors.incomes.pool import DTYPES, GistPool
from memory.atomic import remove_stale_temps
from memory.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

LOCK = "lock"
COMPACT_SEGMENTS = 64  # GistState.open compacts past this many segments ...
COMPACT_DEAD = 0.25  # ... or when more than this share of the rows on disk is tombstoned
READ_TRIES = 5  # a reader racing compactions reads the manifest again up to this often


@dataclass(frozen=True)
class Compaction:
    """What compact() did: `segments` before, `rows` kept (all in one segment after), `dropped` rows (tombstoned
    or written twice) no longer on disk, `bytes` written (0: nothing to do, compact already or no pool)."""

    segments: int
    rows: int
    dropped: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class PoolSegments:
    def __init__(self, directory: str | Path, legacy: str | Path | None = None):
        self.directory = Path(directory)
        self.manifest_path = self.directory / files.MANIFEST
        self.legacy = Path(legacy) if legacy is not None else None  # the single file older versions wrote
        self._ids: dict[str, set] = {}  # segment -> the fact ids of all its rows (a listed segment never changes)
        self._synced: tuple[dict, GistPool] | None = None  # a manifest, and the in-memory pool known to equal it
        self._sources: dict = {}  # fact id -> the segment its row in the synced pool comes from

    # -- reading ----------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.exists() or (self.legacy is not None and self.legacy.exists())

    def stamp(self) -> tuple | None:
        """Changes whenever the pool does (every write renames a new manifest into place); None: no pool."""
        for path in (self.manifest_path, self.legacy):
            try:
                info = path.stat() if path is not None else None
            except FileNotFoundError:
                continue
            if info is not None:
                return path.name, info.st_ino, info.st_mtime_ns, info.st_size
        return None

    def manifest(self) -> dict | None:
        """The checked manifest (None: there is none); a malformed one is a ConfigError naming it."""
        return files.read_manifest(self.manifest_path)

    def load(self, device: torch.device | str = "cpu") -> GistPool | None:
        """The pool the files hold (None: there is none), checked as GistPool.load checks a pool file."""
        for attempt in range(READ_TRIES):
            manifest = self.manifest()
            if manifest is None:
                return GistPool.load(self.legacy, device) if self.legacy and self.legacy.exists() else None
            try:
                segments = self._read(manifest, manifest["segments"])
            except files.SegmentMissing:
                if attempt + 1 == READ_TRIES or self.manifest() == manifest:
                    raise  # no compaction swapped the manifest meanwhile: the file is lost
                continue
            pool = GistPool(manifest["layers"], manifest["n_kv_heads"], manifest["head_dim"], device,
                            DTYPES[manifest["dtype"]], manifest["tag"])
            live = files.live_rows(manifest["segments"], segments)
            files.append_rows(pool, live, segments, self.directory)
            self._synced, self._sources = (manifest, pool), {fid: name for name, _, fid in live}
            return pool
        raise AssertionError("unreachable")

    def refresh(self, pool: GistPool | None, device: torch.device | str = "cpu") -> GistPool | None:
        """The pool as the files hold it now. When `pool` is the one this object last loaded or wrote and the
        files only grew since (new segments, new tombstones), it is brought up to date in place, reading only
        the new segments, and returned; otherwise the result of a full load()."""
        for _ in range(READ_TRIES):
            manifest = self.manifest()
            if manifest is None or self._synced is None or self._synced[1] is not pool:
                break
            old = self._synced[0]
            if manifest == old:
                return pool
            new = _grown(old, manifest)
            if new is None:
                break
            try:
                segments = self._read(manifest, new)  # all reads before any change to `pool`
            except files.SegmentMissing:
                continue
            if self._apply(pool, old, manifest, new, segments):
                return pool
            break
        return self.load(device)

    def crowded(self) -> bool:
        """Whether the pool is due a compaction: too many segments, or too many tombstoned rows."""
        manifest = self.manifest()
        if manifest is None:
            return False
        rows = sum(e["rows"] for e in manifest["segments"])
        dead = sum(len(e["removed"]) for e in manifest["segments"])
        return len(manifest["segments"]) > COMPACT_SEGMENTS or dead > COMPACT_DEAD * rows

    # -- writing ----------------------------------------------------------------------------------------
    def append(self, pool: GistPool, fact_ids: Sequence[Hashable]) -> str | None:
        """Write the rows of `fact_ids` (taken from `pool`) as one new segment, then the manifest that lists
        it; returns the segment's name (None: no rows). The pool's shape and tag must be the manifest's."""
        fact_ids = list(fact_ids)
        if not fact_ids:
            return None
        rows = _rows_of(pool, fact_ids)
        with self._locked():
            manifest = self.manifest()
            known = self._knows(pool, manifest) or (manifest is None and len(pool) == len(rows))
            shape = files.new_manifest(pool, 1)
            manifest = manifest or shape
            if any(manifest[k] != shape[k] for k in files.SHAPE):
                raise ConfigError(f"the gist pool in {self.directory} holds gists of another shape or add-on than "
                                  "the rows appended to it; rewrite it")
            name = files.segment_name(manifest["next"])
            self._write_segment(name, pool, rows)  # before the manifest that lists it
            manifest["segments"].append({"name": name, "rows": len(rows), "removed": []})
            manifest["next"] += 1
            files.write_manifest(self.manifest_path, manifest)
        if known:
            self._synced = (manifest, pool)
            if len(manifest["segments"]) == 1:  # the first segment: nothing older to remember
                self._sources = {}
            self._sources.update({fid: name for fid in fact_ids})
        else:  # another process wrote since this pool was read: only a full load knows what the files hold
            self._synced = None
        return name

    def remove(self, fact_ids: Sequence[Hashable]) -> int:
        """Tombstone every live row of `fact_ids` in the manifest (no segment is touched); returns how many.
        The caller has removed them from the pool it appends from."""
        if not fact_ids:
            return 0
        with self._locked():
            manifest = self.manifest()
            if manifest is None:
                return 0
            known, hits = self._knows(None, manifest), 0
            for entry in manifest["segments"]:
                ids, removed = self._segment_ids(entry), set(entry["removed"])
                hit = [fid for fid in dict.fromkeys(fact_ids) if fid in ids and fid not in removed]
                entry["removed"] += hit
                hits += len(hit)
                for fid in hit:
                    if self._sources.get(fid) == entry["name"]:
                        del self._sources[fid]
            if hits:
                files.write_manifest(self.manifest_path, manifest)
        if self._synced is not None:
            self._synced = (manifest, self._synced[1]) if known else None
        return hits

    def rewrite(self, pool: GistPool) -> str | None:
        """Write the whole `pool` as one fresh segment, swap the manifest, then delete the old segments."""
        with self._locked():
            manifest = self._rewrite(pool, self.manifest())
        return manifest["segments"][0]["name"] if manifest["segments"] else None

    def compact(self, pool: GistPool | None = None) -> Compaction:
        """Merge all segments into one without the tombstoned rows. `pool`: an in-memory pool to write instead
        of reading the segments back, taken only when this object knows it equals the files."""
        with self._locked():
            manifest = self.manifest()
            if manifest is None:
                return Compaction(0, 0, 0, 0)
            entries = manifest["segments"]
            total = sum(e["rows"] for e in entries)
            if len(entries) <= 1 and not any(e["removed"] for e in entries):
                return Compaction(len(entries), total, 0, 0)
            if pool is None or not self._knows(pool, manifest):
                segments = self._read(manifest, entries)  # locked: no compaction deletes one meanwhile
                pool = GistPool(manifest["layers"], manifest["n_kv_heads"], manifest["head_dim"], "cpu",
                                DTYPES[manifest["dtype"]], manifest["tag"])
                files.append_rows(pool, files.live_rows(entries, segments), segments, self.directory)
            written = self._rewrite(pool, manifest)["segments"]
            size = sum((self.directory / f"{e['name']}{ext}").stat().st_size
                       for e in written for ext in files.EXTENSIONS)
        log.info("compacted the gist pool in %s: %d segment(s) into one of %d rows", self.directory, len(entries),
                 len(pool))
        return Compaction(len(entries), len(pool), total - len(pool), size)

    def recover(self) -> int:
        """Under the lock: migrate the legacy single file, and remove the files no manifest lists (segments of an
        interrupted append or compaction) and temp files. Returns how many files were removed."""
        if not self.directory.is_dir() and not (self.legacy is not None and self.legacy.exists()):
            return 0
        with self._locked():
            manifest = self.manifest()
            removed = 0
            if self.legacy is not None:
                removed += remove_stale_temps(self.legacy)
                if self.legacy.exists():
                    if manifest is None:  # copied whole; the old file goes only once the manifest is in place
                        manifest = self._migrate()
                    self.legacy.unlink()
            return removed + self._drop_unlisted(manifest)

    # -- internals --------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, or the process dies
            yield
        finally:
            os.close(fd)

    def _knows(self, pool: GistPool | None, manifest: dict | None) -> bool:
        """Whether the synced pool (`pool`, if given) is what `manifest` holds: no other process wrote since."""
        return (self._synced is not None and manifest == self._synced[0]
                and (pool is None or self._synced[1] is pool))

    def _read(self, manifest: dict, entries: list[dict]) -> dict[str, files.Segment]:
        out = {}
        for entry in entries:
            out[entry["name"]] = segment = files.read_segment(self.directory, manifest, entry)
            self._ids[entry["name"]] = set(segment.ids)
        return out

    def _segment_ids(self, entry: dict) -> set:
        if entry["name"] not in self._ids:  # written by another process: its sidecar says (no tensors read)
            self._ids[entry["name"]] = {m["fact_id"] for m in files.read_sidecar(self.directory, entry)}
        return self._ids[entry["name"]]

    def _write_segment(self, name: str, pool: GistPool, rows: list[int]) -> None:
        files.write_segment(self.directory, name, pool, rows)
        self._ids[name] = {pool._ids[i] for i in rows}

    def _migrate(self) -> dict:
        pool = GistPool.load(self.legacy)  # a malformed old file is a ConfigError naming it, as before
        manifest = self._rewrite(pool, None)
        log.info("migrated the gist pool file %s (%d facts) to the segments in %s", self.legacy, len(pool),
                 self.directory)
        return manifest

    def _rewrite(self, pool: GistPool, old: dict | None) -> dict:
        manifest = files.new_manifest(pool, old["next"] if old else 1)
        name = files.segment_name(manifest["next"])
        if len(pool):
            self._write_segment(name, pool, list(range(len(pool))))
            manifest["segments"].append({"name": name, "rows": len(pool), "removed": []})
            manifest["next"] += 1
        files.write_manifest(self.manifest_path, manifest)  # the commit point: the old segments are unlisted
        self._drop_unlisted(manifest)
        self._synced, self._sources = (manifest, pool), {fid: name for fid in pool.fact_ids}
        return manifest

    def _drop_unlisted(self, manifest: dict | None) -> int:
        """Delete the files of the directory the manifest does not list (under the lock: no write of another
        process is under way, so each is what an interrupted write or a finished compaction left)."""
        keep = {files.MANIFEST, LOCK} | {f"{e['name']}{ext}" for e in (manifest or {}).get("segments", ())
                                         for ext in files.EXTENSIONS}
        removed = 0
        for path in self.directory.iterdir():
            if path.name not in keep and path.is_file():
                log.info("removing %s: no gist pool manifest lists it", path)
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _apply(self, pool: GistPool, old: dict, manifest: dict, new: list[dict], segments: dict) -> bool:
        """Bring `pool` (equal to `old`) to `manifest`: the new tombstones, then the new segments' rows. False
        (`pool` unchanged) when a tombstone uncovers an older row of its fact, which only a full load reads."""
        gone, known = [], manifest["segments"][:len(old["segments"])]
        for was, now in zip(old["segments"], known):
            for fid in set(now["removed"]) - set(was["removed"]):
                if self._sources.get(fid) != now["name"]:
                    continue  # a row the served pool does not hold (a later one shadows it)
                if any(e is not now and fid not in e["removed"] and fid in self._ids.get(e["name"], {fid})
                       for e in known):
                    return False
                gone.append(fid)
        live = files.live_rows(new, segments)
        moved = [fid for _, _, fid in live if fid in self._sources and fid not in gone]
        for fid in gone + moved:  # a fact in a new segment moves to its later row, as load() orders it
            pool.remove(fid)
            del self._sources[fid]
        files.append_rows(pool, live, segments, self.directory)
        self._sources.update({fid: name for name, _, fid in live})
        self._synced = (manifest, pool)
        return True


def _rows_of(pool: GistPool, fact_ids: list) -> list[int]:
    """The pool rows of `fact_ids`: the last ones in the common case (just appended), found without a scan."""
    n, size = len(fact_ids), len(pool)
    if pool._ids[size - n:] == fact_ids:
        return list(range(size - n, size))
    where = {fid: i for i, fid in enumerate(pool._ids)}
    absent = [fid for fid in fact_ids if fid not in where]
    if absent:
        raise NotFoundError(f"facts {absent} are not in the gist pool")
    return [where[fid] for fid in fact_ids]


def _grown(old: dict, manifest: dict) -> list[dict] | None:
    """The segments `manifest` adds to `old` when it only grew (same shape, same first segments with their
    tombstones kept), else None."""
    if any(old[k] != manifest[k] for k in files.SHAPE):
        return None
    was, now = old["segments"], manifest["segments"]
    if len(now) < len(was) or any(a["name"] != b["name"] or a["rows"] != b["rows"]
                                  or not set(a["removed"]) <= set(b["removed"]) for a, b in zip(was, now)):
        return None
    return now[len(was):]
