"""Real `kill -9`: a worker process is SIGKILLed at chosen moments of a rollback with re-edits, of
`engram edit`'s sequential edits and of the gist pool's open/add, and the next process must find no
accepted fact lost, no edit applied twice, and a model state that loads and matches a clean run.

How the kills land where they should, on a fast machine or a slow one:
- Workers are forked from one "zygote" process (started once for the module; it imports torch and
  the project and runs no torch op, so forking it is safe), so a worker starts in milliseconds.
- A worker reports every step that persists something to a trace file, one numbered event per line:
  `edit-start`/`edit-done` (the fake editor, which sleeps EDIT_SLEEP_S inside so kills can land in it),
  `compress-start`/`compress-done` (the gist compression, also slowed), `temp-written` (a delta or
  pool file written beside its target, not yet renamed), `renamed` (it is in place), and
  `commit-before`/`commit-after` around every database commit that writes.
- An uninterrupted run of the same job gives the full event list and the reference result. The kill
  plan then picks, deterministically, one occurrence of each event kind (rotating which occurrence,
  so different edits are hit), plus the first and the last event: the worker is told to stop at that
  event (it writes FROZEN and sleeps) and is killed there. Two more kills come a short jitter after an
  event (inside a slow edit, or just after a rename), so moments between the probes are hit too.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sqlalchemy import event, exists, select
from sqlalchemy.orm import Session

from editors.model import tiny_llama
from editors.state import ModelState
from memory.facts import FactInput
from memory.models import Edit, Fact
from memory.store import FactStore
from tests.fakes import ScaleEditor, add_targets, new_gist_state, slow_compression, weights, writer_state, zygote

EDIT_SLEEP_S = 0.03  # how long one worker-side edit (or gist compression) takes
WORKER_TIMEOUT_S = 90.0
TARGETS = ("alpha", "beta", "gamma", "delta", "epsilon")


# -- the worker side: probes, jobs, the zygote -------------------------------------------------------------
class Probe:
    """Numbers and writes every persisting step to the trace file (unbuffered, O_APPEND); at event number
    `freeze` it writes FROZEN and waits for its SIGKILL."""

    def __init__(self, trace: str, freeze: int | None):
        self.fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.freeze, self.n = freeze, 0
        self._dirty = self._committing = False
        self._file = "?"

    def __call__(self, name: str) -> None:
        os.write(self.fd, f"{self.n} {name}\n".encode())
        if self.n == self.freeze:
            os.write(self.fd, b"FROZEN\n")
            time.sleep(WORKER_TIMEOUT_S)  # the parent kills it long before; never a stray process
            os._exit(3)
        self.n += 1

    def done(self) -> None:
        os.write(self.fd, b"DONE\n")

    def install(self, store: FactStore) -> None:
        """Probes around the atomic file writes and around every database commit that writes."""
        import memory.atomic as atomic

        fsync, fsync_dir = atomic._fsync, atomic._fsync_dir

        def temp_written(path):  # called on the temp file once written, before its fsync and rename
            self._file = Path(path).name[1:].rsplit(".", 2)[0]
            self(f"temp-written {self._file}")
            fsync(path)

        def renamed(directory):  # called on the directory after the rename
            fsync_dir(directory)
            self(f"renamed {self._file}")

        atomic._fsync, atomic._fsync_dir = temp_written, renamed

        @event.listens_for(store.engine, "before_cursor_execute")
        def _write(conn, cursor, statement, *_):
            if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
                self._dirty = True

        @event.listens_for(store.engine, "rollback")
        def _rolled_back(conn):
            self._dirty = False

        @event.listens_for(store.engine, "commit")
        def _commit(conn):  # before the DBAPI commit
            if self._dirty:
                self._dirty, self._committing = False, True
                self("commit-before")

        @event.listens_for(Session, "after_commit")
        def _committed(session):
            if self._committing:
                self._committing = False
                self("commit-after")


def job_rollback(cfg: dict, probe: Probe) -> None:
    _, state = writer_state(cfg["url"], probe)
    state.rollback(cfg["fact"], editors={"ftm": ScaleEditor(state.model, probe=probe, sleep_s=EDIT_SLEEP_S)})
    state.close()


def job_edit(cfg: dict, probe: Probe) -> None:
    _, state = writer_state(cfg["url"], probe)
    editor = ScaleEditor(state.model, probe=probe, sleep_s=EDIT_SLEEP_S)
    for fact in state.pending_facts():
        assert state.apply(fact, editor, "ftm").ok
    state.close()


def job_gist(cfg: dict, probe: Probe) -> None:
    store = FactStore(cfg["url"])
    probe.install(store)
    state = slow_compression(new_gist_state(store), probe, EDIT_SLEEP_S)
    state.open()  # compresses the facts queued before this process
    ingest_gist_batches(store, state)


JOBS = {"rollback": job_rollback, "edit": job_edit, "gist": job_gist}


def _worker(cmd: dict) -> None:
    """In the forked child: run one job; never returns."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)  # the zygote's stdout is its reply channel
        probe = Probe(cmd["trace"], cmd["freeze"])
        JOBS[cmd["job"]](cmd["cfg"], probe)
        probe.done()
        code = 0
    except BaseException:
        Path(cmd["trace"] + ".err").write_text(traceback.format_exc())
    finally:
        os._exit(code)


