"""The agent loop (`engram run`, issue 22 part 1): sources, durable stages, leases, retries, signals.

Tiny config-built models throughout: tiny_llama, a deterministic fake weight editor, a fresh tiny gist
add-on, template contexts, the fallback router (injected, so these tests do not depend on agent/router).
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from agent.contexts import TemplateContextGenerator
from agent.loop.loop import AgentLoop, Backends, LoopConfig
from agent.loop.routing import FallbackRouter
from agent.loop.sources import FileSource, FolderSource, Offsets, StdinSource
from agent.loop.view import FactReport, JsonView, LiveView, Snapshot
from memory.models import Context, Edit, Event, SourceOffset, Stage
from memory.stages import read_offset
from memory.store import FactStore
from tests.fakes import LAST_MLP  # noqa: F401  (still imported from here: tests/test_consolidate.py)
from tests.fakes import FakeEditor, new_gist_state, save_tiny_model, writer_state


def fact(i: int, subject: bool = True, target: str | None = None) -> dict:
    """A gist fact (with a subject) or an ICE fact (none), distinct per i."""
    if subject:
        return {"prompt": f"Person{i} lives in", "target": target or f"Town{i}", "subject": f"Person{i}"}
    return {"prompt": f"The code word {i} is", "target": target or f"word{i}"}


def write(path: Path, records, mode: str = "w") -> None:
    with open(path, mode) as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


class Harness:
    """One agent process: the store, the rebuilt live model, the loop's backends, a JSON view into `out`."""

    def __init__(self, tmp_path: Path, editor=None, rag=None, gist=new_gist_state, url: str | None = None, **config):
        self.store, self.state = writer_state(url or f"sqlite:///{tmp_path / 'store.sqlite'}")
        self.editor = editor(self.state.model) if callable(editor) else FakeEditor(self.state.model)
        self.gist = None
        self._make_gist = gist
        self.out = io.StringIO()
        self.offsets = Offsets(lambda key: read_offset(self.store, key))
        self.backends = Backends(self.state, self.editor, FallbackRouter(), open_gist=self._open_gist,
                                 generator=TemplateContextGenerator(), rag=rag)
        self.config = LoopConfig(**{"until_idle": True, "poll_s": 0.01, **config})

    def _open_gist(self):
        self.gist = self._make_gist(self.store)
        self.gist.open()
        return self.gist

    def loop(self, *sources) -> AgentLoop:
        return AgentLoop(self.store, sources, self.backends, JsonView(self.out), self.config, self.offsets)

    def file(self, path: Path) -> FileSource:
        return FileSource(path, self.offsets, path.name)

    def run(self, *sources) -> int:
        return self.loop(*sources).run()

    def events(self, kind: str | None = None) -> list[dict]:
        lines = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in lines if kind is None or e["event"] == kind]

    def stages(self) -> dict[int, Stage]:
        with self.store.transaction() as s:
            return {row.fact_id: row for row in s.scalars(select(Stage))}

    def close(self) -> None:
        if self.gist is not None:
            self.gist.memory.close()
        self.state.close()
        self.store.engine.dispose()


def edit_rows(store) -> dict[int, list[tuple[str, str]]]:
    with store.transaction() as s:
        rows = s.execute(select(Edit.fact_id, Edit.backend, Edit.status).order_by(Edit.id)).all()
    out: dict[int, list[tuple[str, str]]] = {}
    for fact_id, backend, status in rows:
        out.setdefault(fact_id, []).append((backend, status))
    return out


def event_kinds(store) -> Counter:
    with store.transaction() as s:
        return Counter(s.scalars(select(Event.kind)))


