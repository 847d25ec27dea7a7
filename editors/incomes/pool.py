"""GistPool: the growing store of compressed facts, on the model's device, with scoped views.

Rows are kept in blocks of rows (editors/incomes/blocks.py), so appending a fact writes its row and never
touches, copies or recomputes the others. Removing a fact removes exactly
its row (the rows after it shift up; order is kept). Each row has a scope: None = global (visible to
every chat) or a user_id (visible only to that user's chats); `view(user_id)` is global + that user's.

A row may also carry **anchors**: token-id sequences (its subject, as the tokenizer writes it). A row with
anchors is visible to a query only when the query's tokens contain one of them (the mention gate, see
GistMemory); a row without anchors is visible to every query. A row may carry a **relation** too: the text of what it
answers ("Which family does Epaspidoceras belong to?"), for the relation gate (editors/incomes/relation_gate),
and **answers**: the token-id sequences of its answer, for the answer copy (editors/incomes/answer_copy).

On disk a pool is one safetensors file: the tensors plus, in its header metadata, the JSON of fact
ids, scopes, anchors, relations, answers and shapes. One file written whole by memory.atomic (temp name, fsync, rename): a crash
leaves the old pool or the new one, never a mix of tensors and ids.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editors.incomes.anchor_index import AnchorIndex
from editors.incomes.blocks import RowBlocks, Snapshot
from memory.atomic import atomic_write
from memory.errors import ConfigError, NotFoundError, ValidationError

log = logging.getLogger(__name__)

POOL_FORMAT = 1
META_KEY = "engram_gist_pool"
# The dtypes save() writes; a header naming anything else is refused, never looked up on `torch`.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REQUIRED = ("format", "layers", "n_kv_heads", "head_dim", "dtype", "fact_ids", "scopes")
_OPTIONAL_LISTS = ("anchors", "relations", "answers")  # pools written before them lack them


@dataclass(frozen=True)
class PoolView:
    """The rows one chat may read over the upper `layers`; `keys`/`values` [L, n, KVH, D] are put together
    only when asked for (the gathered read takes just the rows a query may read: `gather`)."""

    layers: tuple[int, ...]
    rows: Snapshot  # the pool's blocks at this version
    fact_ids: tuple
    anchors: tuple = ()  # per row: a tuple of token-id tuples, or () (always visible); empty: none anywhere
    relations: tuple = ()  # per row: the text of what it answers, or None; empty: none anywhere
    answers: tuple = ()  # per row: a tuple of token-id tuples (its answer as tokenized), or (); empty: none anywhere
    index: AnchorIndex | None = None  # the pool's anchors by fact id (shared by its views; it may hold more facts)
    pool_rows: tuple[int, ...] | None = None  # view row -> pool row; None: the same
    strings: tuple = ((), ())  # per row, its anchors and its answers as id strings (hooks.id_string)
    _parts: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.fact_ids)

    @property
    def keys(self) -> torch.Tensor:
        return self._whole()[0]

    @property
    def values(self) -> torch.Tensor:
        return self._whole()[1]

    def gather(self, layer: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, KVH, D] of view `rows` in upper layer `layer` (by position in `layers`)."""
        if self.pool_rows is not None:
            rows = [self.pool_rows[r] for r in rows]
        return self.rows.gather(rows, layer)

    def _whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "whole" not in self._parts:
            self._parts["whole"] = (self.rows.whole() if self.pool_rows is None
                                    else self.rows.gather(list(self.pool_rows)))
        return self._parts["whole"]

    def bound_parts(self) -> dict:
        """What the hooks' BoundPool takes of this view besides its tensors, worked out once per view."""
        if "anchors" not in self._parts:
            anchor_strings, answer_strings = self.strings
            anchors = list(anchor_strings) if self.anchors else []
            answers = list(answer_strings) if self.answers else []
            self._parts.update(anchors=anchors, relations=tuple(self.relations), answers=answers)
            if self.anchors and self.index is not None:
                self._parts.update(index=self.index, row_of=dict(zip(self.fact_ids, range(len(self.fact_ids)))),
                                   unanchored=[i for i, forms in enumerate(self.anchors) if not forms])
        return {k: v for k, v in self._parts.items() if k != "whole"}


