"""Real `kill -9` of the agent loop (issue 22, "Done when"): a worker runs the loop on a stream of 50 facts
(and two bad lines), is SIGKILLed at chosen moments, a fresh worker resumes it to the end, and the result
must be exact: every fact applied exactly once, none lost, no line read twice, no bad line reported twice,
and the weights, the gist pool and the RAG index equal to those of an uninterrupted run.

The machinery is tests/test_kill.py's: workers forked from one zygote, a trace of numbered events (edit
and compression start/end, temp file written, renamed, commit before/after), and a worker frozen at a
chosen event and killed there. The kill points named by the issue are all among them: during a delta
write (temp-written v...), between the delta and its row (renamed v..., before its commit), during a pool
segment write (temp-written pool-...), plus an ingest commit, a stage commit, mid-edit and mid-compression.

The fake weight editor touches only the last layer's MLP, which no gist key or value depends on, so the
pool is the same whichever edits came before each compression; the two routes stay comparable run to run.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from memory.models import Event, SourceOffset, Stage
from memory.store import FactStore
from tests.fakes import FakeEditor, new_gist_state, run_quiet_loop, slow_compression, writer_state, zygote
from tests.test_agent_loop import edit_rows, fact, write
from tests.test_kill import Workers, _kind, assert_close, copy_of, reader_rebuild, template

EDIT_SLEEP_S = 0.02
N_FACTS = 50
GIST_FACTS = {i for i in range(1, N_FACTS + 1) if i % 5 != 0 and i % 5 != 2}  # 30 gist, 20 ice
RAG_DIM = 32


def stream() -> list:
    records = [fact(i, subject=i in GIST_FACTS) for i in range(1, N_FACTS + 1)]
    records.insert(7, {"prompt": "Broken", "target": ""})
    records.insert(31, "{not json")
    return records


# -- the worker side ------------------------------------------------------------------------------------------
def job_loop(cfg: dict, probe) -> None:
    """`engram run --source facts.jsonl --until-idle` on the tiny models, probed (see the module doc)."""
    from agent.loop.loop import LoopConfig
    from agent.loop.routing import FallbackRouter
    from memory.embeddings import HashEmbedder
    from memory.vector import VectorIndex

    store, state = writer_state(cfg["url"], probe)

    def open_gist():
        gist = slow_compression(new_gist_state(store), probe, EDIT_SLEEP_S)
        gist.open()
        return gist

    run_quiet_loop(store, state, cfg["file"], editor=FakeEditor(state.model, sleep_s=EDIT_SLEEP_S, probe=probe),
                   router=FallbackRouter(), open_gist=open_gist,
                   rag=VectorIndex(HashEmbedder(RAG_DIM), directory=store.data_dir / "rag"),
                   config=LoopConfig(until_idle=True, poll_s=0.0, batch=10, read_lines=20))


# -- the parent side ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with zygote(tmp_path_factory, loop=job_loop) as (proc, log):
        yield Workers(proc, log)


def stream_template(root_parent: Path, records: list) -> Path:
    """tests/test_kill.py's template store, with `records` in facts.jsonl beside it."""
    def build(store: FactStore) -> None:
        write(Path(store.db_path).parent / "facts.jsonl", records)

    return template(root_parent, "template", build)


def stream_cfg(root: Path, name: str) -> dict:
    cfg = copy_of(root, name)
    return {**cfg, "file": str(Path(cfg["dir"]) / "facts.jsonl")}


def restart_cfg(cfg: dict) -> dict:
    trace_dir = Path(cfg["dir"]) / "restart"
    trace_dir.mkdir()
    return {**cfg, "dir": str(trace_dir)}  # the store and file stay; the trace is the new worker's own