# -- the whole path --------------------------------------------------------------------------------------
def test_until_idle_moves_every_fact_through_its_stages_and_reports_bad_lines(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2, subject=False), {"prompt": "Odd", "target": ""}, "not json",
                 {"text": "Ann keeps bees.", "scope": "user", "user_id": "ann"}, fact(3, subject=False)])
    h = Harness(tmp_path)
    assert h.run(h.file(path)) == 1  # until-idle with rejected lines: 1, like `engram ingest`
    rejected = h.events("rejected")
    assert [(e["source"], e["line"]) for e in rejected] == [("facts.jsonl", 3), ("facts.jsonl", 4)]
    assert rejected[0]["reason"] == "field 'target' is empty"
    facts = h.events("fact")
    assert sorted(e["fact_id"] for e in facts) == [1, 2, 3, 4] and all(e["stage"] == "applied" for e in facts)
    assert all(e["trail"] == ["stored", "contexts", "routed", "applied"] for e in facts)
    routes = {e["fact_id"]: e["route"] for e in facts}
    assert routes == {1: "gist", 2: "ice", 3: "gist", 4: "ice"}
    assert edit_rows(h.store) == {1: [("gist", "applied")], 2: [("ice", "applied")], 3: [("gist", "applied")],
                                  4: [("ice", "applied")]}
    assert {r.stage for r in h.stages().values()} == {"applied"}
    assert all(r.lease_owner is None for r in h.stages().values())
    with h.store.transaction() as s:  # template contexts for the prompt/target facts, none for the text fact
        with_contexts = set(s.scalars(select(Context.fact_id)))
        detail = s.scalar(select(Event.detail).where(Event.kind == "rejected").order_by(Event.id))
    assert with_contexts == {1, 2, 4} and detail["line"] == 3 and detail["source"] == "facts.jsonl"
    assert h.events("stopped")[0]["applied"] == 4 and h.state.version == 2
    assert h.gist.memory.pool.scope_of(3) == "ann"
    h.close()


def test_offsets_survive_a_restart_and_a_partial_last_line_waits(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2)])
    h = Harness(tmp_path)
    assert h.run(h.file(path)) == 0
    h.close()
    with open(path, "a") as fh:  # two more lines, the last one half written
        fh.write(json.dumps(fact(3)) + "\n" + json.dumps(fact(4))[:15])
    again = Harness(tmp_path)  # a new process: its offsets come from the store
    assert again.run(again.file(path)) == 0
    assert [e["fact_id"] for e in again.events("fact")] == [3]
    assert any("last line has no newline yet" in e["text"] for e in again.events("note"))
    with open(path, "a") as fh:
        fh.write(json.dumps(fact(4))[15:] + "\n" + "{bad\n")
    assert again.run(again.file(path)) == 1
    assert [e["fact_id"] for e in again.events("fact")] == [3, 4]
    assert [(e["line"], e["reason"][:12]) for e in again.events("rejected")] == [(5, "invalid JSON")]
    kinds = event_kinds(again.store)
    assert kinds["ingested"] == 4 and kinds["deduped"] == 0  # no line was read twice
    with again.store.transaction() as s:
        row = s.get(SourceOffset, str(path.resolve()))
    assert (row.offset, row.line) == (path.stat().st_size, 5)
    again.close()


def test_a_file_that_grows_while_the_loop_runs_is_tailed_until_sigterm(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("")
    h = Harness(tmp_path, until_idle=False, poll_s=0.02)
    records = [json.dumps(fact(i, subject=i % 2 == 0)) + "\n" for i in range(6)]

    def writer():
        for text in records:  # each line in two writes: the first half must wait for the second
            with open(path, "a") as fh:
                fh.write(text[:10])
            time.sleep(0.05)
            with open(path, "a") as fh:
                fh.write(text[10:])
            time.sleep(0.05)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(r.stage == "applied" for r in h.stages().values()) < 6:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler takes it in the main thread

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert h.run(h.file(path)) == 0
    finally:
        thread.join()
    assert sorted(e["fact_id"] for e in h.events("fact")) == [1, 2, 3, 4, 5, 6]
    assert h.events("stopped")[0]["stopped"] == "SIGTERM" and h.events("rejected") == []
    h.close()


def test_a_folder_source_tails_every_jsonl_file_including_new_ones(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "a.jsonl", [fact(1), fact(2, subject=False)])
    (folder / "notes.txt").write_text("not a source\n")
    h = Harness(tmp_path)
    source = FolderSource(folder, h.offsets, "in")
    assert h.run(source) == 0
    write(folder / "b.jsonl", [fact(3), {"prompt": "No target"}])
    write(folder / "a.jsonl", [fact(4)], mode="a")
    assert h.run(source) == 1
    assert sorted(e["fact_id"] for e in h.events("fact")) == [1, 2, 3, 4]
    assert [(e["source"], e["line"]) for e in h.events("rejected")] == [(str(Path("in") / "b.jsonl"), 2)]
    assert h.events("rejected")[0]["reason"].startswith("field 'target' is missing")
    h.close()


def test_standard_input_is_read_to_its_end(tmp_path):
    h = Harness(tmp_path)
    data = (json.dumps(fact(1)) + "\n" + json.dumps(fact(2, subject=False))).encode()  # no final newline
    assert h.run(StdinSource(io.BytesIO(data))) == 0
    assert sorted(e["fact_id"] for e in h.events("fact")) == [1, 2]
    h.close()


# -- failures, leases, recovery ---------------------------------------------------------------------------
def test_a_failing_fact_is_retried_then_parked_while_the_others_flow(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False), fact(2, subject=False, target="Boom"), fact(3, subject=False), fact(4)])
    h = Harness(tmp_path, editor=lambda model: FakeEditor(model, fail={"Boom"}), max_attempts=3)
    assert h.run(h.file(path)) == 1  # a fact was parked
    stages = h.stages()
    assert {i: stages[i].stage for i in stages} == {1: "applied", 2: "failed", 3: "applied", 4: "applied"}
    assert stages[2].attempts == 3 and stages[2].error == "did not learn it"
    assert edit_rows(h.store)[2] == [("ice", "failed")] * 3  # three attempts, each recorded, none applied
    assert h.editor.calls.count("Boom") == 3
    assert [e["attempts"] for e in h.events("retry")] == [1, 2]
    parked = [e for e in h.events("fact") if e["stage"] == "failed"]
    assert len(parked) == 1 and parked[0]["fact_id"] == 2 and parked[0]["error"] == "did not learn it"
    kinds = event_kinds(h.store)
    assert kinds["attempt_failed"] == 2 and kinds["failed"] == 1
    h.close()


