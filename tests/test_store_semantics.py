"""The store's semantics (issue 20 §2): re-asserting an old value, the pending-work queue, the model
fingerprint binding, concurrent first opens, opening without creating, and missing database drivers.
The store tests run on SQLite and PostgreSQL (tests/conftest.py: store_url)."""
from __future__ import annotations

import multiprocessing
import sys

import pytest
from sqlalchemy import select, text

from memory.errors import FingerprintMismatchError, NotFoundError, StoreError
from memory.facts import FactInput
from memory.models import Edit
from memory.store import FactStore


@pytest.fixture
def store(store_url):
    """This module's store: a fresh one on each backend."""
    return FactStore(store_url)


def capital(target: str) -> FactInput:
    return FactInput(prompt="The capital of Japan is", target=target, subject="Japan", relation="capital")


def edits_of(store: FactStore, fact_id: int) -> list[tuple[str, str]]:
    with store.transaction() as s:
        rows = s.scalars(select(Edit).where(Edit.fact_id == fact_id).order_by(Edit.id))
        return [(e.backend, e.status) for e in rows]


def add_edit(store: FactStore, fact_id: int, backend: str, status: str) -> None:
    with store.transaction() as s:
        s.add(Edit(fact_id=fact_id, backend=backend, status=status))


# -- 1. re-asserting an old value -------------------------------------------------------------------
def test_reasserting_a_superseded_value_reactivates_it(store):
    a = store.add_facts([capital("Tokyo")]).new_ids[0]
    b = store.add_facts([capital("Kyoto")]).new_ids[0]
    again = store.add_facts([capital("Tokyo")])
    assert (again.stored, again.duplicates, again.reactivated, again.superseded) == (0, 0, 1, 1)
    assert again.new_ids == [a] and again.fact_ids == [a]
    row_a, row_b = store.get_fact(a), store.get_fact(b)
    assert (row_a.status, row_a.superseded_by) == ("active", None)
    assert (row_b.status, row_b.superseded_by) == ("superseded", a)
    assert [f.id for f in store.list_facts()] == [a]
    history = store.history(a)
    assert [e.kind for e in history] == ["ingested", "superseded", "reactivated"]
    assert history[-1].detail == {"previous": "superseded"}


def test_reasserting_an_active_fact_stays_a_duplicate(store):
    a = store.add_facts([capital("Tokyo")]).new_ids[0]
    again = store.add_facts([capital("Tokyo")])
    assert (again.stored, again.duplicates, again.reactivated, again.new_ids) == (0, 1, 0, [])
    assert [e.kind for e in store.history(a)] == ["ingested", "deduped"]


def test_a_deleted_fact_can_be_added_again_and_keeps_its_contexts(store):
    a = store.add_facts([FactInput(text="Ann has a cat.", contexts=("Ann's pet is a cat.",))]).new_ids[0]
    store.delete_fact(a, reason="wrong")
    again = store.add_facts([FactInput(text="Ann has a cat.")])
    assert (again.reactivated, again.new_ids) == (1, [a])
    assert store.get_fact(a).status == "active"
    assert [c.text for c in store.contexts(a)] == ["Ann's pet is a cat."]
    assert [e.kind for e in store.history(a)] == ["ingested", "deleted", "reactivated"]
    assert store.history(a)[-1].detail == {"previous": "deleted"}


def test_reactivation_inside_one_batch(store):
    a = store.add_facts([capital("Tokyo")]).new_ids[0]
    b = store.add_facts([capital("Kyoto")]).new_ids[0]
    report = store.add_facts([capital("Tokyo"), capital("Osaka")])  # Tokyo returns, Osaka replaces it
    c = report.new_ids[1]
    assert (report.stored, report.reactivated, report.duplicates, report.superseded) == (1, 1, 0, 2)
    assert report.fact_ids == [a, c] and report.new_ids == [a, c]
    assert [(store.get_fact(i).status, store.get_fact(i).superseded_by) for i in (a, b, c)] == [
        ("superseded", c), ("superseded", a), ("active", None)]


def test_replaying_the_same_facts_changes_nothing(store):
    first = store.add_facts([capital("Tokyo"), capital("Kyoto")])  # an old value, then its newer one
    a, b = first.new_ids
    again = store.add_facts([capital("Tokyo"), capital("Kyoto")])
    assert (again.stored, again.duplicates, again.reactivated, again.superseded, again.new_ids) == (0, 2, 0, 0, [])
    assert (store.get_fact(a).status, store.get_fact(a).superseded_by, store.get_fact(b).status) == (
        "superseded", b, "active")
    assert [e.kind for e in store.history(a)] == ["ingested", "superseded", "deduped"]
    assert [e.kind for e in store.history(b)] == ["ingested", "deduped"]
    store.add_facts([capital("Kyoto"), capital("Tokyo")])  # an active fact stays put, Tokyo returns
    assert (store.get_fact(a).status, store.get_fact(b).superseded_by) == ("active", a)


