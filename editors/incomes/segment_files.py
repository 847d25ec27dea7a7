"""The files of a segmented gist pool (editors/incomes/segments.py), one function per file kind, no state.

- `pool-NNNNNN.safetensors`: `keys`/`values` [L, n, KVH, D] of one segment's n rows; its header metadata holds
  only {"format", "segment", "rows"}.
- `pool-NNNNNN.jsonl`: the same header line, then one JSON line per row: fact_id, scope, anchors, relation, answers.
- `manifest.json`: {"format", "layers", "n_kv_heads", "head_dim", "dtype", "tag", "next", "segments": [{"name",
  "rows", "removed": [fact ids]}]}, `next` being the number the next segment gets.

Every reader checks what it reads and raises a ConfigError naming the file; a listed file that is gone is a
SegmentMissing (a ConfigError too), which a reader racing a compaction answers by reading the manifest again.
"""
from __future__ import annotations

import json
import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch

from editors.incomes.pool import DTYPES, GistPool
from memory.atomic import atomic_write
from memory.errors import ConfigError, ValidationError

FORMAT = 1
MANIFEST = "manifest.json"
SEGMENT_KEY = "engram_gist_segment"
SHAPE = ("layers", "n_kv_heads", "head_dim", "dtype", "tag")  # what every segment of one pool shares
EXTENSIONS = (".safetensors", ".jsonl")
_NAME = re.compile(r"pool-\d{6,}")


@dataclass
class Segment:
    """The rows of one segment as read: their metadata (sidecar lines) and keys/values [L, n, KVH, D] (CPU)."""

    meta: list[dict]
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def ids(self) -> list:
        return [m["fact_id"] for m in self.meta]


class SegmentMissing(ConfigError):
    """A file the manifest lists is gone (a compaction deleted it after a reader read the manifest)."""

    def __init__(self, path: Path):
        super().__init__(f"gist pool segment {path} is listed in its manifest but missing")


def segment_name(number: int) -> str:
    return f"pool-{number:06d}"


def new_manifest(pool: GistPool, next_number: int) -> dict:
    """An empty manifest for pools shaped (and tagged) as `pool`."""
    return {"format": FORMAT, "layers": list(pool.layers), "n_kv_heads": pool.n_kv_heads, "head_dim": pool.head_dim,
            "dtype": str(pool.dtype).removeprefix("torch."), "tag": pool.tag, "next": next_number, "segments": []}


def read_manifest(path: Path) -> dict | None:
    """The checked manifest at `path`, or None when there is none."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read gist pool manifest {path}: {exc}") from exc
    _check_manifest(path, meta)
    return meta


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest)))


def write_segment(directory: Path, name: str, pool: GistPool, rows: list[int]) -> None:
    """Write `rows` of `pool` (read-only use of its row lists) as segment `name`: tensors, then sidecar."""
    from safetensors.torch import save_file

    keys, values = pool.rows_of(rows)  # [L, n, KVH, D]
    tensors = {"keys": keys.contiguous().cpu(), "values": values.contiguous().cpu()}
    header = json.dumps({"format": FORMAT, "segment": name, "rows": len(rows)})
    atomic_write(directory / f"{name}.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={SEGMENT_KEY: header}))
    lines = [header] + [json.dumps({"fact_id": pool._ids[i], "scope": pool._scopes[i], "anchors": pool._frozen[i].anchors,
                                    "relation": pool._relations[i], "answers": pool._frozen[i].answers}) for i in rows]
    atomic_write(directory / f"{name}.jsonl", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def read_segment(directory: Path, manifest: dict, entry: dict) -> Segment:
    """One listed segment, its tensors checked against the manifest's shape and row count."""
    from safetensors import SafetensorError, safe_open

    path = directory / f"{entry['name']}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, values = f.get_tensor("keys"), f.get_tensor("values")
    except (OSError, ValueError, SafetensorError) as exc:
        if not path.exists():
            raise SegmentMissing(path) from None
        raise ConfigError(f"cannot read gist pool segment {path}: {exc}") from exc
    shape = (len(manifest["layers"]), entry["rows"], manifest["n_kv_heads"], manifest["head_dim"])
    for what, t in (("keys", keys), ("values", values)):
        if tuple(t.shape) != shape or t.dtype != DTYPES[manifest["dtype"]]:
            raise ConfigError(f"gist pool segment {path} has {what} of shape {tuple(t.shape)} ({t.dtype}); its "
                              f"manifest says {shape} ({manifest['dtype']})")
    return Segment(read_sidecar(directory, entry), keys, values)