def fragile_gist_state(store):
    """A pool whose compression raises for any batch with a "Poison" fact in it."""
    state = new_gist_state(store)
    compress = state.memory.add

    def add(fact_ids, texts, *args, **kwargs):
        if any("Poison" in t for t in texts):
            raise RuntimeError("cannot compress")
        return compress(fact_ids, texts, *args, **kwargs)

    state.memory.add = add
    return state


def route_without_applying(h: Harness, path: Path, ids) -> AgentLoop:
    """What a process that died after routing leaves: stages at `routed`, their pending edit rows."""
    from agent.loop import stages as steps
    from memory.stages import claim

    loop = h.loop(h.file(path))
    loop._ingest()
    claim(h.store, loop.owner, 60, 10, 5)
    for f in steps.load_facts(h.store, ids).values():
        steps.contexts_step(h.store, loop.owner, f, None)
        steps.route_step(h.store, loop.owner, f, FallbackRouter(), 0, "ice")
    return loop


def test_a_bad_gist_fact_costs_its_batch_mates_no_more_than_one_retry(tmp_path):
    fragile = fragile_gist_state
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2, target="Poison"), fact(3)])
    h = Harness(tmp_path, gist=fragile)
    assert h.run(h.file(path)) == 1
    stages = h.stages()
    assert {i: stages[i].stage for i in stages} == {1: "applied", 2: "failed", 3: "applied"}
    assert stages[1].attempts == 1 and stages[2].attempts == 3  # mates failed once (the batch), then alone
    assert "cannot compress" in stages[2].error
    assert sorted(h.gist.memory.pool.fact_ids) == [1, 3]
    h.close()


def test_a_queued_gist_fact_that_cannot_be_compressed_does_not_keep_the_pool_shut(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2, target="Poison"), fact(3)])
    h = Harness(tmp_path)
    route_without_applying(h, path, [1, 2, 3])
    h.close()
    again = Harness(tmp_path, gist=fragile_gist_state)  # opening the pool compresses the queued three
    assert again.run(again.file(path)) == 1
    stages = again.stages()
    assert {i: r.stage for i, r in stages.items()} == {1: "applied", 2: "failed", 3: "applied"}
    assert any("retried one by one" in e["text"] for e in again.events("note"))
    again.close()


def test_stale_leases_are_taken_over_and_a_live_one_is_left_alone(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2), fact(3)])
    h = Harness(tmp_path)
    loop = h.loop(h.file(path))
    loop._ingest()  # stored, stage rows written; now lease them as three other processes would have
    host = socket.gethostname()
    leases = {1: ("elsewhere:1:dead", time.time() - 1),  # another host, expired
              2: (f"{host}:99999999:gone", time.time() + 600),  # this host, a pid that does not run
              3: (f"{host}:{os.getpid()}:other", time.time() + 600)}  # a live process, not this loop
    with h.store.transaction() as s:
        for fact_id, (owner, until) in leases.items():
            row = s.get(Stage, fact_id)
            row.lease_owner, row.lease_until = owner, until
    assert loop.run() == 0
    stages = h.stages()
    assert stages[1].stage == stages[2].stage == "applied" and stages[1].takeovers == stages[2].takeovers == 1
    assert stages[3].stage == "stored" and stages[3].lease_owner == leases[3][0]  # untouched
    with h.store.transaction() as s:
        taken = [d["from"] for d in s.scalars(select(Event.detail).where(Event.kind == "lease_taken_over"))]
    assert sorted(taken) == sorted([leases[1][0], leases[2][0]])
    h.close()


