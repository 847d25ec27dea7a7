"""Weight checkpoints: the live values of every edited tensor after the first N applied edits, so a restart
reads one checkpoint and the deltas after it, not every delta ever recorded.

A checkpoint holds the tensors themselves, not a summed delta: loading them gives the weights that replaying
those N deltas in order gives, bit for bit (a sum of float deltas would not), so the deltas after it replay
exactly as before. It names the edits it holds (their ids, in order); it is used only while those are still
the first applied edits, so a rollback of an edit inside it, or a re-edit, simply makes restart fall back to an
older checkpoint (or the base weights) and replay from there. Files are written atomically before their row;
a file without a row is never read, and one that fails its checksum is skipped with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from sqlalchemy import delete, select

from editors.deltas import sha256_of
from memory.atomic import atomic_write
from memory.models import Checkpoint, Edit
from memory.store import FactStore

log = logging.getLogger(__name__)

KIND = "weights"
EVERY = 50  # applied edits between checkpoints: a restart replays fewer than this many deltas
KEEP = 2  # checkpoints kept on disk (the older one serves when a rollback invalidates the newer)
META = "engram_edit_ids"


@dataclass
class Loaded:
    covered: int  # how many of the applied edits the checkpoint holds
    tensors: dict[str, torch.Tensor]


def write(store: FactStore, model: torch.nn.Module, names: Sequence[str], edits: Sequence[Edit], version: int) -> Path:
    """Checkpoint the live values of `names` as the weights after `edits` (the applied edits, in order)."""
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().cpu().contiguous() for n in sorted(names)}
    rel = f"checkpoints/v{version:06d}-{len(edits)}.safetensors"
    path = store.data_dir / rel
    ids = json.dumps([e.id for e in edits])
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META: ids}))
    with store.transaction() as s:
        s.add(Checkpoint(kind=KIND, path=rel, checksum=sha256_of(path), model_version=version))
    _prune(store)
    log.info("checkpointed the weights after %d edits -> %s", len(edits), path)
    return path


def latest(store: FactStore, edits: Sequence[Edit]) -> Loaded | None:
    """The newest checkpoint whose edits are the first of `edits` (the applied ones, in order), or None."""
    ids = [e.id for e in edits]
    with store.transaction() as s:
        rows = list(s.scalars(select(Checkpoint).where(Checkpoint.kind == KIND)
                              .order_by(Checkpoint.model_version.desc(), Checkpoint.id.desc())))
    for row in rows:
        path = store.data_dir / row.path
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != row.checksum:
            log.warning("weight checkpoint %s fails its checksum; replaying from an older one", path)
            continue
        held = _edit_ids(data)
        if held is None or held != ids[:len(held)] or not held:
            continue  # an edit it holds was rolled back or re-edited since
        return Loaded(len(held), load_bytes(data))
    return None


def _edit_ids(data: bytes) -> list[int] | None:
    """The edit ids in a checkpoint's header (a safetensors header is 8 bytes of length, then JSON)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        return [int(i) for i in json.loads(header["__metadata__"][META])]
    except (ValueError, KeyError, TypeError):
        return None


def _prune(store: FactStore) -> None:
    with store.transaction() as s:
        rows = list(s.scalars(select(Checkpoint).where(Checkpoint.kind == KIND)
                              .order_by(Checkpoint.model_version.desc(), Checkpoint.id.desc())))
        old = rows[KEEP:]
        if old:
            s.execute(delete(Checkpoint).where(Checkpoint.id.in_([r.id for r in old])))
    for row in old:  # after the rows are gone: a file is never read without its row
        (store.data_dir / row.path).unlink(missing_ok=True)


def restore_latest(state, edits: Sequence[Edit]) -> int:
    """Put the newest checkpoint of `edits` (the applied ones, in order) into `state`'s model, which is at
    its base weights; returns how many of the edits it holds (0: none, replay them all)."""
    loaded = latest(state.store, edits)
    if loaded is None:
        return 0
    state._remember_base(loaded.tensors)  # the base values first: the model is still at them
    params = dict(state.model.named_parameters())
    with torch.no_grad():
        for name, value in loaded.tensors.items():
            params[name].copy_(value)
    return loaded.covered


def write_if_due(state) -> None:
    """After an applied edit: checkpoint once `state.checkpoint_every` edits are past the newest one."""
    edits = state.applied_edits()
    if len(edits) - state._checkpointed < state.checkpoint_every:
        return
    try:
        write(state.store, state.model, list(state._base), edits, state.version)
        state._checkpointed = len(edits)
    except OSError as exc:  # a checkpoint only saves time: a failed one is tried again after the next edit
        log.warning("could not write a weight checkpoint: %s", exc)