def pool_rows(url: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    store = FactStore(url)
    gist = new_gist_state(store)
    gist.open()
    view = gist.memory.pool.view_all()
    rows = {fid: (view.keys[:, i].clone(), view.values[:, i].clone()) for i, fid in enumerate(view.fact_ids)}
    assert len(rows) == len(view.fact_ids), "a fact is in the pool twice"
    gist.memory.close()
    store.engine.dispose()
    return rows


def check_exact(cfg: dict) -> None:
    """Every fact applied exactly once on its route, none lost, no line read or reported twice."""
    store = FactStore(cfg["url"])
    with store.transaction() as s:
        stages = dict(s.execute(select(Stage.fact_id, Stage.stage)).all())
        kinds = Counter(s.scalars(select(Event.kind)))
        offset = s.get(SourceOffset, str(Path(cfg["file"]).resolve()))
    expected = {i: [("gist" if i in GIST_FACTS else "ice", "applied")] for i in range(1, N_FACTS + 1)}
    assert edit_rows(store) == expected
    assert stages == {i: "applied" for i in range(1, N_FACTS + 1)}
    assert kinds["ingested"] == N_FACTS and kinds["deduped"] == 0 and kinds["rejected"] == 2, kinds
    assert offset.offset == Path(cfg["file"]).stat().st_size and offset.line == N_FACTS + 2
    from memory.embeddings import HashEmbedder
    from memory.vector import VectorIndex

    index = VectorIndex(HashEmbedder(RAG_DIM), directory=store.data_dir / "rag")
    synced = index.sync(store)  # loads what the loop saved: nothing to add, remove or rebuild
    assert not synced.rebuilt and synced.added == synced.removed == 0, synced
    assert set(index._ids) == set(range(1, N_FACTS + 1))
    store.engine.dispose()


def plans(events: list[str]) -> list[dict]:
    """The issue's kill points and a spread of others, each found in the uninterrupted run's trace."""
    def first(pred, after: int = 0) -> int:
        return next(j for j, e in enumerate(events) if j >= after and pred(e))

    delta = first(lambda e: e.startswith("temp-written v"), after=len(events) // 3)
    pool = first(lambda e: e.startswith("temp-written pool"), after=len(events) // 2)
    edits = [j for j, e in enumerate(events) if _kind(e) == "edit-start"]
    compress = [j for j, e in enumerate(events) if _kind(e) == "compress-start"]
    frozen = {
        0,  # before anything committed
        first(lambda e: e == "commit-before"),  # the first ingest commit, not yet durable
        first(lambda e: e == "commit-after"),  # lines stored with their stages and offset, nothing stepped
        delta,  # during a delta write
        first(lambda e: e.startswith("renamed v"), after=delta),  # between the delta and its row
        first(lambda e: e == "commit-after", after=delta),  # the delta's row committed, its stage not settled
        pool,  # during a pool segment write
        first(lambda e: e == "renamed manifest.json", after=pool),  # the segment listed, its rows not committed
        len(events) - 1,
    }
    out = [{"freeze": j} for j in sorted(frozen)]
    out.append({"trigger": edits[len(edits) // 2], "jitter_s": EDIT_SLEEP_S / 2})  # inside a slow edit
    out.append({"trigger": compress[-1], "jitter_s": EDIT_SLEEP_S / 2})  # inside a compression
    return out


@pytest.fixture(scope="module")
def reference(workers, tmp_path_factory):
    """The template store and file, and the uninterrupted run: (root, events, weights, pool)."""
    root = stream_template(tmp_path_factory.mktemp("agent-kill"), stream())
    ref_cfg = stream_cfg(root, "ref")
    ref = workers.run("loop", ref_cfg)
    assert not ref.killed
    assert {_kind(e) for e in ref.events} >= {"edit-start", "compress-start", "temp-written", "renamed", "commit-before"}
    check_exact(ref_cfg)
    pool = pool_rows(ref_cfg["url"])
    assert sorted(pool) == sorted(GIST_FACTS)
    return root, ref.events, reader_rebuild(ref_cfg["url"]), pool


def check_same_state(cfg: dict, reference, what: str) -> None:
    _, _, weights, ref_pool = reference
    assert_close(reader_rebuild(cfg["url"]), weights, f"weights after {what}")
    pool = pool_rows(cfg["url"])
    assert sorted(pool) == sorted(ref_pool), what
    for fid, (keys, values) in pool.items():
        assert torch.allclose(keys, ref_pool[fid][0], atol=1e-5), (what, fid)
        assert torch.allclose(values, ref_pool[fid][1], atol=1e-5), (what, fid)


def test_sigkill_of_the_agent_loop_at_any_moment_applies_every_fact_exactly_once(workers, reference):
    root, events = reference[0], reference[1]
    for i, plan in enumerate(plans(events)):
        cfg = stream_cfg(root, f"kill{i}")
        run = workers.run("loop", cfg, **plan)
        assert run.killed or plan.get("trigger") is not None, plan
        assert run.events == events[:len(run.events)], plan  # it stopped where the plan said
        assert not workers.run("loop", restart_cfg(cfg)).killed, plan
        check_exact(cfg)
        check_same_state(cfg, reference, f"kill plan {plan}")


def test_repeated_kills_then_restarts_until_done_still_apply_every_fact_once(workers, reference):
    """Kill, restart and kill the restart (twice, at other moments), then let it finish."""
    root, events = reference[0], reference[1]
    cfg = stream_cfg(root, "chain")
    assert workers.run("loop", cfg, freeze=len(events) // 4).killed
    for freeze in (40, 90):  # counted in each restart's own trace
        cfg = restart_cfg(cfg)
        assert workers.run("loop", cfg, freeze=freeze).killed
    assert not workers.run("loop", restart_cfg(cfg)).killed
    check_exact(cfg)
    check_same_state(cfg, reference, "three kills in a row")
