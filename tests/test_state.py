"""The live model state: deltas recorded atomically, replay after restart, rollback, failures change nothing."""
from __future__ import annotations

import os

import pytest
import torch

from editors.base import EditRequest, EditResult, finalize_delta, snapshot
from editors.model import tiny_llama
from editors.state import ModelState
from memory.errors import NotFoundError, StoreError
from tests.fakes import StubEditor, add_targets, weights


class NudgeEditor(StubEditor):
    """A deterministic stand-in editor: adds a fact-dependent nudge to two matrices."""

    name = "nudge"

    def __init__(self, model, fail_on: str | None = None, nan_on: str | None = None):
        super().__init__(model)
        self.fail_on, self.nan_on = fail_on, nan_on

    def edit(self, request: EditRequest) -> EditResult:
        before = snapshot(self.model, self.names)
        gen = torch.Generator().manual_seed(len(request.target) * 7919 + len(request.prompt))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self.names:
                params[name].add_(torch.randn(params[name].shape, generator=gen) * 1e-3)
                if request.target == self.nan_on:
                    params[name].fill_(float("nan"))
        if request.target == self.fail_on:
            raise RuntimeError("boom")
        return EditResult(steps=1, loss=0.5, seconds=0.0, delta=finalize_delta(self.model, before))


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_apply_replay_and_rollback_are_bit_exact(store):
    model = tiny_llama()
    base = weights(model)
    state = ModelState(store, model)
    ids = add_targets(store, "alpha", "beta", "gamma")
    editor = NudgeEditor(model)
    after = []
    for fact in state.pending_facts():
        assert state.apply(fact, editor, "ftm").ok
        after.append(weights(model))
    assert state.version == 3 and state.pending_facts() == []

    restarted = tiny_llama()  # a fresh process: base weights plus the recorded deltas
    assert ModelState(store, restarted).rebuild() == 3
    assert same(weights(restarted), after[-1])

    state.rollback(ids[2])  # the last edit: back to the state after the second
    assert same(weights(model), after[1])
    state.rollback(ids[0])  # a middle edit: base + delta(beta)
    expected = tiny_llama()
    ModelState(store, expected).rebuild()
    assert same(weights(model), weights(expected))
    state.rollback(ids[1])
    assert same(weights(model), base)
    assert [e.kind for e in store.history(ids[0])][-1] == "rolled_back"
    with pytest.raises(NotFoundError):
        state.rollback(ids[0])


def test_failed_edits_change_nothing_and_are_recorded(store):
    model = tiny_llama()
    base = weights(model)
    state = ModelState(store, model)
    add_targets(store, "boom", "nan")
    editor = NudgeEditor(model, fail_on="boom", nan_on="nan")
    results = [state.apply(f, editor, "ice") for f in state.pending_facts()]
    assert [r.ok for r in results] == [False, False]
    assert "boom" in results[0].error and "NaN" in results[1].error
    assert same(weights(model), base)
    assert state.version == 0
    assert store.counts()["edits"] == {"ice": {"failed": 2}}
    assert state.pending_facts() == [] and len(state.pending_facts(retry_failed=True)) == 2


def test_corrupt_delta_is_refused(store):
    model = tiny_llama()
    state = ModelState(store, model)
    add_targets(store, "alpha")
    state.apply(state.pending_facts()[0], NudgeEditor(model), "ftm")
    delta_file = next((store.data_dir / "deltas").iterdir())
    delta_file.write_bytes(delta_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StoreError, match="checksum"):
        ModelState(store, tiny_llama()).rebuild()


def test_orphan_delta_files_are_removed(store):
    model = tiny_llama()
    state = ModelState(store, model)
    (store.data_dir / "deltas").mkdir(parents=True)
    orphan = store.data_dir / "deltas" / "v000001-fact9-ice.safetensors"
    orphan.write_bytes(b"left by a crash")
    os.utime(orphan, (0, 0))  # older than the sweep's grace period (a fresh file may be a live writer's)
    state.rebuild()
    assert not orphan.exists()


def test_export_writes_a_loadable_model(store, tmp_path):
    from transformers import AutoModelForCausalLM

    from editors.model import tiny_tokenizer

    model = tiny_llama()
    state = ModelState(store, model)
    add_targets(store, "alpha")
    state.apply(state.pending_facts()[0], NudgeEditor(model), "ftm")
    out = state.export(tmp_path / "export", tiny_tokenizer())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_unedited_gives_base_weights_and_then_the_edits_back(store):
    model = tiny_llama()
    base = weights(model)
    state = ModelState(store, model)
    add_targets(store, "alpha")
    state.apply(state.pending_facts()[0], NudgeEditor(model), "ftm")
    edited = weights(model)
    with state.unedited():
        assert same(weights(model), base)
    assert same(weights(model), edited)


def test_rollback_with_editors_re_edits_the_later_facts(store):
    model = tiny_llama()
    state = ModelState(store, model)
    ids = add_targets(store, "alpha", "beta", "gamma")
    editor = NudgeEditor(model)
    for fact in state.pending_facts():
        state.apply(fact, editor, "ftm")
    version = state.rollback(ids[0], editors={"ftm": editor})
    assert version == 6  # 3 edits, the rollback, 2 re-edits
    counts = store.counts()["edits"]["ftm"]
    assert counts == {"applied": 2, "rolled_back": 3}
    # the live model equals a fresh run of the two remaining facts, in order, on the base model
    fresh_store_model = tiny_llama()
    fresh = NudgeEditor(fresh_store_model)
    from editors.base import EditRequest

    for target in ("beta", "gamma"):
        fresh.edit(EditRequest(f"Fact {target} is", target))
    assert same(weights(model), weights(fresh_store_model))
    restarted = tiny_llama()
    ModelState(store, restarted).rebuild()
    assert same(weights(restarted), weights(model))