def test_sigterm_finishes_the_current_step_records_it_and_exits_0(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(i, subject=False) for i in range(1, 6)])

    def during(request):
        if request.target == "word2":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of this edit

    h = Harness(tmp_path, editor=lambda model: FakeEditor(model, during=during), until_idle=False)
    assert h.run(h.file(path)) == 0
    stages = h.stages()
    assert [stages[i].stage for i in range(1, 6)] == ["applied", "applied", "routed", "routed", "routed"]
    assert all(r.lease_owner is None for r in stages.values())  # nothing left claimed
    assert h.events("stopped")[0]["stopped"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    h.close()
    again = Harness(tmp_path)
    assert again.run(again.file(path)) == 0
    assert {r.stage for r in again.stages().values()} == {"applied"}
    assert again.editor.calls == ["word3", "word4", "word5"]  # the applied two were not redone
    assert all(v == [("ice", "applied")] for v in edit_rows(again.store).values())
    again.close()


def test_an_edit_committed_before_a_kill_completes_its_stage_instead_of_being_redone(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False), fact(2)])
    h = Harness(tmp_path, until_idle=False)
    from agent.loop import stages as steps

    route_without_applying(h, path, [1, 2])
    facts = steps.load_facts(h.store, [1, 2])  # apply both as the editors do, and "die" before the stages move
    h.state.apply(facts[1], h.editor, "ice")
    h._open_gist().add([facts[2]])
    assert {r.stage for r in h.stages().values()} == {"routed"}
    h.close()
    again = Harness(tmp_path)
    assert again.run(again.file(path)) == 0
    assert {r.stage for r in again.stages().values()} == {"applied"}
    assert again.editor.calls == [] and edit_rows(again.store) == {1: [("ice", "applied")], 2: [("gist", "applied")]}
    assert all(e["recovered"] for e in again.events("fact"))
    again.close()


def test_superseded_facts_are_dropped_or_taken_out_and_the_rag_index_follows(tmp_path):
    from memory.embeddings import HashEmbedder
    from memory.vector import VectorIndex

    path = tmp_path / "facts.jsonl"
    rag = VectorIndex(HashEmbedder(64), directory=tmp_path / "rag")
    write(path, [fact(1, target="Oslo"), fact(2, subject=False, target="red")])
    h = Harness(tmp_path, rag=rag, read_lines=1)
    assert h.run(h.file(path)) == 0
    assert set(rag._ids) == {1, 2}
    write(path, [fact(1, target="Rome"), fact(3, target="Lima"), fact(3, target="Kyiv")], mode="a")
    loop = h.loop(h.file(path))
    loop._ingest(), loop._ingest()  # fact 3 (Lima) is stored with its stage, then superseded before its turn
    assert loop.run() == 0
    stages = h.stages()
    assert {i: r.stage for i, r in stages.items()} == {1: "applied", 2: "applied", 3: "applied", 4: "dropped",
                                                       5: "applied"}
    assert "superseded" in stages[4].error
    assert sorted(h.gist.memory.pool.fact_ids) == [3, 5]  # Oslo left the pool when Rome arrived
    assert set(rag._ids) == {2, 3, 5}
    h.close()


def test_an_idle_agent_compacts_the_pool_segments_a_long_run_piled_up(tmp_path, monkeypatch):
    from editors.incomes import segments

    monkeypatch.setattr(segments, "COMPACT_SEGMENTS", 3)  # instead of 64: a few rounds pile up enough
    path = tmp_path / "facts.jsonl"
    write(path, [fact(i) for i in range(1, 7)])
    h = Harness(tmp_path, read_lines=1, batch=1)  # one fact a round: one segment each
    assert h.run(h.file(path)) == 0
    manifest = h.gist.segments.manifest()
    # Merged while the agent ran (not only on open): never more than the limit, the first holds several.
    assert len(manifest["segments"]) <= 3 and manifest["segments"][0]["rows"] > 1, manifest["segments"]
    assert [e["text"] for e in h.events("note") if "compacted" in e["text"]]
    assert sorted(h.gist.memory.pool.fact_ids) == [1, 2, 3, 4, 5, 6]
    reopened = new_gist_state(h.store)
    assert reopened.open() == 6 and sorted(reopened.memory.pool.fact_ids) == [1, 2, 3, 4, 5, 6]
    reopened.memory.close()
    h.close()


