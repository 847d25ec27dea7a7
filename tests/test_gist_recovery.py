"""The gist route survives failures: facts queued with pending gist rows are compressed by the next open of the
pool (each ending with exactly one applied gist edit), and a pool file with a bad header is a clear error."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select

from agent.cli import main
from editors.gist_state import GistState, has_gist_work, has_pending_gist
from editors.incomes import GistAddon, GistConfig, GistPool
from editors.incomes.memory import GistMemory
from editors.incomes.pool import META_KEY
from editors.model import tiny_llama, tiny_tokenizer
from memory.errors import ConfigError, StoreError
from memory.facts import FactInput
from memory.models import Edit

ANN = FactInput(prompt="Ann lives in", target="Oslo", subject="Ann", relation="lives in")
BOB = FactInput(text="Bob's dog is called Rex.", scope="user", user_id="bob")


def gist_edits(store, fact_id: int) -> list[tuple[int, str]]:
    """(edit id, status) of a fact's gist edits, oldest first."""
    with store.transaction() as s:
        return [tuple(r) for r in s.execute(select(Edit.id, Edit.status).where(
            Edit.fact_id == fact_id, Edit.backend == "gist").order_by(Edit.id))]


@pytest.fixture
def tiny():
    """A tiny model, its tokenizer and a fresh add-on; `state(store)` opens a GistState on them."""
    model, tok = tiny_llama(), tiny_tokenizer()
    addon = GistAddon.for_model(model, GistConfig())
    opened: list[GistState] = []

    def state(store) -> GistState:
        for old in opened:  # one add-on attaches to a model once
            old.memory.close()
        opened[:] = [GistState(store, GistMemory(model, tok, addon))]
        return opened[0]

    yield state
    for old in opened:
        old.memory.close()


def test_facts_queued_before_a_failed_addon_load_are_compressed_by_the_next_open(store, tiny):
    ids = store.add_facts([ANN, BOB], pending_backend="gist").new_ids
    # the add-on load failed here: the facts are stored, queued, and in no pool
    pending = {i: gist_edits(store, i) for i in ids}
    assert all(rows == [(rows[0][0], "pending")] for rows in pending.values())
    assert has_pending_gist(store) and has_gist_work(store)
    state = tiny(store)
    assert state.open() == 2 and set(state.memory.pool.fact_ids) == set(ids)
    for i in ids:  # the pending row itself became the applied one: no second row
        assert gist_edits(store, i) == [(pending[i][0][0], "applied")]
    assert state.work.added == ids and state.memory.pool.scope_of(ids[1]) == "bob"
    assert not has_pending_gist(store) and has_gist_work(store)
    assert [e.kind for e in store.history(ids[0])].count("applied") == 1
    again = tiny(store)
    assert again.open() == 2 and again.work.added == []  # nothing left to do
    assert all(len(gist_edits(store, i)) == 1 for i in ids)


def test_pending_rows_of_facts_no_longer_active_are_closed_with_the_reason(store, tiny):
    old, other = store.add_facts([ANN, BOB], pending_backend="gist").new_ids
    new = store.add_facts([FactInput(prompt="Ann lives in", target="Rome", subject="Ann", relation="lives in")],
                          pending_backend="gist").new_ids[0]
    store.delete_fact(other)
    state = tiny(store)
    assert state.open() == 1 and state.memory.pool.fact_ids == (new,)
    assert gist_edits(store, new)[0][1] == "applied"
    for fid, why in ((old, "superseded"), (other, "deleted")):
        assert [status for _, status in gist_edits(store, fid)] == ["rolled_back"]
        assert f"is {why}" in store.history(fid)[-1].detail["reason"]
    assert sorted(state.work.closed) == sorted([old, other]) and not has_pending_gist(store)


def test_add_drains_the_queue_and_records_a_given_fact_once(store, tiny):
    state = tiny(store)
    assert state.open() == 0 and not has_gist_work(store)
    queued = store.add_facts([ANN], pending_backend="gist").new_ids[0]
    given = store.add_facts([BOB]).new_ids[0]  # stored without a queue row, compressed by the caller
    assert state.add([store.get_fact(queued), store.get_fact(given), store.get_fact(given)]) > 0
    assert [s for _, s in gist_edits(store, queued)] == ["applied"]
    assert [s for _, s in gist_edits(store, given)] == ["applied"]
    assert state.add([store.get_fact(queued)]) == 0.0 and len(gist_edits(store, queued)) == 1


