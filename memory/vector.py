"""The FAISS index of the RAG baseline: fact statements as unit vectors, keyed by fact id (DESIGN §1.3).

Semantics (fixed here, relied on by callers):
- Scores are inner products of L2-normalised vectors, i.e. cosine similarity in [-1, 1]:
  **higher score = more similar**. Results come best first.
- One vector per fact id; adding an id that is present replaces its vector.
- Only active facts belong in the index: `sync(store)` adds missing active facts and removes superseded
  and deleted ones. `add` / `remove` change memory only; `save` (or `sync`) persists.
- Scope: `search(..., user_id=u)` returns global facts plus those owned by `u` (user and session scope);
  `user_id=None` returns global facts only. One index holds every scope and we filter after searching,
  widening the search until k hits pass or the index is exhausted, so the answer is exact. Most facts
  are global, so the first page (k · overfetch) almost always suffices; per-user indexes would multiply
  files, rebuild paths and merges for no gain in the common case.

Persistence: `store.data_dir / "rag"` holds `index.faiss` (faiss.write_index) and `index.json` (owners,
layout, a generation token, the file size), each written whole by memory.atomic (temp file, fsync, rename).
SQLite meta `rag_index` records the format version, embedder name, width, kind, count and generation.
`sync` rebuilds from SQLite whenever these disagree with the files (a crash between writes included):
a rebuild is always correct, a mismatched index is not.

Kinds, for large corpora (`VectorConfig.kind`); figures from `scripts/bench_rag.py --threads 1`, 100k × 384,
one thread of a quiet 2-core CPU:
- `flat` (default): `IndexIDMap2(IndexFlatIP)`. Exact; ~11 ms per query at 100k (a full scan), build
  0.2 s, removal exact and cheap (100 ids: 0.02 s). Query embedding adds ~18 ms anyway, so flat is
  right up to a few hundred thousand facts.
- `hnsw`: `IndexIDMap2(IndexHNSWFlat)`. ~0.8 ms approximate queries (recall set by `hnsw_ef_search`),
  but a 59 s build, and FAISS's HNSW cannot remove vectors: a removal rebuilds the graph from the
  stored vectors (as long as a build; `sync` batches all removals into one). For append-only corpora.
- `ivf`: `IndexIVFFlat` with ids and a hashtable direct map, so removal stays exact and cheap.
  ~0.2 ms queries scanning `ivf_nprobe` of `nlist` clusters (approximate). It needs k-means training,
  so it stays flat until `ivf_min_train` vectors exist, then trains on all of them (16 s at 100k);
  clusters drift as the corpus grows far beyond that, and `rebuild` retrains.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
from sqlalchemy import select

from memory.atomic import atomic_write
from memory.embeddings import Embedder, default_embedder
from memory.errors import ConfigError, StoreError

from memory.models import Fact

if TYPE_CHECKING:
    from memory.store import FactStore

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the on-disk layout or the statement text changes: forces a rebuild
META_KEY = "rag_index"
KINDS = ("flat", "hnsw", "ivf")


# A batch this small is searched on one OpenMP thread: FAISS's threads, started beside torch's in the same
# process, made one query at 100k facts 2.3x slower (37 ms end to end against 15-18 ms on 2 CPUs,
# `engram bench --sections rag`). The results are the same.
FEW_QUERIES = 8


@contextmanager
def _omp_threads(n: int | None):
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass(frozen=True)
class VectorConfig:
    kind: str = "flat"  # flat | hnsw | ivf (see the module docstring)
    hnsw_m: int = 32  # graph degree: more = better recall, more memory, slower build
    hnsw_ef_search: int = 64  # candidates per query: more = better recall, slower query
    hnsw_ef_construction: int = 40
    ivf_nlist: int | None = None  # None: 4·sqrt(n) at training time, at most n / 39
    ivf_nprobe: int = 16
    ivf_min_train: int = 20_000  # below this a flat index is exact and fast anyway
    overfetch: int = 4  # first page for a scoped search: k · overfetch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"vector index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction", "ivf_nprobe", "overfetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_min_train < 39 or (self.ivf_nlist is not None and self.ivf_nlist < 1):
            raise ConfigError("ivf_min_train must be >= 39 and ivf_nlist >= 1")


@dataclass
class SyncReport:
    added: int = 0
    removed: int = 0
    rebuilt: bool = False
    reason: str | None = None  # why it was rebuilt
    total: int = 0


def fact_owner(fact: Fact) -> str | None:
    """The user a fact belongs to for search, or None for a global fact."""
    return None if fact.scope == "global" else fact.user_id


def _active_ids(store: FactStore) -> set[int]:
    """Ids of the active facts, without loading whole rows (a sync at 100k facts stays cheap)."""
    with store.transaction() as s:
        return set(s.scalars(select(Fact.id).where(Fact.status == "active")))


def _facts_by_id(store: FactStore, ids: Sequence[int], chunk: int = 500) -> list[Fact]:
    facts: list[Fact] = []
    with store.transaction() as s:
        for start in range(0, len(ids), chunk):  # chunks stay under SQLite's bound-parameter limit
            facts.extend(s.scalars(select(Fact).where(Fact.id.in_(ids[start:start + chunk])).order_by(Fact.id)))
    return facts


def _as_ids(ids: Iterable[int]) -> np.ndarray:
    arr = np.asarray(list(ids), dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError("fact ids must be non-negative")
    return arr


class VectorIndex:
    """Fact vectors keyed by fact id, searchable by text, persisted beside the fact store."""

    def __init__(self, embedder: Embedder | None = None, config: VectorConfig | None = None,
                 directory: Path | None = None):
        self.embedder = embedder if embedder is not None else default_embedder()
        self.config = config or VectorConfig()
        self.dim = int(self.embedder.dim)
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.RLock()  # the server searches while the agent adds
        self._reset()

    def _reset(self) -> None:
        self._index = self._new_flat() if self.config.kind != "hnsw" else self._new_hnsw()
        self._layout = "hnsw" if self.config.kind == "hnsw" else "flat"  # ivf starts flat
        self._ids: set[int] = set()
        self._owners: dict[int, str] = {}  # only scoped facts; absent = global
        self._generation: str | None = None  # of the files this memory state was loaded from / saved to

    # -- construction ---------------------------------------------------------------------------
    def _new_flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_hnsw(self) -> faiss.Index:
        inner = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.config.hnsw_ef_construction
        return faiss.IndexIDMap2(inner)

    def _new_ivf(self, vectors: np.ndarray) -> faiss.Index:
        n = len(vectors)
        nlist = self.config.ivf_nlist or int(4 * math.sqrt(n))
        nlist = max(1, min(nlist, n // 39))  # k-means wants >= 39 points per centroid
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # removal and reconstruction by id
        return index

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a flat or HNSW layout, for re-layouts (IVF never needs one)."""
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        if not len(ids):
            return ids, np.zeros((0, self.dim), dtype=np.float32)
        return ids, self._index.index.reconstruct_n(0, len(ids))  # inner positions follow the id map

    def _relayout(self, layout: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        started = time.perf_counter()
        if layout == "ivf":
            index = self._new_ivf(vectors)
        else:
            index = self._new_hnsw() if layout == "hnsw" else self._new_flat()
        if len(ids):
            index.add_with_ids(vectors, ids)
        self._index, self._layout = index, layout
        log.info("vector index laid out as %s with %d vectors in %.2f s", layout, len(ids),
                 time.perf_counter() - started)

    # -- mutation -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, fact_id: int) -> bool:
        return int(fact_id) in self._ids

    @property
    def ntotal(self) -> int:
        """How many vectors FAISS holds: always len(self), as removal is physical."""
        return int(self._index.ntotal)

    def add(self, ids: Sequence[int], texts: Sequence[str], user_ids: Sequence[str | None] | None = None) -> None:
        """Embed `texts` and store them under `ids`; `user_ids` gives each one's owner (None = global)."""
        if len(ids) != len(texts) or (user_ids is not None and len(user_ids) != len(ids)):
            raise ValueError("add needs as many ids (and user_ids) as texts")
        self.add_vectors(ids, self.embedder.embed(list(texts)), user_ids)

    def add_vectors(self, ids: Sequence[int], vectors: np.ndarray,
                    user_ids: Sequence[str | None] | None = None) -> None:
        """Store precomputed vectors (normalised here) under `ids`."""
        arr = _as_ids(ids)
        if len(set(arr.tolist())) != len(arr):
            raise ValueError("duplicate fact ids in one add")
        vectors = np.array(vectors, dtype=np.float32, order="C").reshape(len(arr), self.dim)  # a copy
        faiss.normalize_L2(vectors)  # the contract says unit vectors; do not trust every embedder
        with self._lock:
            present = [i for i in arr.tolist() if i in self._ids]
            if present:
                self.remove(present)
            grow_into_ivf = (self.config.kind == "ivf" and self._layout != "ivf"
                             and len(self._ids) + len(arr) >= self.config.ivf_min_train)
            if not grow_into_ivf:
                self._index.add_with_ids(vectors, arr)
            else:  # enough vectors to train the IVF clusters: move everything over once
                old_ids, old_vecs = self._all_vectors()
                self._relayout("ivf", np.concatenate([old_ids, arr]), np.vstack([old_vecs, vectors]))
            self._ids.update(arr.tolist())
            for fact_id, owner in zip(arr.tolist(), user_ids or [None] * len(arr)):
                if owner is not None:
                    self._owners[fact_id] = owner

    def add_facts(self, facts: Sequence[Fact]) -> None:
        """Add store rows by their statement sentence and scope."""
        self.add([f.id for f in facts], [f.statement for f in facts], [fact_owner(f) for f in facts])

    def remove(self, ids: Iterable[int]) -> int:
        """Remove these ids (absent ones are ignored); returns how many were removed."""
        with self._lock:
            arr = np.asarray([i for i in _as_ids(ids).tolist() if i in self._ids], dtype=np.int64)
            if not arr.size:
                return 0
            if self._layout == "hnsw":  # FAISS's HNSW has no removal: rebuild without them
                all_ids, vectors = self._all_vectors()
                keep = ~np.isin(all_ids, arr)
                self._relayout("hnsw", all_ids[keep], vectors[keep])
            else:
                removed = self._index.remove_ids(arr)
                if removed != arr.size:
                    raise StoreError(f"FAISS removed {removed} of {arr.size} vectors; the index is inconsistent")
            for fact_id in arr.tolist():
                self._ids.discard(fact_id)
                self._owners.pop(fact_id, None)
            return int(arr.size)

    # -- search ---------------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, user_id: str | None = None) -> list[tuple[int, float]]:
        """The k facts most similar to `query` visible to `user_id`: (fact_id, score), best first."""
        return self.search_vectors(self.embedder.embed([query]), k, user_id)[0]

    def search_vectors(self, queries: np.ndarray, k: int = 10,
                       user_id: str | None = None) -> list[list[tuple[int, float]]]:
        """Batched search by query vectors [n, dim]; same semantics as `search`."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.array(queries, dtype=np.float32, order="C").reshape(-1, self.dim)  # a copy
        faiss.normalize_L2(queries)
        with self._lock:
            total = self.ntotal
            if total == 0:
                return [[] for _ in queries]
            # Only scoped facts can be filtered out, so a store of global facts needs no over-fetch.
            fetch = min(total, k if not self._owners else k * self.config.overfetch)
            while True:
                self._tune(fetch)
                with _omp_threads(1 if len(queries) <= FEW_QUERIES else None):
                    scores, ids = self._index.search(queries, fetch)
                results = [self._visible(row, row_scores, k, user_id) for row, row_scores in zip(ids, scores)]
                if fetch >= total or all(len(r) >= k for r in results):
                    return results
                fetch = min(total, fetch * 4)  # too many were filtered: widen, until exhausted

    def _tune(self, fetch: int) -> None:
        if self._layout == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = max(self.config.hnsw_ef_search, fetch)
        elif self._layout == "ivf":
            self._index.nprobe = self.config.ivf_nprobe

    def _visible(self, ids: np.ndarray, scores: np.ndarray, k: int, user_id: str | None) -> list[tuple[int, float]]:
        """The first k hits that `user_id` may see."""
        out = []
        for fact_id, score in zip(ids.tolist(), scores.tolist()):
            if fact_id < 0:  # FAISS pads with -1 when it finds fewer than asked
                continue
            owner = self._owners.get(fact_id)
            if owner is None or owner == user_id:
                out.append((fact_id, float(score)))
                if len(out) == k:
                    break
        return out

    # -- persistence ----------------------------------------------------------------------------
    def _record(self) -> dict:
        return {"version": INDEX_VERSION, "embedder": self.embedder.name, "dim": self.dim,
                "kind": self.config.kind, "count": len(self), "generation": self._generation}

    def save(self, store: FactStore | None = None) -> Path:
        """Write the index and its JSON atomically into `directory`; record it in the store's meta."""
        if self.directory is None:
            raise StoreError("this vector index has no directory to save into")
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._generation = uuid.uuid4().hex
            index_path = self.directory / "index.faiss"
            atomic_write(index_path, lambda p: faiss.write_index(self._index, str(p)))
            sidecar = {**self._record(), "layout": self._layout, "file_bytes": index_path.stat().st_size,
                       "owners": sorted(self._owners.items())}
            atomic_write(self.directory / "index.json", lambda p: p.write_text(json.dumps(sidecar)))
            if store is not None:  # last: a crash before this leaves a mismatch, which means rebuild
                store.set_meta(META_KEY, json.dumps(self._record()))
        return index_path

    def _load(self, record: dict) -> None:
        """Load the files that `record` (from SQLite) describes; raises StoreError on any mismatch."""
        index_path, json_path = self.directory / "index.faiss", self.directory / "index.json"
        if not index_path.exists() or not json_path.exists():
            raise StoreError(f"no index file in {self.directory}")
        try:
            sidecar = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable {json_path}: {exc}") from exc
        if sidecar.get("generation") != record.get("generation"):
            raise StoreError("index files belong to another save than the store records")
        if sidecar.get("file_bytes") != index_path.stat().st_size:
            raise StoreError("index file size differs from its record (torn write?)")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise StoreError(f"FAISS cannot read {index_path}: {exc}") from exc
        if index.ntotal != record.get("count") or index.d != self.dim:
            raise StoreError(f"index holds {index.ntotal} vectors, the store records {record.get('count')}")
        if sidecar.get("layout") not in KINDS:
            raise StoreError(f"{json_path} names no index layout")
        self._index, self._layout = index, sidecar["layout"]
        if self._layout == "ivf":
            ivf, lists = faiss.extract_index_ivf(index), index.invlists
            parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                     for i in range(ivf.nlist) if lists.list_size(i)]
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        else:
            ids = faiss.vector_to_array(index.id_map)
        self._ids = set(ids.tolist())
        self._owners = {int(i): str(u) for i, u in sidecar.get("owners", [])}
        self._generation = record["generation"]

    def _stale_reason(self, record: dict | None) -> str | None:
        if record is None:
            return "the store records no index"
        mine = self._record()
        for key in ("version", "embedder", "dim", "kind"):
            if record.get(key) != mine[key]:
                return f"index {key} changed ({record.get(key)!r} -> {mine[key]!r})"
        return None

    # -- agreement with the store ---------------------------------------------------------------
    def sync(self, store: FactStore) -> SyncReport:
        """Make the index hold exactly the store's active facts, persisted; rebuild when the files are stale."""
        if self.directory is None:
            self.directory = store.data_dir / "rag"
        raw = store.get_meta(META_KEY)
        record = json.loads(raw) if raw else None
        with self._lock:
            reason = self._stale_reason(record)
            if reason is None and record.get("generation") != self._generation:
                try:
                    self._load(record)
                except StoreError as exc:
                    reason = str(exc)
            if reason is not None:  # the first build of a store is routine, a later one worth a warning
                return self.rebuild(store, reason, logging.INFO if record is None else logging.WARNING)
            active = _active_ids(store)
            removed = self.remove([i for i in self._ids if i not in active])
            missing = _facts_by_id(store, sorted(active - self._ids))
            if missing:
                self.add_facts(missing)
            if removed or missing:
                self.save(store)
            return SyncReport(added=len(missing), removed=removed, total=len(self))

    def rebuild(self, store: FactStore, reason: str = "asked for", level: int = logging.WARNING) -> SyncReport:
        """Re-embed every active fact of the store into a fresh index and save it."""
        log.log(level, "building the RAG index from the store: %s", reason)
        started = time.perf_counter()
        facts = store.list_facts(status="active")
        with self._lock:
            self._reset()
            if facts:
                self.add_facts(facts)
            if self.directory is None:
                self.directory = store.data_dir / "rag"
            self.save(store)
        log.info("RAG index rebuilt: %d facts in %.1f s", len(facts), time.perf_counter() - started)
        return SyncReport(added=len(facts), rebuilt=True, reason=reason, total=len(self))

    @classmethod
    def open(cls, store: FactStore, embedder: Embedder | None = None,
             config: VectorConfig | None = None) -> VectorIndex:
        """The store's index, loaded from `store.data_dir / "rag"` and brought up to date."""
        index = cls(embedder, config, store.data_dir / "rag")
        index.sync(store)
        return index