class GistPool:
    def __init__(self, layers: Sequence[int], n_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, tag: str | None = None):
        self.layers = tuple(int(i) for i in layers)
        self.n_kv_heads, self.head_dim, self.tag = n_kv_heads, head_dim, tag
        self.device, self.dtype = torch.device(device), dtype
        self._rows = RowBlocks(len(self.layers), n_kv_heads, head_dim, self.device, dtype)
        self._ids: list = []
        self._scopes: list[str | None] = []
        self._relations: list[str | None] = []
        # Per row, its anchors and answers (token-id tuples, and as id strings for the hooks), made once when
        # the row arrives: a view of 100k rows then copies references instead of converting.
        self._frozen: list[_Frozen] = []
        self._row_of: dict = {}  # fact id -> row
        self._index = AnchorIndex()  # the rows' anchors by fact id, for the mention gate
        self._version = 0
        self._views: dict = {}

    @classmethod
    def for_addon(cls, addon, tag: str | None = None) -> GistPool:
        """An empty pool shaped for `addon`, on its device and dtype (the model's)."""
        w = addon.gist_embedding
        return cls(addon.layer_ids, addon.pool_heads, addon.dims.head_dim, w.device, w.dtype, tag)

    # -- contents ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, fact_id) -> bool:
        return fact_id in self._row_of

    @property
    def fact_ids(self) -> tuple:
        return tuple(self._ids)

    def scope_of(self, fact_id) -> str | None:
        return self._scopes[self._row(fact_id)]

    def answers_of(self, fact_id) -> list[list[int]]:
        return [list(form) for form in self._frozen[self._row(fact_id)].answers]

    def without_answers(self) -> set:
        """The fact ids whose rows have no answer tokens (one pass, not a row lookup per fact)."""
        return {fid for fid, row in zip(self._ids, self._frozen) if not row.answers}

    def set_answers(self, fact_id, forms: Sequence[Sequence[int]]) -> None:
        """Give a row its answer's token ids (rows of pools written before the answer copy have none)."""
        row = self._row(fact_id)
        self._frozen[row] = _freeze(self._frozen[row].anchors, _id_lists([forms], 1, "answer")[0])
        self._touch()

    def append(self, fact_ids: Sequence[Hashable], gists, scopes: str | None | Sequence[str | None] = None,
               anchors: Sequence[Sequence[Sequence[int]]] | None = None,
               relations: Sequence[str | None] | None = None,
               answers: Sequence[Sequence[Sequence[int]]] | None = None) -> None:
        """Add one row per fact. `gists` has .layers and .keys/.values [L, N, KVH, D] (CompressedGists);
        `anchors`, when given, holds per fact the token-id sequences that make it visible (empty: always);
        `relations` per fact the text of what it answers (None: no relation gate for that row); `answers` per
        fact the token-id sequences of its answer (empty: no answer copy for that row)."""
        fact_ids = list(fact_ids)
        n = len(fact_ids)
        scopes = [scopes] * n if scopes is None or isinstance(scopes, str) else list(scopes)
        anchors, answers = _id_lists(anchors, n, "anchor"), _id_lists(answers, n, "answer")
        relations = [None] * n if relations is None else [r if r and isinstance(r, str) else None for r in relations]
        if len(relations) != n:
            raise ValidationError(f"{len(relations)} relations for {n} facts")
        self._check_append(fact_ids, gists, scopes)
        if n == 0:
            return
        start = len(self._ids)
        self._rows.append(gists.keys, gists.values)  # [L, n, KVH, D]
        self._row_of.update((f, start + i) for i, f in enumerate(fact_ids))
        for fact_id, forms in zip(fact_ids, anchors):
            self._index.add(fact_id, forms)
        self._ids.extend(fact_ids)
        self._scopes.extend(scopes)
        self._relations.extend(relations)
        self._frozen.extend(_freeze(a, b) for a, b in zip(anchors, answers))
        self._touch()

    def remove(self, fact_id) -> None:
        """Remove exactly this fact's row; raises NotFoundError if it is not in the pool."""
        row = self._row(fact_id)
        self._rows.remove(row)  # its block only, as a new tensor: views already handed out stay valid
        del self._ids[row], self._scopes[row], self._relations[row], self._frozen[row]
        self._index.remove(fact_id)
        self._row_of = {f: i for i, f in enumerate(self._ids)}  # the rows after it moved up
        self._touch()

    # -- views ------------------------------------------------------------------------------------
    def view(self, user_id: str | None = None) -> PoolView:
        """Global rows plus `user_id`'s rows (only global rows when user_id is None)."""
        return self._view(("user", user_id), lambda scope: scope is None or scope == user_id)

    def view_all(self) -> PoolView:
        """Every row, whatever its scope (for maintenance and evaluation, never for a user's chat)."""
        return self._view(("all",), lambda scope: True)

    @contextmanager
    def activate(self, addon, user_id: str | None = None):
        """Forwards / generate() inside read this pool's view for `user_id` through `addon`."""
        with addon.use(self.view(user_id)):
            yield

    def bytes_per_fact(self) -> int:
        """Pool bytes one fact costs: L upper layers x (K + V) x KVH x D x element size."""
        return len(self.layers) * 2 * self.n_kv_heads * self.head_dim * self._rows.element_size()

    def rows_of(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [L, n, KVH, D] of pool rows `rows` (ascending), gathered from their blocks."""
        if not rows:
            shape = (len(self.layers), 0, self.n_kv_heads, self.head_dim)
            return torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        return self._rows.snapshot().gather(list(rows))

    def nbytes(self) -> int:
        return len(self) * self.bytes_per_fact()

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write tensors + ids/scopes (header JSON) to one safetensors file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        n = len(self)
        meta = {"format": POOL_FORMAT, "layers": list(self.layers), "n_kv_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "dtype": str(self.dtype).removeprefix("torch."), "tag": self.tag,
                "fact_ids": self._ids, "scopes": self._scopes,
                "anchors": [row.anchors for row in self._frozen], "relations": self._relations,
                "answers": [row.answers for row in self._frozen]}
        keys, values = self._rows.snapshot().whole() if n else self.rows_of([])
        tensors = {"keys": keys.contiguous().cpu(), "values": values.contiguous().cpu()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)}))
        log.debug("saved gist pool of %d facts to %s", n, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> GistPool:
        """Read a pool file; a file that is not a pool this version wrote is a ConfigError naming it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = _header(path, (f.metadata() or {}).get(META_KEY))
                keys, values = f.get_tensor("keys"), f.get_tensor("values")
        except (OSError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"cannot read gist pool {path}: {exc}") from exc
        from editors.incomes.compress import CompressedGists

        try:
            pool = cls(meta["layers"], meta["n_kv_heads"], meta["head_dim"], device, DTYPES[meta["dtype"]],
                       meta.get("tag"))
            pool.append(meta["fact_ids"], CompressedGists(pool.layers, keys, values), meta["scopes"],
                        meta.get("anchors"), meta.get("relations"), meta.get("answers"))  # older pools lack some
        except (ValidationError, TypeError, ValueError) as exc:  # rows that disagree with the header
            raise ConfigError(f"gist pool {path} is malformed: {exc}") from exc
        return pool

    # -- internals --------------------------------------------------------------------------------
    def _row(self, fact_id) -> int:
        try:
            return self._row_of[fact_id]
        except (KeyError, TypeError):
            raise NotFoundError(f"fact {fact_id!r} is not in the gist pool") from None

    def _check_append(self, fact_ids: list, gists, scopes: list) -> None:
        n = len(fact_ids)
        if tuple(gists.layers) != self.layers:
            raise ValidationError(f"gists are for layers {tuple(gists.layers)}, the pool for {self.layers}")
        shape = (len(self.layers), n, self.n_kv_heads, self.head_dim)
        if tuple(gists.keys.shape) != shape or tuple(gists.values.shape) != shape:
            raise ValidationError(f"gists have shape {tuple(gists.keys.shape)}, expected {shape}")
        if len(scopes) != n:
            raise ValidationError(f"{len(scopes)} scopes for {n} facts")
        if any(s is not None and (not isinstance(s, str) or not s) for s in scopes):
            raise ValidationError("a scope is None (global) or a non-empty user_id string")
        if any(not isinstance(f, (int, str)) or isinstance(f, bool) for f in fact_ids):
            raise ValidationError("fact ids must be ints or strings")
        if len(set(fact_ids)) != n or any(f in self._row_of for f in fact_ids):
            raise ValidationError("fact ids must be unique within the pool")

    def _touch(self) -> None:
        self._version += 1
        self._views.clear()

    def _view(self, key: tuple, visible) -> PoolView:
        cached = self._views.get(key)
        if cached is not None:
            return cached
        n = len(self._ids)
        everyone = all(scope is None for scope in self._scopes)  # C speed when most rows are global
        rows = range(n) if everyone else [i for i, scope in enumerate(self._scopes) if visible(scope)]
        if len(rows) == n:  # every row: whole-list copies of references, in C
            fact_ids, frozen, relations = tuple(self._ids), self._frozen, tuple(self._relations)
        else:
            fact_ids = tuple(self._ids[i] for i in rows)
            frozen, relations = [self._frozen[i] for i in rows], tuple(self._relations[i] for i in rows)
        anchors = tuple(f.anchors for f in frozen)
        answers = tuple(f.answers for f in frozen)
        view = PoolView(self.layers, self._rows.snapshot(), fact_ids,
                        anchors if any(anchors) else (), relations if any(relations) else (),
                        answers if any(answers) else (), self._index, None if len(rows) == n else tuple(rows),
                        strings=(tuple(f.anchor_strings for f in frozen), tuple(f.answer_strings for f in frozen)))
        self._views[key] = view
        return view


@dataclass(frozen=True)
class _Frozen:
    anchors: tuple  # of token-id tuples
    answers: tuple
    anchor_strings: tuple  # the same as id strings (hooks.id_string)
    answer_strings: tuple


def _freeze(anchors: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> _Frozen:
    from editors.incomes.hooks import id_string

    return _Frozen(tuple(tuple(a) for a in anchors), tuple(tuple(a) for a in answers),
                   tuple(id_string(a) for a in anchors), tuple(id_string(a) for a in answers))


def _id_lists(rows: Sequence[Sequence[Sequence[int]]] | None, n: int, what: str) -> list[list[list[int]]]:
    """Per fact, its non-empty token-id sequences as lists of ints ([] per fact when `rows` is None)."""
    if rows is None:
        return [[] for _ in range(n)]
    out = [[[int(t) for t in seq] for seq in row if len(seq)] for row in rows]
    if len(out) != n:
        raise ValidationError(f"{len(out)} {what} lists for {n} facts")
    return out


def _header(path: str | Path, raw: str | None) -> dict:
    """The checked header metadata of pool file `path`: every key present and of the type save() writes."""
    if raw is None:
        raise ConfigError(f"gist pool {path} has no {META_KEY!r} header (not a gist pool file)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"gist pool {path} has a malformed header: {exc}") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"gist pool {path} has a malformed header: a JSON object expected, not {type(meta).__name__}")
    for key in _REQUIRED:
        if key not in meta:
            raise ConfigError(f"gist pool {path} is missing {key!r}")
    if meta["format"] != POOL_FORMAT:
        raise ConfigError(f"gist pool {path} has format {meta['format']!r}, expected {POOL_FORMAT}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPES:
        raise ConfigError(f"gist pool {path} has dtype {meta['dtype']!r}; a pool is one of {', '.join(DTYPES)}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(meta["layers"], list) or not all(is_int(i) and i >= 0 for i in meta["layers"]):
        raise ConfigError(f"gist pool {path} has 'layers' {meta['layers']!r}, not a list of layer indices")
    for key in ("n_kv_heads", "head_dim"):
        if not is_int(meta[key]) or meta[key] < 1:
            raise ConfigError(f"gist pool {path} has {key!r} {meta[key]!r}, not a positive integer")
    for key in ("fact_ids", "scopes"):
        if not isinstance(meta[key], list):
            raise ConfigError(f"gist pool {path} has {key!r} of type {type(meta[key]).__name__}, not a list")
    for key in _OPTIONAL_LISTS:
        if meta.get(key) is not None and not isinstance(meta[key], list):
            raise ConfigError(f"gist pool {path} has {key!r} of type {type(meta[key]).__name__}, not a list")
    if meta.get("tag") is not None and not isinstance(meta["tag"], str):
        raise ConfigError(f"gist pool {path} has 'tag' {meta['tag']!r}, not a string")
    return meta