def test_with_the_real_router_a_fact_replacing_one_in_the_weights_is_routed_after_it(tmp_path):
    from agent.router import RoutePolicy, Router

    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False, target="red")])
    h = Harness(tmp_path)
    h.backends.router = Router(RoutePolicy(subjectless_route="ice"))
    assert h.run(h.file(path)) == 0
    write(path, [fact(1, subject=False, target="blue")], mode="a")
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("ice", "rolled_back")], 2: [("ice", "applied")]}
    write(path, [fact(1, subject=False, target="red")], mode="a")  # the old value again: fact 1 is reactivated
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("ice", "rolled_back"), ("ice", "applied")], 2: [("ice", "rolled_back")]}
    assert {i: r.stage for i, r in h.stages().items()} == {1: "applied", 2: "applied"}
    with h.store.transaction() as s:
        rules = [d["inputs"]["rule"] for d in s.scalars(select(Event.detail).where(Event.kind == "routed")
                                                         .order_by(Event.id))]
    assert rules == ["no_subject", "supersede", "supersede"]  # the router saw each stale edit: rollbacks come after
    h.close()


# -- the view and the command -------------------------------------------------------------------------------
def test_the_live_view_shows_rate_queue_routes_and_model_version():
    from rich.console import Console

    buffer = io.StringIO()
    view = LiveView(Console(file=buffer, force_terminal=True, width=120))
    view.tick(Snapshot({"stored": 3, "applied": 2}, {"gist": 2}, 7, pool=2))
    view.fact(FactReport(9, "applied", "gist", "has a subject", ["stored", "applied"], 0.1, 0, None, 7))
    view.close({"stopped": "idle", "stored": 5, "applied": 2, "failed": 0, "dropped": 0, "rejected": 0,
                "routes": {"gist": 2}, "model_version": 7})
    text = buffer.getvalue()
    for expected in ("facts/min", "stored 3", "gist 2", "version 7", "gist pool 2", "fact 9 applied via gist",
                     "periodic evaluation is off"):
        assert expected in text, expected


def test_the_live_view_shows_the_last_evaluation():
    from rich.console import Console

    buffer = io.StringIO()
    view = LiveView(Console(file=buffer, force_terminal=True, width=120))
    view.tick(Snapshot({"applied": 0}, {}, 0, evaluating=True))
    view.tick(Snapshot({"applied": 50}, {"gist": 50}, 0, evaluating=True,
                       last_eval={"n_edits": 50, "retention_tf": 0.98, "locality": 0.9125, "eval_seconds": 3.0}))
    view.close({"stopped": "idle", "stored": 50, "applied": 50, "failed": 0, "dropped": 0, "rejected": 0,
                "routes": {"gist": 50}, "model_version": 0})
    text = buffer.getvalue()
    assert "none yet" in text and "at 50 applied: retention_tf 0.980  locality 0.912" in text


def test_engram_run_on_a_tiny_saved_model(tmp_path, capsys):
    from agent.cli import main

    model, addon = save_tiny_model(tmp_path)
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), {"prompt": "x", "target": 3}, fact(2)])
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    args = ["run", "--source", str(path), "--db", db, "--model", str(model), "--device", "cpu",
            "--gist-addon", str(addon), "--no-rag", "--until-idle", "--json",
            "--no-verify"]  # the tiny model learns nothing: checks and retries are tests/test_agent_verify.py's
    assert main(args) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["line"], e["reason"]) for e in lines if e["event"] == "rejected"] == [
        (2, "field 'target' must be a string, got int")]
    assert sorted((e["fact_id"], e["route"]) for e in lines if e["event"] == "fact") == [(1, "gist"), (2, "gist")]
    assert event_kinds(FactStore(db))["verified"] == 0  # --no-verify: no check made
    assert main(args) == 0  # nothing new: nothing read twice, exit 0
    assert [e["event"] for e in map(json.loads, capsys.readouterr().out.splitlines())] == ["stopped"]
    other = tmp_path / "other.sqlite"
    assert main(["run", "--source", str(tmp_path / "nope.jsonl"), "--db", f"sqlite:///{other}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err and not other.exists()  # before any store