def test_a_crash_between_the_pool_write_and_the_commit_leaves_the_facts_queued(store, tiny, monkeypatch):
    ids = store.add_facts([ANN, BOB], pending_backend="gist").new_ids
    state = tiny(store)

    def crash(*_):
        raise StoreError("the database went away")

    monkeypatch.setattr(state, "_record", crash)
    with pytest.raises(StoreError):
        state.open()
    assert len(state.memory) == 0  # not recorded, so not served
    assert set(state.segments.load().fact_ids) == set(ids)  # but the segment was written first
    assert all([s for _, s in gist_edits(store, i)] == ["pending"] for i in ids)
    monkeypatch.undo()
    again = tiny(store)
    assert again.open() == 2  # the stray rows are dropped and the queued facts compressed again
    assert all([s for _, s in gist_edits(store, i)] == ["applied"] for i in ids)


def test_a_reasserted_fact_still_in_the_pool_keeps_its_one_applied_edit(store, tiny):
    ann = store.add_facts([ANN], pending_backend="gist").new_ids[0]
    tiny(store).open()
    store.add_facts([FactInput(prompt="Ann lives in", target="Rome", subject="Ann", relation="lives in")])
    back = store.add_facts([ANN], pending_backend="gist")  # Ann is active again, queued again
    assert ann in back.new_ids and store.get_fact(ann).status == "active"
    state = tiny(store)
    assert state.open() == 1 and ann in state.memory.pool
    statuses = [s for _, s in gist_edits(store, ann)]
    assert statuses.count("applied") == 1 and "pending" not in statuses  # a queue row, if any, is closed


def test_a_second_pending_row_of_a_fact_is_closed_not_compressed_twice(store, tiny):
    ann, bob = store.add_facts([ANN, BOB], pending_backend="gist").new_ids
    tiny(store).open()
    with store.transaction() as s:  # e.g. queued again by a writer that raced the first open
        s.add_all([Edit(fact_id=ann, backend="gist", status="pending"),
                   Edit(fact_id=bob, backend="gist", status="pending")])
    store.delete_fact(bob)  # bob: still in the pool (stale) and no longer active
    state = tiny(store)
    assert state.open() == 2 and state.work.added == [] and sorted(state.work.closed) == [ann, bob]
    assert [s for _, s in gist_edits(store, ann)] == ["applied", "rolled_back"]
    assert "already in the gist pool" in store.history(ann)[-1].detail["reason"]
    assert state.stale() == [bob]  # the stale row is the caller's to remove, as before


# -- pool files with a bad header ---------------------------------------------------------------------

