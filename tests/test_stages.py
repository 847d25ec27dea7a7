"""The agent's stage rows at the store level (memory/stages.py), on SQLite and PostgreSQL: claims under
leases, takeovers, compare-and-set transitions, settling from edit rows, upserted offsets; and, on
PostgreSQL, claims that skip each other's locked rows, so two agents share one queue."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from memory.facts import FactInput
from memory.models import Edit, Stage
from memory.stages import (APPLIED, CONTEXTS, FAILED, ROUTED, STORED, LeaseLostError, add_with_stages, advance,
                           claim, owner_id, queue_edit, read_offset, release, settle, write_offset)
from memory.store import FactStore


@pytest.fixture
def store(store_url):
    return FactStore(store_url)


def seed(store: FactStore, n: int) -> list[int]:
    """n facts, each with its `stored` stage row: the agent's queue."""
    return add_with_stages(store, [FactInput(prompt=f"Fact {i} is", target=f"v{i}") for i in range(n)]).new_ids


def stages(store: FactStore) -> dict[int, Stage]:
    with store.transaction() as s:
        return {row.fact_id: row for row in s.scalars(select(Stage))}


def test_claims_lease_the_oldest_free_facts(store):
    ids = seed(store, 5)
    a, b = owner_id(), owner_id()
    assert [c.fact_id for c in claim(store, a, 60.0, 3, 5)[0]] == ids[:3]
    assert [c.fact_id for c in claim(store, b, 60.0, 10, 5)[0]] == ids[3:]  # a's leases are not free
    assert [c.fact_id for c in claim(store, a, 60.0, 10, 5)[0]] == ids[:3]  # ours stay ours
    release(store, a, ids[:1])
    assert [c.fact_id for c in claim(store, b, 60.0, 10, 5)[0]] == [ids[0], *ids[3:]]
    assert {i: r.lease_owner for i, r in stages(store).items()} == {
        ids[0]: b, ids[1]: a, ids[2]: a, ids[3]: b, ids[4]: b}


def test_an_expired_lease_is_taken_over_then_parked(store):
    (fid,) = seed(store, 1)
    claim(store, owner_id(), -1.0, 1, 5)  # a lease already over: its owner stalled
    claimed, parked = claim(store, owner_id(), -1.0, 1, 5)  # taken over; this owner stalls too
    assert [c.fact_id for c in claimed] == [fid] and parked == []
    assert stages(store)[fid].takeovers == 1
    assert [e.kind for e in store.history(fid)] == ["ingested", "lease_taken_over"]
    claimed, parked = claim(store, owner_id(), 60.0, 1, 1)  # a second takeover passes max_takeovers=1
    assert claimed == [] and [(o.fact_id, o.stage) for o in parked] == [(fid, FAILED)]


def test_advance_needs_the_lease(store):
    (fid,) = seed(store, 1)
    mine = owner_id()
    claim(store, mine, 60.0, 1, 5)
    with pytest.raises(LeaseLostError), store.transaction() as s:
        advance(s, fid, owner_id(), STORED, CONTEXTS)
    with store.transaction() as s:
        advance(s, fid, mine, STORED, CONTEXTS)
    with pytest.raises(LeaseLostError), store.transaction() as s:
        advance(s, fid, mine, STORED, CONTEXTS)  # not at `stored` any more
    assert stages(store)[fid].stage == CONTEXTS


def test_settle_takes_each_edit_rows_outcome(store):
    ok, bad = seed(store, 2)
    owner = owner_id()
    claim(store, owner, 60.0, 2, 5)
    with store.transaction() as s:
        for fid in (ok, bad):
            advance(s, fid, owner, STORED, ROUTED, route="ice", edit_id=queue_edit(s, fid, "ice", "routed"))
    with store.transaction() as s:
        for edit in s.scalars(select(Edit)):
            edit.status, edit.error = ("applied", None) if edit.fact_id == ok else ("failed", "diverged")
    outcomes = {o.fact_id: (o.stage, o.error) for o in settle(store, max_attempts=1)}
    assert outcomes == {ok: (APPLIED, None), bad: (FAILED, "diverged")}
    assert settle(store, max_attempts=1) == []  # recorded once
    assert {i: (r.stage, r.lease_owner) for i, r in stages(store).items()} == {ok: (APPLIED, None), bad: (FAILED, None)}


def test_offsets_and_meta_are_upserts(store):
    for offset, line in ((10, 1), (25, 3)):
        with store.transaction() as s:
            write_offset(s, "/data/facts.jsonl", offset, line)
    assert read_offset(store, "/data/facts.jsonl") == (25, 3) and read_offset(store, "/other") == (0, 0)
    store.set_meta("policy", "a")
    store.set_meta("policy", "b")
    assert store.get_meta("policy") == "b"


def test_times_read_back_as_naive_utc_on_every_backend(store):
    (fid,) = seed(store, 1)
    created = store.get_fact(fid).created_at
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert created.tzinfo is None and abs(now - created) < timedelta(minutes=1)
    assert stages(store)[fid].updated_at.tzinfo is None


# -- PostgreSQL: agents sharing one store -------------------------------------------------------------
def test_a_server_store_gets_a_data_dir_of_its_own(postgres_url, monkeypatch):
    monkeypatch.delenv("ENGRAM_DATA", raising=False)
    store = FactStore(postgres_url())
    backend, host, _port, database = store.data_dir.name.split("-", 3)
    assert (backend, host, database) == ("postgresql", "127.0.0.1", store.engine.url.database)
    assert store.data_dir.parent.name == "engram-data"


def test_a_claim_skips_rows_another_claim_has_locked(postgres_url):
    url = postgres_url()
    store = FactStore(url)
    ids = seed(store, 4)
    pool = ThreadPoolExecutor(1)
    with store.engine.connect() as other:  # another agent, mid-claim: the first two rows locked
        other.execute(select(Stage).where(Stage.fact_id.in_(ids[:2])).with_for_update())
        future = pool.submit(claim, FactStore(url), owner_id(), 60.0, 10, 5)
        try:
            claimed, _ = future.result(timeout=30)  # without SKIP LOCKED it would wait for `other`
        finally:
            other.rollback()
    pool.shutdown()
    assert [c.fact_id for c in claimed] == ids[2:]


def test_two_agents_share_the_queue_and_never_double_a_fact(postgres_url):
    url = postgres_url()
    ids = seed(FactStore(url), 60)
    start = threading.Barrier(2)

    def agent() -> list[int]:
        """The claiming loop of one agent, with its own store (engine, connections) and owner id."""
        store, owner, done = FactStore(url), owner_id(), []
        start.wait(timeout=30)
        while claimed := claim(store, owner, 60.0, 3, 5)[0]:
            for c in claimed:
                done.append(c.fact_id)
                time.sleep(0.005)  # the step's work: lets the other agent claim meanwhile
                with store.transaction() as s:
                    advance(s, c.fact_id, owner, c.stage, APPLIED)
        return done

    with ThreadPoolExecutor(2) as pool:
        first, second = (f.result(timeout=120) for f in [pool.submit(agent), pool.submit(agent)])
    assert not set(first) & set(second), "a fact was claimed by both agents"
    assert sorted(first + second) == ids and len(first + second) == len(ids)  # each fact done exactly once
    assert first and second, "one agent did all the work"
    assert all(r.stage == APPLIED and r.lease_owner is None for r in stages(FactStore(url)).values())
