"""Recovery of the live model state (issue 20 §3): corrupt or missing deltas, a kill during a rollback's
re-edits, the writer lock that keeps readers from sweeping a writer's uncommitted delta, and choices
checked before the model loads. Tiny config-built models and a cheap deterministic editor throughout."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import select

from editors.base import EditRequest
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.errors import ConfigError, NotFoundError, StoreError
from memory.models import Edit
from tests.fakes import ScaleEditor, add_targets, weights


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def clean_run(*targets: str) -> dict[str, torch.Tensor]:
    """The weights of editing these facts, in order, on a fresh base model."""
    model = tiny_llama()
    editor = ScaleEditor(model)
    for target in targets:
        editor.edit(EditRequest(f"Fact {target} is", target))
    return weights(model)


def edited(store, *targets: str) -> tuple[ModelState, list[int]]:
    ids = add_targets(store, *targets)
    model = tiny_llama()
    state = ModelState(store, model)
    editor = ScaleEditor(model)
    for fact in state.pending_facts():
        assert state.apply(fact, editor, "ftm").ok
    return state, ids


def rows(store, fact_id: int) -> list[tuple[str, str]]:
    with store.transaction() as s:
        return [(e.backend, e.status) for e in s.scalars(select(Edit).where(Edit.fact_id == fact_id).order_by(Edit.id))]


def delta_file(store, fact_id: int):
    with store.transaction() as s:
        edit = s.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.status == "applied")).one()
        return store.data_dir / edit.artifact, edit.id


def corrupt(path) -> None:
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)


@pytest.fixture
def cli(store, monkeypatch):
    """Run the editing commands in-process on a tiny model: `cli(cmd, **args)` -> (rc, model)."""
    from agent.commands import common, editing

    models = []

    def fake_load(args):
        models.append(tiny_llama())
        return SimpleNamespace(model=models[-1], tokenizer=tiny_tokenizer(), name="tiny")

    monkeypatch.setattr(common, "load", fake_load)
    monkeypatch.setattr("editors.registry.make_editor", lambda method, model, tokenizer: ScaleEditor(model))

    def run(cmd: str, **kw):
        args = Namespace(**{"db": store.url, "model": "tiny", "device": "cpu", "json": False, "skip_corrupt": False, **kw})
        rc = {"edit": editing.cmd_edit, "rollback": editing.cmd_rollback}[cmd](args)
        return rc, models[-1]

    run.models = models
    return run


# -- 1. corrupt and missing deltas ----------------------------------------------------------------------
def test_rebuild_error_names_the_corrupt_delta_and_both_ways_out(store):
    _, ids = edited(store, "alpha", "beta", "gamma")
    path, edit_id = delta_file(store, ids[1])
    corrupt(path)
    model = tiny_llama()
    base = weights(model)
    with pytest.raises(StoreError) as err:
        ModelState(store, model).rebuild()
    message = str(err.value)
    for part in (f"edit {edit_id}", f"fact {ids[1]}", str(path), "checksum",
                 f"engram rollback {ids[1]}", "engram edit --skip-corrupt"):
        assert part in message, part
    assert all(torch.equal(weights(model)[k], base[k]) for k in base)  # a failed rebuild leaves the base


def test_a_missing_delta_is_treated_as_corrupt(store):
    _, ids = edited(store, "alpha", "beta")
    path, edit_id = delta_file(store, ids[0])
    path.unlink()
    with pytest.raises(StoreError, match=rf"edit {edit_id} \(fact {ids[0]}\): delta file .* is missing.*--skip-corrupt"):
        ModelState(store, tiny_llama()).rebuild()
    state = ModelState(store, tiny_llama())
    assert state.rebuild(skip_corrupt=True) == 1
    assert [b.problem for b in state.skipped] == ["missing"]
    assert rows(store, ids[0]) == [("ftm", "failed"), ("ftm", "pending")]


def test_rollback_of_the_fact_whose_delta_is_corrupt_goes_through(store, cli):
    _, ids = edited(store, "alpha", "beta", "gamma")
    corrupt(delta_file(store, ids[0])[0])
    rc, model = cli("rollback", fact_id=ids[0], replay_deltas=False)  # the advice of the error, followed
    assert rc == 0
    assert close(weights(model), clean_run("beta", "gamma"))  # later facts re-edited without alpha
    assert rows(store, ids[0]) == [("ftm", "rolled_back")]
    assert [st for _, st in rows(store, ids[1])].count("applied") == 1
    restarted = tiny_llama()
    ModelState(store, restarted).rebuild()  # the next start works again
    assert close(weights(restarted), weights(model))


def test_edit_skip_corrupt_drops_the_delta_and_edits_the_fact_again(store, cli, capsys):
    _, ids = edited(store, "alpha", "beta", "gamma")
    path, edit_id = delta_file(store, ids[1])
    corrupt(path)
    with pytest.raises(StoreError, match="--skip-corrupt"):
        cli("edit", method="ftm", limit=None, retry_failed=False)
    rc, model = cli("edit", method="ftm", limit=None, retry_failed=False, skip_corrupt=True)
    assert rc == 0
    assert f"skipped edit {edit_id} (fact {ids[1]})" in capsys.readouterr().err
    with store.transaction() as s:
        old = s.get(Edit, edit_id)
        assert (old.status, old.error) == ("failed", "delta file corrupt")
    assert rows(store, ids[1]) == [("ftm", "failed"), ("ftm", "applied")]  # the pending row was fulfilled
    assert "delta_corrupt" in [e.kind for e in store.history(ids[1])]
    restarted = tiny_llama()
    ModelState(store, restarted).rebuild()
    assert all(torch.equal(weights(restarted)[k], weights(model)[k]) for k in weights(model))


# -- 2. a kill during a rollback's re-edits ------------------------------------------------------------
def test_a_kill_during_rollback_re_edits_loses_no_fact(store):
    state, ids = edited(store, "alpha", "beta", "gamma", "delta")
    killer = ScaleEditor(state.model, kill_on_call=2)  # beta is re-edited, the kill comes during gamma
    with pytest.raises(KeyboardInterrupt):
        state.rollback(ids[0], editors={"ftm": killer})

    restarted = ModelState(store, tiny_llama())  # the next process
    restarted.rebuild()
    pending = restarted.pending_facts()
    assert [f.id for f in pending] == ids[2:]
    editor = ScaleEditor(restarted.model)
    for fact in pending:
        assert restarted.apply(fact, editor, "ftm").ok
    assert restarted.pending_facts() == []
    for fact_id in ids[1:]:
        assert [st for _, st in rows(store, fact_id)].count("applied") == 1, fact_id
    assert rows(store, ids[0]) == [("ftm", "rolled_back")]
    assert close(weights(restarted.model), clean_run("beta", "gamma", "delta"))


def test_pending_facts_follow_the_work_queue(store):
    model = tiny_llama()
    state = ModelState(store, model)
    new, gist, back, fail, queued = add_targets(store, "new", "gist", "back", "fail", "queued")
    editor = ScaleEditor(model)
    state.apply(store.get_fact(back), editor, "ice")
    state.rollback(back)  # the user rolled it back: stays out
    with store.transaction() as s:
        s.add(Edit(fact_id=gist, backend="gist", status="pending"))  # queued for the gist pool, not weights
        s.add(Edit(fact_id=fail, backend="ice", status="failed", error="x"))
        s.add(Edit(fact_id=queued, backend="ice", status="rolled_back"))
        s.add(Edit(fact_id=queued, backend="ice", status="pending"))  # e.g. reactivated: due again
    assert [f.id for f in state.pending_facts()] == [new, queued]
    assert [f.id for f in state.pending_facts(retry_failed=True)] == [new, fail, queued]
    state.apply(store.get_fact(queued), editor, "ftm")  # fulfils the pending row, with the editor used
    assert rows(store, queued) == [("ice", "rolled_back"), ("ftm", "applied")]


# -- 3. the writer lock and the orphan sweep -----------------------------------------------------------
def _orphan(store, name: str, age_s: float):
    import os
    import time

    path = store.data_dir / "deltas" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"written, not yet committed")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_reader_rebuild_never_deletes_an_uncommitted_delta(store):
    uncommitted = _orphan(store, "v000001-fact1-ice.safetensors", age_s=3600)
    ModelState(store, tiny_llama()).rebuild(sweep=False)  # `ask`, `export`
    assert uncommitted.exists()
    fresh = _orphan(store, "v000002-fact2-ice.safetensors", age_s=0)
    writer = ModelState(store, tiny_llama())
    writer.acquire_writer()
    writer.rebuild(sweep=True)
    assert not uncommitted.exists()  # a writer sweeps an old orphan ...
    assert fresh.exists()  # ... but never one inside the grace
    writer.close()


HOLDER = textwrap.dedent("""
    import sys, time
    from memory.lock import WriterLock
    WriterLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.read()