def pool_file(tmp_path, **changes) -> str:
    """A valid one-row pool file, its header changed by `changes` (a value of ... deletes the key)."""
    model = tiny_llama()
    addon = GistAddon.for_model(model, GistConfig())
    pool = GistPool.for_addon(addon)
    L, heads, dim = len(addon.layer_ids), addon.pool_heads, addon.dims.head_dim
    from editors.incomes.compress import CompressedGists

    pool.append([7], CompressedGists(addon.layer_ids, torch.ones(L, 1, heads, dim), torch.ones(L, 1, heads, dim)))
    path = pool.save(tmp_path / "pool.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[META_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is ...:
            del meta[key]
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return str(path)


def test_a_valid_crafted_pool_loads(tmp_path):
    assert GistPool.load(pool_file(tmp_path)).fact_ids == (7,)
    assert GistPool.load(pool_file(tmp_path, dtype="bfloat16")).dtype == torch.bfloat16


@pytest.mark.parametrize("key", ["fact_ids", "layers", "scopes", "dtype", "n_kv_heads", "head_dim", "format"])
def test_a_missing_header_key_is_named(tmp_path, key):
    path = pool_file(tmp_path, **{key: ...})
    with pytest.raises(ConfigError, match=re.escape(f"gist pool {path} is missing '{key}'")):
        GistPool.load(path)


@pytest.mark.parametrize("dtype", ["int64", "Tensor", "load", "float64", 5, None])
def test_only_the_dtypes_a_pool_is_written_in_are_read(tmp_path, dtype):
    path = pool_file(tmp_path, dtype=dtype)
    with pytest.raises(ConfigError, match=re.escape(f"gist pool {path} has dtype {dtype!r}")):
        GistPool.load(path)


@pytest.mark.parametrize("changes, message", [
    ({"layers": "abc"}, "'layers'"), ({"layers": [1.5]}, "'layers'"), ({"n_kv_heads": "2"}, "'n_kv_heads'"),
    ({"head_dim": 0}, "'head_dim'"), ({"fact_ids": {"7": 1}}, "'fact_ids'"), ({"scopes": None}, "'scopes'"),
    ({"anchors": "x"}, "'anchors'"), ({"tag": 3}, "'tag'"), ({"format": 9}, "format 9"),
    ({"fact_ids": [7, 8]}, "malformed"), ({"scopes": [None, None]}, "malformed"), ({"fact_ids": [[7]]}, "malformed"),
    ({"anchors": [[["a"]]]}, "malformed"), ({"anchors": [5]}, "malformed"), ({"head_dim": 3}, "malformed"),
])
def test_a_malformed_header_is_a_config_error_naming_the_file(tmp_path, changes, message):
    path = pool_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as caught:
        GistPool.load(path)
    assert path in str(caught.value)


@pytest.mark.parametrize("header", ["{not json", "[1, 2]", None])
def test_a_header_that_is_not_a_pool_header_is_a_config_error(tmp_path, header):
    path = tmp_path / "pool.safetensors"
    save_file({"keys": torch.zeros(1), "values": torch.zeros(1)}, str(path),
              metadata={META_KEY: header} if header is not None else {"other": "x"})
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        GistPool.load(path)


# -- the command line ---------------------------------------------------------------------------------

def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_contexts_is_one_option_checked_before_anything_loads(tmp_path, capsys, monkeypatch):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of Japan is", "target": "Nairobi"}) + "\n")
    for bad in (["--contexts", "gpt"], ["--contexts"], ["--generator", "local"]):
        with pytest.raises(SystemExit) as caught:
            main(["ingest", str(path), "--db", db, *bad])
        assert caught.value.code == 2
    assert not (tmp_path / "s.sqlite").exists()  # refused before the store was even opened

    def no_model(_args):
        raise AssertionError("template contexts load no model")

    monkeypatch.setattr("agent.commands.facts.load", no_model)
    code, out, _ = run(capsys, "ingest", str(path), "--db", db, "--contexts", "template", "--json")
    assert code == 0 and json.loads(out)["contexts"]["facts"] == 1
    code, out, _ = run(capsys, "contexts", "1", "--db", db, "--json")
    assert code == 0 and {c["generator"] for c in json.loads(out)["contexts"]} == {"template"}


def test_a_missing_gist_addon_directory_is_refused_before_anything_is_stored(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of Japan is", "target": "Nairobi"}) + "\n")
    code, _, err = run(capsys, "ingest", str(path), "--db", db, "--route", "gist", "--gist-addon", str(tmp_path / "no"))
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "s.sqlite").exists()


def test_status_reports_the_recorded_model_and_no_device(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of Japan is", "target": "Nairobi"}) + "\n")
    assert run(capsys, "ingest", str(path), "--db", db)[0] == 0
    code, out, _ = run(capsys, "status", "--db", db)
    assert code == 0 and "model    none recorded" in out and " on " not in out.splitlines()[-1]
    code, out, _ = run(capsys, "status", "--db", db, "--json")
    status = json.loads(out)
    assert status["model"] is None and status["model_fingerprint"] is None and "device" not in status
    from memory.store import FactStore

    FactStore(db).set_meta("model", "smollm2-135m")
    FactStore(db).set_meta("model_fingerprint", "0123456789abcdef0123")
    code, out, _ = run(capsys, "status", "--db", db)
    assert "model    smollm2-135m (fingerprint 0123456789ab)" in out


@pytest.mark.slow
def test_a_rerun_after_a_failed_addon_load_compresses_the_queued_facts(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "The mother tongue of Zorblax Quent is", "target": "French",
                                "subject": "Zorblax Quent"}) + "\n")
    not_an_addon = tmp_path / "addon"
    not_an_addon.mkdir()  # it exists, so the add-on load itself fails, after the facts are stored
    code, _, err = run(capsys, "ingest", str(path), "--db", db, "--route", "gist", "--gist-addon", str(not_an_addon))
    assert code == 2 and "gist add-on" in err
    status = json.loads(run(capsys, "status", "--db", db, "--json")[1])
    assert status["facts"]["active"] == 1 and status["edits"] == {"gist": {"pending": 1}}
    assert "1 pending" in run(capsys, "status", "--db", db)[1]
    code, out, _ = run(capsys, "ingest", str(path), "--db", db, "--route", "gist", "--json")
    payload = json.loads(out)
    assert code == 0 and payload["duplicates"] == 1 and payload["stored"] == 0
    assert payload["gist"]["added"] == 1 and payload["gist"]["pool"] == 1
    status = json.loads(run(capsys, "status", "--db", db, "--json")[1])
    assert status["edits"] == {"gist": {"applied": 1}} and status["gist_pool"] == 1
