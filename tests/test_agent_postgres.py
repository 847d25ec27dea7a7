"""Two agent loops on one PostgreSQL store (issue 25 §4): they share the queue, and no fact is done twice.

Each loop has its own store connections, owner id and live model, as two `engram run` processes would;
they run in threads of one process so they can share the tiny model's data dir (its writer lock is
re-entrant within a process). The facts are added first, as `engram add` does, and then both loops run
until idle at once.
"""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from memory.facts import FactInput
from memory.models import Context, Edit, Event, Stage
from memory.stages import add_with_stages
from memory.store import FactStore
from tests.fakes import FakeEditor
from tests.test_agent_loop import Harness


def slow_editor(model) -> FakeEditor:
    """The fake editor, slowed a little so that the two loops' rounds overlap."""
    return FakeEditor(model, sleep_s=0.02)


def test_two_agents_on_one_postgres_store_share_the_work_and_never_double_a_fact(tmp_path, postgres_url, monkeypatch):
    url = postgres_url()
    monkeypatch.setenv("ENGRAM_DATA", str(tmp_path / "data"))
    n = 40
    ids = add_with_stages(FactStore(url), [FactInput(prompt=f"The code word {i} is", target=f"word{i}")
                                           for i in range(n)]).new_ids
    agents = [Harness(tmp_path, editor=slow_editor, url=url, batch=4) for _ in range(2)]
    start = threading.Barrier(2)

    def run(h: Harness) -> int:
        start.wait(timeout=60)
        return h.run()

    with ThreadPoolExecutor(2) as pool:
        codes = [f.result(timeout=300) for f in [pool.submit(run, h) for h in agents]]
    assert codes == [0, 0]
    store = agents[0].store
    with store.transaction() as s:
        stages = {row.fact_id: row for row in s.scalars(select(Stage))}
        edits = Counter(s.scalars(select(Edit.fact_id).where(Edit.status == "applied")))
        context_sets = Counter(s.scalars(select(Context.fact_id).distinct()))
        takeovers = s.scalar(select(Event.id).where(Event.kind == "lease_taken_over").limit(1))
    assert sorted(stages) == ids and all(r.stage == "applied" for r in stages.values())
    assert edits == Counter(ids), "each fact is applied exactly once"
    assert set(context_sets) == set(ids)
    assert takeovers is None, "a live agent's lease was taken over"
    done = [sorted(e["fact_id"] for e in h.events("fact")) for h in agents]
    assert not set(done[0]) & set(done[1]) and sorted(done[0] + done[1]) == ids
    assert done[0] and done[1], "one agent did all the work"
    for h in agents:
        h.close()