def test_reactivated_fact_is_queued_again_on_its_last_backend(store):
    a = store.add_facts([capital("Tokyo")]).new_ids[0]
    add_edit(store, a, "ice", "applied")
    store.add_facts([capital("Kyoto")])
    with store.transaction() as s:  # what the edit route's rollback of a superseded fact leaves
        s.scalars(select(Edit).where(Edit.fact_id == a)).one().status = "rolled_back"
    store.add_facts([capital("Tokyo")])
    assert edits_of(store, a) == [("ice", "rolled_back"), ("ice", "pending")]


def test_reactivated_fact_with_a_live_edit_or_none_is_not_queued(store):
    live = store.add_facts([capital("Tokyo")]).new_ids[0]
    add_edit(store, live, "ice", "applied")  # still applied: nothing to redo
    never = store.add_facts([FactInput(text="Bob is tall.")]).new_ids[0]
    store.delete_fact(never)
    store.add_facts([capital("Kyoto")])
    report = store.add_facts([capital("Tokyo"), FactInput(text="Bob is tall.")])
    assert report.reactivated == 2 and store.get_fact(never).status == "active"
    assert edits_of(store, live) == [("ice", "applied")]
    assert edits_of(store, never) == []


def test_pending_backend_queues_new_and_reactivated_facts_once(store):
    report = store.add_facts([capital("Tokyo"), FactInput(text="Bob is tall.")], pending_backend="gist")
    a, bob = report.new_ids
    assert edits_of(store, a) == [("gist", "pending")] and edits_of(store, bob) == [("gist", "pending")]
    store.add_facts([FactInput(text="Bob is tall.")], pending_backend="gist")  # a duplicate: no new work
    assert edits_of(store, bob) == [("gist", "pending")]
    store.add_facts([capital("Kyoto")], pending_backend="gist")
    store.add_facts([capital("Tokyo")], pending_backend="gist")  # reactivated, already queued
    assert edits_of(store, a) == [("gist", "pending")]


def test_a_fact_superseded_in_its_own_batch_is_not_queued(store):
    report = store.add_facts([capital("Tokyo"), capital("Kyoto")], pending_backend="gist")
    gone, kept = report.new_ids
    assert edits_of(store, gone) == [] and edits_of(store, kept) == [("gist", "pending")]