""")


def test_the_writer_lock_keeps_other_processes_out(store, cli):
    from memory.lock import WriterLock, WriterLockError

    orphan = _orphan(store, "v000001-fact1-ice.safetensors", age_s=3600)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.data_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriterLockError, match=rf"another engram process is writing to this store \(pid {holder.pid}\)"):
            WriterLock(store.data_dir).acquire()
        ModelState(store, tiny_llama()).rebuild(sweep=True)  # cannot take the lock: does not sweep
        assert orphan.exists()
        with pytest.raises(WriterLockError):  # a writer command fails before its model loads
            cli("edit", method="ftm", limit=None, retry_failed=False)
        assert cli.models == []
    finally:
        holder.communicate("")
    with WriterLock(store.data_dir) as lock:  # released when its holder exits
        assert lock.held


# -- 5. choices are checked before the model loads -----------------------------------------------------
def test_a_bad_method_or_fact_fails_before_the_model_loads(store, cli):
    with pytest.raises(ConfigError, match="unknown edit method 'nonsense'"):
        cli("edit", method="nonsense", limit=None, retry_failed=False)
    with pytest.raises(NotFoundError, match="no fact with id 99"):
        cli("rollback", fact_id=99, replay_deltas=False)
    (fact,) = add_targets(store, "x")
    with pytest.raises(NotFoundError, match="no applied weight edit"):
        cli("rollback", fact_id=fact, replay_deltas=False)
    assert cli.models == []
