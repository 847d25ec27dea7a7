"""The fact store on SQLite and PostgreSQL (tests/conftest.py: store_url): dedupe, supersede, schema
refusal, rollback, events."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from memory.errors import NotFoundError, SchemaVersionError
from memory.facts import FactInput
from memory.models import SCHEMA_VERSION, Fact
from memory.store import FactStore


@pytest.fixture
def store(store_url):
    """This module's store: a fresh one on each backend."""
    return FactStore(store_url)


def fact(prompt="The capital of Japan is", target="Nairobi", **kw) -> FactInput:
    return FactInput(prompt=prompt, target=target, **kw)


def test_identical_fact_is_a_duplicate(store):
    first = store.add_facts([fact()])
    again = store.add_facts([fact(), fact()])
    assert (first.stored, first.duplicates) == (1, 0)
    assert (again.stored, again.duplicates) == (0, 2)
    assert again.fact_ids == first.new_ids * 2
    assert store.counts()["facts"] == {"active": 1, "superseded": 0, "deleted": 0}
    kinds = [e.kind for e in store.history(first.new_ids[0])]
    assert kinds == ["ingested", "deduped", "deduped"]


def test_duplicate_within_one_batch_is_stored_once(store):
    report = store.add_facts([fact(), fact()])
    assert (report.stored, report.duplicates) == (1, 1)


def test_new_target_for_same_prompt_supersedes(store):
    old = store.add_facts([fact(target="Nairobi")]).new_ids[0]
    report = store.add_facts([fact(target="Lima")])
    new = report.new_ids[0]
    assert (report.stored, report.superseded) == (1, 1)
    old_row = store.get_fact(old)
    assert old_row.status == "superseded" and old_row.superseded_by == new
    assert [e.kind for e in store.history(old)] == ["ingested", "superseded"]
    assert [f.id for f in store.list_facts()] == [new]


def test_same_subject_relation_supersedes_case_insensitively(store):
    a = fact(prompt="Japan's capital city is", subject="Japan", relation="capital")
    b = fact(prompt="The capital of Japan is", target="Lima", subject="japan", relation="Capital")
    old = store.add_facts([a]).new_ids[0]
    assert store.add_facts([b]).superseded == 1
    assert store.get_fact(old).status == "superseded"


def test_supersede_inside_one_batch_and_scopes_are_separate(store):
    report = store.add_facts([
        fact(target="Nairobi"), fact(target="Lima"),
        fact(target="Oslo", scope="user", user_id="ann"),  # another owner: no supersede
    ])
    assert (report.stored, report.superseded) == (3, 1)
    statuses = {f.target: f.status for f in store.list_facts(status=None)}
    assert statuses == {"Nairobi": "superseded", "Lima": "active", "Oslo": "active"}
    visible = {f.target for f in store.list_facts(user_id="bob")}
    assert visible == {"Lima"}


def test_failed_batch_writes_nothing(store, monkeypatch):
    store.add_facts([fact(prompt="Kept", target="x")])
    from memory import store as store_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_module.FactStore, "_row", staticmethod(broken))
    with pytest.raises(RuntimeError):
        store.add_facts([fact(prompt="A", target="1"), fact(prompt="B", target="2")])
    monkeypatch.undo()
    with store.transaction() as s:
        prompts = [f.prompt for f in s.scalars(select(Fact))]
    assert prompts == ["Kept"]
    assert store.counts()["facts"]["active"] == 1


def test_newer_schema_is_refused(store_url):
    url = store_url
    FactStore(url).set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(SchemaVersionError, match="newer"):
        FactStore(url)


def test_delete_and_contexts(store):
    fid = store.add_facts([fact(contexts=("Japan's capital is Nairobi.",))]).new_ids[0]
    assert [c.generator for c in store.contexts(fid)] == ["supplied"]
    store.add_contexts(fid, ["Nairobi is the capital of Japan."], "template")
    assert len(store.contexts(fid)) == 2
    store.delete_fact(fid, reason="wrong")
    assert store.get_fact(fid).status == "deleted"
    assert store.history(fid)[-1].kind == "deleted"
    with pytest.raises(NotFoundError):
        store.get_fact(999)


def test_facts_without_contexts(store):
    ids = store.add_facts([fact(prompt="P1", target="a"), fact(prompt="P2", target="b", contexts=("P2 b.",))]).new_ids
    assert [f.id for f in store.facts_without_contexts()] == [ids[0]]