# -- 2. fingerprints --------------------------------------------------------------------------------
def test_model_fingerprint_is_stable_and_tells_models_apart():
    import threading

    import torch

    from editors.fingerprint import model_fingerprint
    from editors.layers import target_parameters
    from editors.model import tiny_llama

    model = tiny_llama(seed=0)
    first = model_fingerprint(model, "tiny")
    assert len(first) == 16 and int(first, 16) >= 0
    assert model_fingerprint(tiny_llama(seed=0), "another name") == first  # same weights, any name
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(model_fingerprint(model, "tiny"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [first] * 3
    params = dict(model.named_parameters())
    with torch.no_grad():  # a weight edit changes MLP projections only: still the same base model
        for name in target_parameters(model):
            params[name].add_(0.5)
    assert model_fingerprint(model, "tiny") == first
    assert model_fingerprint(tiny_llama(seed=1), "tiny") != first
    assert model_fingerprint(tiny_llama(layers=2), "tiny") != first


def test_addon_fingerprint_hashes_names_and_bytes(tmp_path):
    from editors.fingerprint import addon_fingerprint

    addon = tmp_path / "addon"
    (addon / "sub").mkdir(parents=True)
    (addon / "config.json").write_text('{"a": 1}')
    (addon / "sub" / "weights.bin").write_bytes(b"\x00" * 10_000)
    first = addon_fingerprint(addon)
    assert addon_fingerprint(str(addon)) == first and len(first) == 16
    (addon / "config.json").write_text('{"a": 2}')
    assert addon_fingerprint(addon) != first
    (addon / "config.json").write_text('{"a": 1}')
    (addon / "sub" / "weights.bin").rename(addon / "sub" / "other.bin")
    assert addon_fingerprint(addon) != first
    with pytest.raises(NotFoundError):
        addon_fingerprint(tmp_path / "missing")


def test_bind_fingerprint_records_then_refuses_another_model(store_url):
    from editors.fingerprint import model_fingerprint
    from editors.model import tiny_llama

    url = store_url
    small, other = model_fingerprint(tiny_llama(), "smollm2-135m"), model_fingerprint(tiny_llama(layers=2), "x")
    store = FactStore(url)
    store.bind_fingerprint("model", "smollm2-135m", small)
    assert (store.get_meta("model"), store.get_meta("model_fingerprint")) == ("smollm2-135m", small)
    FactStore(url).bind_fingerprint("model", "smollm2-135m", small)  # the same model again: fine
    store.bind_fingerprint("gist_addon", "shipped", "00ff")  # another kind is bound separately
    with pytest.raises(FingerprintMismatchError) as err:
        FactStore(url).bind_fingerprint("model", "gemma3-270m", other)
    message = str(err.value)
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert small in message and other in message and "--model smollm2-135m" in message
    with pytest.raises(FingerprintMismatchError, match="--gist-addon shipped"):
        store.bind_fingerprint("gist_addon", "mine", "11ee")
    assert store.get_meta("model_fingerprint") == small


# -- 3. concurrent first open -----------------------------------------------------------------------
_barrier = None


def _init_worker(barrier) -> None:
    global _barrier
    _barrier = barrier


def _open_and_bind(url: str) -> str:
    """Run in a spawned process: open a new store at the same moment as its siblings."""
    _barrier.wait(timeout=60)
    store = FactStore(url)
    store.bind_fingerprint("model", "tiny", "abcd")
    if not store.is_sqlite:
        return store.engine.dialect.name
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA journal_mode").scalar()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_first_opens_all_succeed(tmp_path, request, backend):
    workers, rounds = 4, 4 if backend == "sqlite" else 2
    # PostgreSQL: a fresh schema a round (its first opens serialize on an advisory lock).
    fresh = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(barrier,)) as pool:
        for r in range(rounds):
            url = fresh() if fresh else f"sqlite:///{tmp_path / f'round{r}' / 'store.sqlite'}"
            modes = pool.map(_open_and_bind, [url] * workers, chunksize=1)
            assert modes == (["wal"] if backend == "sqlite" else ["postgresql"]) * workers
            assert FactStore(url).get_meta("schema_version") is not None
            assert FactStore(url).get_meta("model_fingerprint") == "abcd"
    if backend == "sqlite":
        with FactStore(url).engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


# -- 4. opening without creating --------------------------------------------------------------------
def test_open_without_create_refuses_a_missing_store(tmp_path):
    path = tmp_path / "nowhere" / "store.sqlite"
    url = f"sqlite:///{path}"
    with pytest.raises(NotFoundError, match="no Engram store at .*engram ingest"):
        FactStore(url, create=False)
    assert not path.exists() and not path.parent.exists()
    import sqlite3

    empty = tmp_path / "empty.sqlite"  # a SQLite file that is not an Engram store

    sqlite3.connect(empty).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(NotFoundError):
        FactStore(f"sqlite:///{empty}", create=False)
    with sqlite3.connect(empty) as conn:  # left as it was: no tables added, not switched to WAL
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["t"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    store = FactStore(url)
    fid = store.add_facts([capital("Tokyo")]).new_ids[0]
    assert FactStore(url, create=False).get_fact(fid).target == "Tokyo"


def test_open_without_create_on_any_backend(store_url):
    with pytest.raises(NotFoundError, match="no Engram store at"):
        FactStore(store_url, create=False)
    fid = FactStore(store_url).add_facts([capital("Tokyo")]).new_ids[0]
    assert FactStore(store_url, create=False).get_fact(fid).target == "Tokyo"


# -- 5. missing database drivers --------------------------------------------------------------------
@pytest.mark.parametrize("url, module, package", [
    ("postgresql+psycopg://u@localhost/db", "psycopg", "psycopg[binary]"),
    ("postgresql+psycopg2://u@localhost/db", "psycopg2", "psycopg2-binary"),
    ("mysql+pymysql://u@localhost/db", "pymysql", "pymysql"),
])
def test_a_missing_driver_names_the_package_to_install(url, module, package, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed (psycopg is, for PostgreSQL)
    with pytest.raises(StoreError) as err:
        FactStore(url)
    assert f"the URL needs the {module} driver" in str(err.value)
    assert f"pip install '{package}'" in str(err.value)


def test_wal_and_busy_timeout_take_effect(tmp_path):
    store = FactStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 10000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