def _zygote() -> None:
    """Started by the `workers` fixture: one JSON command per stdin line, one JSON reply per line.
    {"op": "run", ...} forks a worker and replies its pid; {"op": "wait", "pid": P} reaps it and replies
    its exit code (-9 for a SIGKILL)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401  (preload)

    import editors.gist_state  # noqa: F401
    import editors.incomes  # noqa: F401

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            pid = os.fork()
            if pid == 0:
                _worker(cmd)
            reply = pid
        else:
            reply = os.waitstatus_to_exitcode(os.waitpid(cmd["pid"], 0)[1])
        print(json.dumps(reply), flush=True)


# -- the parent side ------------------------------------------------------------------------------------------
@dataclass
class Run:
    events: list[str]  # the names of the events the worker reported, in order
    killed: bool
    rc: int
    plan: dict


class Workers:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log
        self.ready = False  # the zygote imports while the test builds its template store

    def _reply(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote died; its stderr:\n{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def _ask(self, cmd: dict):
        if not self.ready:
            assert self._reply() == "ready"
            self.ready = True
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def run(self, job: str, cfg: dict, freeze: int | None = None, trigger: int | None = None,
            jitter_s: float = 0.0) -> Run:
        """Run `job` in a fresh worker: to the end, or killed at event `freeze` (stopped there), or killed
        `jitter_s` after event `trigger` was reported."""
        trace = Path(cfg["dir"]) / "trace"
        err = Path(str(trace) + ".err")
        pid = self._ask({"op": "run", "job": job, "cfg": cfg, "trace": str(trace), "freeze": freeze})
        deadline, killed = time.monotonic() + WORKER_TIMEOUT_S, False
        while True:
            lines = trace.read_text().splitlines() if trace.exists() else []
            if "FROZEN" in lines or (trigger is not None and len(_events(lines)) > trigger):
                if trigger is not None:
                    time.sleep(jitter_s)
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            if "DONE" in lines or err.exists():
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                self._ask({"op": "wait", "pid": pid})
                raise AssertionError(f"worker {job} {cfg} hung; trace: {lines[-5:]}")
            time.sleep(0.001 if trigger is not None else 0.005)
        rc = self._ask({"op": "wait", "pid": pid})
        if err.exists():
            raise AssertionError(f"worker {job} failed:\n{err.read_text()}")
        assert rc == (-signal.SIGKILL if killed else 0) or (rc == 0 and trigger is not None), (rc, killed)
        lines = trace.read_text().splitlines()
        if freeze is not None:
            assert lines[-1] == "FROZEN" and len(_events(lines)) == freeze + 1
        return Run(_events(lines), killed and rc != 0, rc,
                   {"freeze": freeze, "trigger": trigger, "jitter_s": jitter_s})


def _events(lines: list[str]) -> list[str]:
    return [line.split(" ", 1)[1] for line in lines if line[:1].isdigit()]


def _kind(name: str) -> str:
    return name.split(" ", 1)[0]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with zygote(tmp_path_factory) as (proc, log):
        yield Workers(proc, log)


def kill_plan(events: list[str], slow_kind: str) -> list[dict]:
    """One occurrence of each event kind (rotating which), the first and last event, then two jittered
    kills: halfway into a slow step, and just after a rename."""
    kinds = list(dict.fromkeys(_kind(e) for e in events))
    frozen = {0, len(events) - 1}
    for i, kind in enumerate(kinds, start=1):
        occurrences = [j for j, e in enumerate(events) if _kind(e) == kind]
        frozen.add(occurrences[i % len(occurrences)])
    plans = [{"freeze": j} for j in sorted(frozen)]
    slow = [j for j, e in enumerate(events) if _kind(e) == slow_kind]
    renames = [j for j, e in enumerate(events) if _kind(e) == "renamed"]
    plans.append({"trigger": slow[len(slow) // 2], "jitter_s": EDIT_SLEEP_S / 2})
    plans.append({"trigger": renames[-2], "jitter_s": 0.001})
    return plans


def template(tmp_path: Path, name: str, build) -> Path:
    """A store built once by `build(store)`; each run gets a copy of its directory."""
    root = tmp_path / name
    root.mkdir()
    store = FactStore(f"sqlite:///{root / 'store.sqlite'}")
    build(store)
    store.engine.dispose()  # the last connection closes: the WAL is checkpointed into the file
    return root


def copy_of(root: Path, name: str) -> dict:
    target = root.parent / name
    shutil.copytree(root, target)
    return {"dir": str(target), "url": f"sqlite:///{target / 'store.sqlite'}"}


def killed_runs(workers: Workers, job: str, root: Path, ref: Run, slow_kind: str, **extra):
    """`job` run on a fresh copy of the template `root` (its cfg with `extra`) for each kill of the plan for
    the uninterrupted run `ref`: yields (i, plan, cfg, run), once the run has stopped where the plan said."""
    plans = kill_plan(ref.events, slow_kind)
    assert 8 <= len(plans) <= 10, plans
    for i, plan in enumerate(plans):
        cfg = {**copy_of(root, f"kill{i}"), **extra}
        run = workers.run(job, cfg, **plan)
        assert run.events == ref.events[:len(run.events)], plan  # it stopped where the plan said
        yield i, plan, cfg, run


def assert_close(a: dict, b: dict, what: str) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{what}: {k} differs"


def weight_rows(url: str) -> dict[int, list[str]]:
    """fact id -> the statuses of its weight edits, oldest first (facts without any: absent)."""
    store = FactStore(url)
    with store.transaction() as s:
        rows = s.execute(select(Edit.fact_id, Edit.status).where(Edit.backend != "gist").order_by(Edit.id)).all()
    store.engine.dispose()
    out: dict[int, list[str]] = {}
    for fact_id, status in rows:
        out.setdefault(fact_id, []).append(status)
    return out


def committed(run: Run) -> int:
    """How many writing commits the worker completed before it was stopped."""
    return run.events.count("commit-after")


def reader_rebuild(url: str) -> dict[str, torch.Tensor]:
    """A fresh reader (`ask`) right away: the recorded deltas all load and verify."""
    store = FactStore(url)
    state = ModelState(store, tiny_llama())
    state.rebuild(sweep=False)
    store.engine.dispose()
    return weights(state.model)


def recover_weights(url: str, rollback_fact: int | None = None, grace_s: float | None = None) -> tuple[dict, bool]:
    """The next process: a writer rebuilds (`grace_s` 0: it comes after the orphan grace and sweeps what
    the killed writer left); the rollback is run again if it never committed (the user repeats the
    command), then `engram edit` applies the pending facts. Then a third process rebuilds and must get the
    very same weights. Returns (weights, whether the rollback had to be run again)."""
    store = FactStore(url)
    state = ModelState(store, tiny_llama())
    if grace_s is not None:
        state.orphan_grace_s = grace_s
    state.acquire_writer()
    state.rebuild()
    editor = ScaleEditor(state.model)
    again = False
    if rollback_fact is not None:
        with store.transaction() as s:
            again = bool(s.scalar(select(exists().where(Edit.fact_id == rollback_fact, Edit.status == "applied",
                                                        Edit.backend != "gist"))))
        if again:
            state.rollback(rollback_fact, editors={"ftm": editor})
    for fact in state.pending_facts():
        assert state.apply(fact, editor, "ftm").ok
    assert state.pending_facts() == []
    state.close()
    live = weights(state.model)
    if grace_s == 0:  # what the killed writer left (a temp file, an uncommitted delta) is gone
        with store.transaction() as s:
            known = {Path(a).name for a in s.scalars(select(Edit.artifact).where(Edit.artifact.is_not(None)))}
        assert {p.name for p in state.delta_dir.iterdir()} <= known
    store.engine.dispose()
    third = reader_rebuild(url)
    assert all(torch.equal(third[k], live[k]) for k in live), "a fresh rebuild differs from the live model"
    return live, again


# -- 1. rollback with re-edits ---------------------------------------------------------------------------
def _applied_five(store: FactStore) -> None:
    add_targets(store, *TARGETS)
    state = ModelState(store, tiny_llama())
    editor = ScaleEditor(state.model)
    for fact in state.pending_facts():
        assert state.apply(fact, editor, "ftm").ok
    state.close()


def test_sigkill_during_a_rollback_with_re_edits_loses_no_fact_and_applies_none_twice(workers, tmp_path):
    root = template(tmp_path, "template", _applied_five)
    ref_cfg = copy_of(root, "ref")
    start = weight_rows(ref_cfg["url"])
    assert len(start) == 5 and all(v == ["applied"] for v in start.values())
    ids = sorted(start)
    first, target, later = ids[0], ids[1], ids[2:]
    ref_cfg["fact"] = target
    ref = workers.run("rollback", ref_cfg)
    assert not ref.killed and ref.events[:2] == ["commit-before", "commit-after"]
    assert [e for e in ref.events if _kind(e) == "edit-start"] == [f"edit-start {t}" for t in TARGETS[2:]]
    reference = reader_rebuild(ref_cfg["url"])

    for i, plan, cfg, run in killed_runs(workers, "rollback", root, ref, "edit-start", fact=target):
        reader_rebuild(cfg["url"])  # the state right after the kill already loads
        rows = weight_rows(cfg["url"])
        if run.killed and plan.get("freeze") is not None:  # exactly what had committed is in the store
            n = committed(run)
            if n == 0:
                assert rows == start, plan
            else:
                assert rows[target] == ["rolled_back"], plan
                done, due = ["rolled_back", "applied"], ["rolled_back", "pending"]  # re-edited, or still owed
                assert [rows[f] for f in later] == [done] * (n - 1) + [due] * (len(later) - n + 1), (plan, rows)
        live, again = recover_weights(cfg["url"], rollback_fact=target, grace_s=0.0 if i % 2 else None)
        assert again == (committed(run) == 0 and run.killed), plan  # the rollback itself is all or nothing
        rows = weight_rows(cfg["url"])
        assert rows[first] == ["applied"], plan  # the earlier edit was never touched
        assert rows[target] == ["rolled_back"], plan
        for fact_id in later:  # one applied edit each: the re-edit (no pending row, no second one)
            assert rows[fact_id] == ["rolled_back", "applied"], (plan, rows)
        assert_close(live, reference, f"kill plan {plan}")


# -- 2. `engram edit`: sequential application ---------------------------------------------------------------
def _one_applied_four_due(store: FactStore) -> None:
    ids = add_targets(store, *TARGETS)
    state = ModelState(store, tiny_llama())
    assert state.apply(store.get_fact(ids[0]), ScaleEditor(state.model), "ftm").ok
    state.close()


def test_sigkill_during_sequential_edits_applies_every_fact_exactly_once(workers, tmp_path):
    root = template(tmp_path, "template", _one_applied_four_due)
    ref_cfg = copy_of(root, "ref")
    ref = workers.run("edit", ref_cfg)
    assert [e for e in ref.events if _kind(e) == "edit-start"] == [f"edit-start {t}" for t in TARGETS[1:]]
    reference = reader_rebuild(ref_cfg["url"])
    rows = weight_rows(ref_cfg["url"])
    assert list(rows.values()) == [["applied"]] * 5
    ids = sorted(rows)

    for i, plan, cfg, run in killed_runs(workers, "edit", root, ref, "edit-start"):
        reader_rebuild(cfg["url"])
        if run.killed and plan.get("freeze") is not None:
            rows = weight_rows(cfg["url"])
            assert sorted(rows) == ids[:1 + committed(run)], plan  # each commit recorded one fact, in order
            assert all(v == ["applied"] for v in rows.values()), plan
        live, _ = recover_weights(cfg["url"], grace_s=0.0 if i % 2 else None)
        rows = weight_rows(cfg["url"])
        assert sorted(rows) == ids and all(v == ["applied"] for v in rows.values()), (plan, rows)
        assert_close(live, reference, f"kill plan {plan}")


# -- 3. the gist pool: open and add with pending gist rows ----------------------------------------------------
GIST_SETUP = [  # (batch, ...) ingested with pending gist rows before the worker starts
    [FactInput(prompt="Ann lives in", target="Oslo", subject="Ann", relation="lives in"),
     FactInput(text="Bob's dog is called Rex.", scope="user", user_id="bob")],
]
GIST_QUEUED = [
    [FactInput(prompt="Cid works at", target="Acme", subject="Cid", relation="works at"),
     FactInput(text="Dee plays the cello."),
     FactInput(prompt="Eve was born in", target="Lima", subject="Eve", relation="was born in")],
    [FactInput(prompt="Eve was born in", target="Kyiv", subject="Eve", relation="was born in")],  # supersedes
]
GIST_BATCHES = [  # what the worker ingests, as `engram ingest --route gist` does, one batch after another
    [FactInput(prompt="Fay drives a", target="Volvo", subject="Fay", relation="drives a"),
     FactInput(text="Gus keeps bees.", scope="user", user_id="gus")],
    [FactInput(prompt="Cid works at", target="Initech", subject="Cid", relation="works at"),  # Cid's is stale
     FactInput(prompt="Ivy speaks", target="Welsh", subject="Ivy", relation="speaks")],
]


def ingest_gist_batches(store: FactStore, state) -> None:
    """`engram ingest --route gist` per batch (agent/commands/facts.py): queue, drop stale rows, add."""
    for batch in GIST_BATCHES:
        report = store.add_facts(batch, pending_backend="gist")
        for old in state.stale():
            state.remove(old, reason="superseded or deleted")
        state.add([f for f in (store.get_fact(i) for i in report.fact_ids) if f.status == "active"])


def _gist_template(store: FactStore) -> None:
    for batch in GIST_SETUP:
        store.add_facts(batch, pending_backend="gist")
    state = new_gist_state(store)
    assert state.open() == 2
    state.memory.close()
    for batch in GIST_QUEUED:
        store.add_facts(batch, pending_backend="gist")


def reopen_gist(url: str):
    """The next process opens the pool; every accepted gist fact is in it exactly once, with one applied
    row; nothing is pending; the files on disk hold the same facts."""
    store = FactStore(url)
    state = new_gist_state(store)
    state.open()
    pool = state.memory.pool.fact_ids
    assert len(pool) == len(set(pool)), pool
    with store.transaction() as s:
        rows = s.execute(select(Edit.fact_id, Edit.status).where(Edit.backend == "gist")).all()
        status = dict(s.execute(select(Fact.id, Fact.status)).all())
    assert "pending" not in {st for _, st in rows}, rows
    applied = Counter(fid for fid, st in rows if st == "applied")
    assert set(applied.values()) <= {1}, rows
    assert set(pool) == set(applied), (pool, rows)
    queued = {fid for fid, _ in rows}
    assert {fid for fid in queued if status[fid] == "active"} <= set(applied), rows  # no accepted fact lost
    assert sorted(state.segments.load().fact_ids) == sorted(pool)
    return store, state


def pool_rows(store: FactStore, state) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """statement -> (keys, values) of its pool row."""
    view = state.memory.pool.view_all()
    assert view.keys.shape[1] == len(view.fact_ids)
    return {store.get_fact(fid).statement: (view.keys[:, i].clone(), view.values[:, i].clone())
            for i, fid in enumerate(view.fact_ids)}


def test_sigkill_during_gist_open_and_add_keeps_every_queued_fact_once(workers, tmp_path):
    from editors.incomes.segments import PoolSegments

    root = template(tmp_path, "template", _gist_template)
    ref_cfg = copy_of(root, "ref")
    ref = workers.run("gist", ref_cfg)
    assert {_kind(e) for e in ref.events} >= {"compress-start", "temp-written", "renamed", "commit-before"}
    store, state = reopen_gist(ref_cfg["url"])
    reference, ref_counts = pool_rows(store, state), store.counts()["edits"]
    assert len(reference) == 8 and ref_counts == {"gist": {"applied": 8, "rolled_back": 2}}
    state.memory.close()
    store.engine.dispose()

    for _, plan, cfg, _ in killed_runs(workers, "gist", root, ref, "compress-start"):
        PoolSegments(Path(cfg["dir"]) / "store.engram" / "gist" / "pool").load()  # loads right after the kill
        store, state = reopen_gist(cfg["url"])
        ingest_gist_batches(store, state)  # the user runs the interrupted ingests again
        got = pool_rows(store, state)
        assert sorted(got) == sorted(reference), plan
        for statement, (keys, values) in got.items():
            assert torch.allclose(keys, reference[statement][0], atol=1e-5), (plan, statement)
            assert torch.allclose(values, reference[statement][1], atol=1e-5), (plan, statement)
        assert store.counts()["edits"] == ref_counts, plan
        state.memory.close()
        store.engine.dispose()
