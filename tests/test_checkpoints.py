"""Weight checkpoints (editors/checkpoints.py): a restart reads the newest checkpoint and the deltas after
it, gives the weights a full replay gives bit for bit, and rollback behind a checkpoint still works."""
from __future__ import annotations

import torch
from sqlalchemy import select

from editors import checkpoints
from editors.model import tiny_llama
from editors.state import ModelState
from memory.models import Checkpoint
from tests.fakes import ScaleEditor, add_targets, weights

TARGETS = [f"t{i}" for i in range(7)]


def edited(store, every: int) -> ModelState:
    add_targets(store, *TARGETS)
    state = ModelState(store, tiny_llama(), checkpoint_every=every)
    editor = ScaleEditor(state.model)
    for fact in state.pending_facts():
        assert state.apply(fact, editor, "ftm").ok
    return state


def restarted(store, every: int = 3, reads: list | None = None) -> ModelState:
    state = ModelState(store, tiny_llama(), checkpoint_every=every)
    if reads is not None:
        original = state._read_delta
        state._read_delta = lambda edit: (reads.append(edit.id), original(edit))[1]
    state.rebuild()
    return state


def test_a_restart_reads_the_newest_checkpoint_and_only_the_deltas_after_it(store):
    live = edited(store, every=3)
    with store.transaction() as s:
        rows = list(s.scalars(select(Checkpoint).order_by(Checkpoint.id)))
    assert len(rows) == checkpoints.KEEP  # after edits 3 and 6; none older kept
    reads: list[int] = []
    again = restarted(store, reads=reads)
    assert len(reads) == 1  # edit 7 alone: 1-6 come from the checkpoint
    full = ModelState(store, tiny_llama(), checkpoint_every=0)
    full.rebuild()
    expected = weights(live.model)
    assert all(torch.equal(weights(again.model)[k], expected[k]) for k in expected)  # bit for bit
    assert all(torch.equal(weights(full.model)[k], expected[k]) for k in expected)


def test_a_rollback_behind_a_checkpoint_replays_from_an_older_one_or_the_base(store):
    live = edited(store, every=3)
    first_fact = live.applied_edits()[0].fact_id
    live.rollback(first_fact)  # inside both checkpoints: neither holds the applied edits any more
    reads: list[int] = []
    again = restarted(store, reads=reads)
    assert len(reads) == 6
    expected = weights(live.model)
    assert all(torch.equal(weights(again.model)[k], expected[k]) for k in expected)
    last_fact = live.applied_edits()[-1].fact_id
    again.rollback(last_fact)
    third = restarted(store)
    assert all(torch.equal(weights(third.model)[k], weights(again.model)[k]) for k in expected)


def test_a_corrupt_checkpoint_is_skipped_for_an_older_one(store, caplog):
    live = edited(store, every=3)
    with store.transaction() as s:
        newest = s.scalars(select(Checkpoint).order_by(Checkpoint.model_version.desc())).first()
    path = store.data_dir / newest.path
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    reads: list[int] = []
    again = restarted(store, reads=reads)
    assert len(reads) == 4 and "fails its checksum" in caplog.text  # edits 4-7 after the older checkpoint
    expected = weights(live.model)
    assert all(torch.equal(weights(again.model)[k], expected[k]) for k in expected)