def read_sidecar(directory: Path, entry: dict) -> list[dict]:
    """The row metadata of one listed segment (no tensors read)."""
    name, n = entry["name"], entry["rows"]
    path = directory / f"{name}.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise SegmentMissing(path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read gist pool segment {path}: {exc}") from exc
    try:
        header, meta = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"gist pool segment {path} is malformed: {exc}") from exc
    if header != {"format": FORMAT, "segment": name, "rows": n} or len(meta) != n:
        raise ConfigError(f"gist pool segment {path} has the header {header} and {len(meta)} rows; its manifest "
                          f"lists {n} rows of {name} (format {FORMAT})")
    bad = next((m for m in meta if not _row_ok(m)), None)
    if bad is not None:
        raise ConfigError(f"gist pool segment {path} has a malformed row: {str(bad)[:200]}")
    return meta


def live_rows(entries: list[dict], segments: dict[str, Segment]) -> list[tuple[str, int, Hashable]]:
    """(segment, row, fact id) of the rows no tombstone removed, in order; a fact id live in two segments (its
    row written twice, the first never recorded) is read from the later one."""
    rows = [(e["name"], i, fid) for e, removed in ((e, set(e["removed"])) for e in entries)
            for i, fid in enumerate(segments[e["name"]].ids) if fid not in removed]
    last = {fid: k for k, (_, _, fid) in enumerate(rows)}
    return [r for k, r in enumerate(rows) if last[r[2]] == k]


def append_rows(pool: GistPool, live: list[tuple[str, int, Hashable]], segments: dict[str, Segment],
                source: Path) -> None:
    """Append the `live` rows (sorted by segment) to `pool`; a ConfigError naming `source` when they disagree."""
    from editors.incomes.compress import CompressedGists

    if not live:
        return
    by_segment: dict[str, list[int]] = {}
    for name, row, _ in live:
        by_segment.setdefault(name, []).append(row)
    keys, values, meta = [], [], []
    for name, rows in by_segment.items():
        index = torch.tensor(rows, dtype=torch.long)
        keys.append(segments[name].keys.index_select(1, index))  # [L, r, KVH, D]
        values.append(segments[name].values.index_select(1, index))
        meta += [segments[name].meta[row] for row in rows]
    try:
        gists = CompressedGists(pool.layers, torch.cat(keys, 1), torch.cat(values, 1))  # [L, n, KVH, D]
        pool.append([m["fact_id"] for m in meta], gists, [m["scope"] for m in meta], [m["anchors"] for m in meta],
                    [m["relation"] for m in meta], [m["answers"] for m in meta])
    except (ValidationError, TypeError, ValueError) as exc:
        raise ConfigError(f"gist pool {source} is malformed: {exc}") from exc


def _is_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _token_lists(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, list) and all(isinstance(t, int) for t in s) for s in v)


def _row_ok(m) -> bool:
    return (isinstance(m, dict) and _is_id(m.get("fact_id")) and (m.get("scope") is None or isinstance(m["scope"], str))
            and _token_lists(m.get("anchors")) and _token_lists(m.get("answers"))
            and (m.get("relation") is None or isinstance(m["relation"], str)))


def _check_manifest(path: Path, meta) -> None:
    """A ConfigError naming `path` unless `meta` is a manifest this version writes."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"gist pool manifest {path} is malformed: {why}")

    if not isinstance(meta, dict):
        raise bad(f"a JSON object expected, not {type(meta).__name__}")
    for key in ("format", "next", "segments", *SHAPE):
        if key not in meta:
            raise bad(f"{key!r} is missing")
    if meta["format"] != FORMAT:
        raise ConfigError(f"gist pool manifest {path} has format {meta['format']!r}, expected {FORMAT}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPES:
        raise bad(f"dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    count = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    if not isinstance(meta["layers"], list) or not all(count(i, 0) for i in meta["layers"]):
        raise bad(f"'layers' {meta['layers']!r} is not a list of layer indices")
    for key in ("n_kv_heads", "head_dim", "next"):
        if not count(meta[key], 1):
            raise bad(f"{key!r} {meta[key]!r} is not a positive integer")
    if meta["tag"] is not None and not isinstance(meta["tag"], str):
        raise bad(f"'tag' {meta['tag']!r} is not a string")
    segments = meta["segments"]
    if not isinstance(segments, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and _NAME.fullmatch(e["name"])
            and count(e.get("rows"), 0) and isinstance(e.get("removed"), list) and all(map(_is_id, e["removed"]))
            for e in segments):
        raise bad("'segments' is not a list of {name: pool-NNNNNN, rows, removed: [fact ids]}")
    if len({e["name"] for e in segments}) != len(segments):
        raise bad("a segment is listed twice")
