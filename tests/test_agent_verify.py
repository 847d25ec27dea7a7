"""Verified routing in the agent loop (issue 22 item 2): every applied fact is checked once, a fact its route
did not learn is retried once on the other route (the failed route undone first), scoped and text facts
never move into the weights, and kills around the check neither lose the check nor queue a retry twice.

Tiny models as in tests/test_agent_loop.py (its Harness, fake weight editor and tiny gist add-on), the real
Router, and a fake check that says "learned" only when the fact really is on that route (its weight edit
applied, or its gist in the pool for its user) and its target is not one the route is told to miss. The
real greedy check runs once on the tiny models (they learn nothing, so everything that may move is retried).
Kills: raised (a BaseException the loop does not catch) at chosen lines, then a real SIGKILL at the
commits and pool writes around failing checks, with the machinery of tests/test_kill.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from agent.loop.verify import ModelVerifier
from agent.router import RoutePolicy, Router, Verification, explain, route_counts
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.models import Edit, Event, Stage
from memory.store import FactStore
from tests.fakes import (
    LAST_MLP, FakeEditor, new_gist_state, run_quiet_loop, save_tiny_model, scale, writer_state, zygote,
)
from tests.test_agent_kill import pool_rows, restart_cfg, stream_cfg, stream_template
from tests.test_agent_loop import Harness, edit_rows, event_kinds, fact, write
from tests.test_kill import Workers, assert_close, reader_rebuild


class Killed(BaseException):
    """A SIGKILL stand-in: no `except Exception` in the loop catches it, and nothing after it runs."""


class FakeVerifier:
    """`misses`: route -> targets that route does not learn. Learned = on the route for real, and not missed."""

    def __init__(self, store, misses: dict[str, set[str]] | None = None):
        self.store, self.misses, self.calls = store, misses or {}, []

    def check(self, fact, route: str, gist) -> Verification:
        self.calls.append((fact.id, route))
        if not fact.prompt:
            return Verification(None, "", None, None, note="no prompt/target to check (a text-only fact)")
        if route == "gist":
            with gist.memory.reading(fact.user_id):  # the pool as the fact's user reads it
                there = fact.id in gist.memory.pool.view(fact.user_id).fact_ids
        else:
            with self.store.transaction() as s:
                there = s.scalar(select(Edit.id).where(Edit.fact_id == fact.id, Edit.status == "applied",
                                                       Edit.backend != "gist")) is not None
        ok = there and fact.target not in self.misses.get(route, set())
        return Verification(ok, fact.target if ok else "something else", fact.prompt, fact.target)


def retrying(**changes) -> RoutePolicy:
    """The policy these tests exercise: subjectless facts to ICE, and one retry on the other route (both off
    by default since the three-policy measurement)."""
    return RoutePolicy(subjectless_route="ice", retry_other_route=True, **changes)


def harness(tmp_path: Path, misses=None, policy: RoutePolicy | None = None, **kw) -> Harness:
    h = Harness(tmp_path, **kw)
    h.backends.router = Router(policy or retrying())
    h.backends.verifier = FakeVerifier(h.store, misses)
    return h


def checks(store, fact_id: int) -> list[tuple[str, bool | None]]:
    with store.transaction() as s:
        rows = s.scalars(select(Event.detail).where(Event.fact_id == fact_id, Event.kind == "verified")
                         .order_by(Event.id))
        return [(d["route"], d["ok"]) for d in rows]


def retries(store, fact_id: int) -> int:
    with store.transaction() as s:
        rows = s.scalars(select(Event.detail).where(Event.fact_id == fact_id, Event.kind == "routed"))
        return sum(bool(d["inputs"].get("retry_of")) for d in rows)


def expected_weights(*targets: str) -> torch.Tensor:
    """The fake editor's last-layer weight after editing exactly these targets (its edits commute)."""
    param = dict(tiny_llama().named_parameters())[LAST_MLP[0]].detach().clone()
    for target in targets:
        scale([param], target)
    return param


def live_weight(h: Harness) -> torch.Tensor:
    return dict(h.state.model.named_parameters())[LAST_MLP[0]].detach()


def rebuilt_weight(h: Harness) -> torch.Tensor:
    state = ModelState(h.store, tiny_llama())
    state.rebuild(sweep=False)
    return dict(state.model.named_parameters())[LAST_MLP[0]].detach()


# -- checked, learned ------------------------------------------------------------------------------------
def test_a_fact_its_route_learns_is_verified_and_not_retried(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2, subject=False)])
    h = harness(tmp_path)
    assert h.run(h.file(path)) == 0
    facts = {e["fact_id"]: e for e in h.events("fact")}
    assert {i: (e["route"], e["verified"]) for i, e in facts.items()} == {1: ("gist", True), 2: ("ice", True)}
    assert all(e["trail"] == ["stored", "contexts", "routed", "verifying", "applied"] for e in facts.values())
    assert checks(h.store, 1) == [("gist", True)] and checks(h.store, 2) == [("ice", True)]
    assert retries(h.store, 1) == retries(h.store, 2) == 0
    assert h.backends.verifier.calls == [(2, "ice"), (1, "gist")]  # the weight edit first, then the gist batch
    assert edit_rows(h.store) == {1: [("gist", "applied")], 2: [("ice", "applied")]}
    assert {r.stage for r in h.stages().values()} == {"applied"}
    stopped = h.events("stopped")[0]
    assert (stopped["verified"], stopped["not_learned"], stopped["retried"]) == (2, 0, 0)
    counts = route_counts(h.store)
    assert counts["ice"]["applied"] == counts["ice"]["verified"] == 1
    assert counts["gist"]["applied"] == counts["gist"]["verified"] == 1
    h.close()


# -- not learned: one retry on the other route ---------------------------------------------------------------
def test_an_ice_fact_not_learned_is_rolled_back_and_retried_on_gist(tmp_path, capsys):
    from agent.cli import main

    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False), fact(2, subject=False, target="Deaf"), fact(3, subject=False)])
    h = harness(tmp_path, misses={"ice": {"Deaf"}})
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("ice", "applied")], 2: [("ice", "rolled_back"), ("gist", "applied")],
                                  3: [("ice", "applied")]}
    assert checks(h.store, 2) == [("ice", False), ("gist", True)] and retries(h.store, 2) == 1
    # The failed edit is out of the weights: live and rebuilt, they hold the edits of facts 1 and 3 only.
    assert torch.allclose(live_weight(h), expected_weights("word1", "word3"), atol=1e-6)
    assert torch.equal(rebuilt_weight(h), live_weight(h))
    assert sorted(h.gist.memory.pool.fact_ids) == [2]
    report = next(e for e in h.events("fact") if e["fact_id"] == 2)
    assert report["route"] == "gist" and report["verified"] is True
    assert report["trail"] == ["stored", "contexts", "routed", "verifying", "routed", "verifying", "applied"]
    assert any("fact 2: ice did not learn it" in e["text"] and "retrying on gist" in e["text"]
               for e in h.events("note"))
    out = explain(h.store, 2)
    assert out["outcome"]["route"] == "gist" and out["outcome"]["retried"] and out["outcome"]["verified"] is True
    assert out["outcome"]["summary"] == ("routed to ice: applied, not learned (answered 'something else', target "
                                         "'Deaf'), rolled back; retried on gist: applied, verified")
    h.close()
    db = ["--db", h.store.url]
    assert main(["route", "explain", "2", *db]) == 0
    text = capsys.readouterr().out
    assert "retry: ice did not learn it" in text and "outcome  gist: applied, verified (after a retry)" in text
    assert main(["status", *db, "--json"]) == 0
    routes = json.loads(capsys.readouterr().out)["routes"]
    assert routes["ice"] == {"routed": 2, "applied": 2, "verified": 2, "not_learned": 0, "retried": 0}
    assert routes["gist"] == {"routed": 1, "applied": 1, "verified": 1, "not_learned": 0, "retried": 1}


def test_a_gist_fact_not_learned_leaves_the_pool_and_is_retried_on_ice(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, target="Deaf"), fact(2)])
    h = harness(tmp_path, misses={"gist": {"Deaf"}})
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("gist", "rolled_back"), ("ice", "applied")], 2: [("gist", "applied")]}
    assert sorted(h.gist.memory.pool.fact_ids) == [2]  # the gist was removed before the weight edit
    assert checks(h.store, 1) == [("gist", False), ("ice", True)] and retries(h.store, 1) == 1
    assert torch.allclose(live_weight(h), expected_weights("Deaf"), atol=1e-6)
    with h.store.transaction() as s:
        removed = s.scalar(select(Event.detail).where(Event.fact_id == 1, Event.kind == "rolled_back"))
    assert removed == {"backend": "gist", "reason": "retried on ice: gist did not learn it"}
    assert explain(h.store, 1)["outcome"]["summary"].startswith("routed to gist: applied, not learned")
    h.close()


def test_a_fact_neither_route_learns_is_retried_once_only(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False, target="Deaf")])
    h = harness(tmp_path, misses={"ice": {"Deaf"}, "gist": {"Deaf"}})
    assert h.run(h.file(path)) == 0  # applied, not learned: not a failure
    assert checks(h.store, 1) == [("ice", False), ("gist", False)] and retries(h.store, 1) == 1
    assert edit_rows(h.store) == {1: [("ice", "rolled_back"), ("gist", "applied")]}  # the gist stays
    assert h.stages()[1].stage == "applied" and h.state.version == 2  # the edit, then its rollback
    out = explain(h.store, 1)
    assert out["verifications"][-1]["note"].startswith("not retried: already retried once (after ice")
    report = h.events("fact")[0]
    assert (report["route"], report["verified"]) == ("gist", False)
    stopped = h.events("stopped")[0]
    assert (stopped["verified"], stopped["not_learned"], stopped["retried"]) == (0, 1, 1)
    assert route_counts(h.store)["gist"] == {"routed": 1, "applied": 1, "verified": 0, "not_learned": 1, "retried": 1}
    # A new run finds nothing to do: the fact is not checked or retried again.
    assert h.run(h.file(path)) == 0 and retries(h.store, 1) == 1 and len(checks(h.store, 1)) == 2
    h.close()


def test_without_undo_the_failed_route_keeps_its_edit(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False, target="Deaf")])
    h = harness(tmp_path, misses={"ice": {"Deaf"}}, policy=retrying(undo_failed_route=False))
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("ice", "applied"), ("gist", "applied")]}
    assert h.stages()[1].route == "gist" and checks(h.store, 1) == [("ice", False), ("gist", True)]
    h.close()


def test_scoped_and_text_facts_are_never_moved_into_the_weights(tmp_path):
    path = tmp_path / "facts.jsonl"
    scoped = {**fact(1, target="Deaf"), "scope": "user", "user_id": "ann"}
    write(path, [scoped, {"text": "Ann keeps bees.", "scope": "global"}])
    h = harness(tmp_path, misses={"gist": {"Deaf"}}, policy=retrying(default_route="ice"))
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("gist", "applied")], 2: [("gist", "applied")]}
    assert h.state.version == 0 and h.editor.calls == []
    assert sorted(h.gist.memory.pool.fact_ids) == [1, 2] and h.gist.memory.pool.scope_of(1) == "ann"
    assert checks(h.store, 1) == [("gist", False)] and checks(h.store, 2) == [("gist", None)]
    assert retries(h.store, 1) == retries(h.store, 2) == 0
    notes = [v["note"] for v in explain(h.store, 1)["verifications"]]
    assert notes == ["not retried: user-scoped facts never go into the shared weights"]
    assert explain(h.store, 2)["verifications"][0]["note"] == "no prompt/target to check (a text-only fact)"
    assert {i: e["verified"] for i, e in ((e["fact_id"], e) for e in h.events("fact"))} == {1: False, 2: None}
    h.close()


def test_an_undo_with_later_facts_re_edits_them(tmp_path):
    """A fact checked after later weight edits landed (left at `verifying` by an earlier run): its rollback
    re-edits the later facts on the model without it, as `engram rollback` does."""
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False, target="Deaf"), fact(2, subject=False), fact(3, subject=False)])
    first = Harness(tmp_path)  # no check: all three applied
    assert first.run(first.file(path)) == 0
    with first.store.transaction() as s:
        s.get(Stage, 1).stage = "verifying"
    first.close()
    h = harness(tmp_path, misses={"ice": {"Deaf"}})
    assert h.run(h.file(path)) == 0
    assert edit_rows(h.store) == {1: [("ice", "rolled_back"), ("gist", "applied")],
                                  2: [("ice", "rolled_back"), ("ice", "applied")],
                                  3: [("ice", "rolled_back"), ("ice", "applied")]}
    assert h.editor.calls == ["word2", "word3"]
    assert torch.allclose(live_weight(h), expected_weights("word2", "word3"), atol=1e-6)
    h.close()


# -- the real check on the tiny models ------------------------------------------------------------------------
def test_the_real_greedy_check_on_tiny_models_retries_what_they_did_not_learn(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2, subject=False), {**fact(3), "scope": "user", "user_id": "ann"}])
    h = Harness(tmp_path)
    h.backends.router = Router(retrying())
    h.backends.verifier = ModelVerifier(h.state.model, tiny_tokenizer(), max_new_tokens=4)
    assert h.run(h.file(path)) == 0  # a random tiny model gives none of the targets
    assert checks(h.store, 1) == [("gist", False), ("ice", False)]
    assert checks(h.store, 2) == [("ice", False), ("gist", False)]
    assert checks(h.store, 3) == [("gist", False)]  # user-scoped: stays in the pool
    assert edit_rows(h.store) == {1: [("gist", "rolled_back"), ("ice", "applied")],
                                  2: [("ice", "rolled_back"), ("gist", "applied")], 3: [("gist", "applied")]}
    with h.store.transaction() as s:
        answers = [d["answer"] for d in s.scalars(select(Event.detail).where(Event.kind == "verified"))]
    assert all(isinstance(a, str) for a in answers)
    h.close()


# -- kills ----------------------------------------------------------------------------------------------------
def _kill_in_retry_commit(monkeypatch, h):
    import agent.loop.verify as verify

    queue = verify.queue_edit

    def dying(*args, **kwargs):
        queue(*args, **kwargs)
        raise Killed("inside the retry's transaction")

    monkeypatch.setattr(verify, "queue_edit", dying)


def _kill_in_undo(monkeypatch, h):
    def dying(*args, **kwargs):
        raise Killed("after the retry committed, before its undo")

    monkeypatch.setattr(h.state, "rollback", dying)


def _kill_before_retry_applied(monkeypatch, h):
    import agent.loop.apply as apply

    def dying(*args, **kwargs):
        raise Killed("after the undo, before the retry's apply")

    monkeypatch.setattr(apply.steps, "apply_gist", dying)


@pytest.mark.parametrize("kill, left", [
    (_kill_in_retry_commit, ("verifying", [("ice", "applied")])),  # nothing of the retry on record
    (_kill_in_undo, ("routed", [("ice", "applied"), ("gist", "pending")])),  # the retry on record, undo owed
    (_kill_before_retry_applied, ("routed", [("ice", "rolled_back"), ("gist", "pending")])),
])
def test_a_kill_around_the_retry_neither_loses_the_check_nor_queues_the_retry_twice(tmp_path, monkeypatch, kill,
                                                                                     left):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False), fact(2, subject=False, target="Deaf")])
    h = harness(tmp_path, misses={"ice": {"Deaf"}})
    with monkeypatch.context() as m:
        kill(m, h)
        with pytest.raises(Killed):
            h.run(h.file(path))
    assert (h.stages()[2].stage, edit_rows(h.store)[2]) == left
    assert retries(h.store, 2) == (left[0] == "routed")
    h.close()
    again = harness(tmp_path, misses={"ice": {"Deaf"}})  # a new process: the stages, rows and pool decide
    assert again.run(again.file(path)) == 0
    assert retries(again.store, 2) == 1
    assert edit_rows(again.store) == {1: [("ice", "applied")], 2: [("ice", "rolled_back"), ("gist", "applied")]}
    assert {r.stage for r in again.stages().values()} == {"applied"}
    assert torch.allclose(live_weight(again), expected_weights("word1"), atol=1e-6)
    assert torch.equal(rebuilt_weight(again), live_weight(again))
    assert sorted(again.gist.memory.pool.fact_ids) == [2]
    assert checks(again.store, 2) == [("ice", False), ("gist", True)] and event_kinds(again.store)["verified"] == 3
    # A check whose record a kill rolled back is made again; one on record is not.
    assert again.backends.verifier.calls == ([(2, "ice")] if kill is _kill_in_retry_commit else []) + [(2, "gist")]
    again.close()


def test_a_kill_during_the_undos_re_edits_is_finished_on_restart(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1, subject=False, target="Deaf"), fact(2, subject=False), fact(3, subject=False)])
    first = Harness(tmp_path)
    assert first.run(first.file(path)) == 0
    with first.store.transaction() as s:
        s.get(Stage, 1).stage = "verifying"
    first.close()

    def during(request):
        if request.target == "word3":
            raise Killed("in the re-edit of fact 3")

    h = harness(tmp_path, misses={"ice": {"Deaf"}}, editor=lambda model: FakeEditor(model, during=during))
    with pytest.raises(Killed):
        h.run(h.file(path))
    assert edit_rows(h.store)[3] == [("ice", "rolled_back"), ("ice", "pending")]
    h.close()
    again = harness(tmp_path, misses={"ice": {"Deaf"}})
    assert again.run(again.file(path)) == 0
    assert again.editor.calls == ["word3"]  # the re-edit the kill left pending, nothing else
    assert edit_rows(again.store) == {1: [("ice", "rolled_back"), ("gist", "applied")],
                                      2: [("ice", "rolled_back"), ("ice", "applied")],
                                      3: [("ice", "rolled_back"), ("ice", "applied")]}
    assert torch.allclose(live_weight(again), expected_weights("word2", "word3"), atol=1e-6)
    assert retries(again.store, 1) == 1 and checks(again.store, 1) == [("ice", False), ("gist", True)]
    assert any("re-edited" in e["text"] for e in again.events("note"))
    again.close()


# -- real SIGKILL ---------------------------------------------------------------------------------------------
# The machinery of tests/test_kill.py and tests/test_agent_kill.py: workers forked from one zygote, a trace
# of numbered events (here also "check FACT ROUTE"), a worker frozen at a chosen event and SIGKILLed there.
KILL_MISSES = {"ice": {"DeafIce", "DeafBoth"}, "gist": {"DeafGist", "DeafBoth"}}


def kill_stream() -> list:
    return [fact(1, subject=False), fact(2, subject=False, target="DeafIce"), fact(3),
            fact(4, target="DeafGist"), fact(5, subject=False, target="DeafBoth"), fact(6, subject=False)]


def job_verify(cfg: dict, probe) -> None:
    """`engram run --until-idle` with the real Router and a probed fake check, on the tiny models."""
    from agent.loop.loop import LoopConfig

    store, state = writer_state(cfg["url"], probe)
    verifier = FakeVerifier(store, KILL_MISSES)
    check = verifier.check

    def probed(fact, route, gist):
        probe(f"check {fact.id} {route}")
        return check(fact, route, gist)

    verifier.check = probed

    def open_gist():
        gist = new_gist_state(store)
        gist.open()
        return gist

    run_quiet_loop(store, state, cfg["file"], editor=FakeEditor(state.model, sleep_s=0.005, probe=probe),
                   router=Router(retrying()), open_gist=open_gist, verifier=verifier,
                   config=LoopConfig(until_idle=True, poll_s=0.0))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with zygote(tmp_path_factory, verify=job_verify) as (proc, log):
        yield Workers(proc, log)


def outcome(url: str) -> dict:
    """Everything exactly-once is about: edit rows, stages, checks and retries per fact, weights, the pool."""
    store = FactStore(url)
    with store.transaction() as s:
        stages = {r.fact_id: (r.stage, r.route) for r in s.scalars(select(Stage))}
    result = {"edits": edit_rows(store), "stages": stages, "checks": {i: checks(store, i) for i in stages},
              "retries": {i: retries(store, i) for i in stages}}
    store.engine.dispose()
    return {**result, "weights": reader_rebuild(url), "pool": pool_rows(url)}


def assert_same(got: dict, ref: dict, what: str) -> None:
    for key in ("edits", "stages", "checks", "retries"):
        assert got[key] == ref[key], (what, key, got[key])
    assert_close(got["weights"], ref["weights"], what)
    assert sorted(got["pool"]) == sorted(ref["pool"]), what
    for fid, (keys, values) in got["pool"].items():
        assert torch.allclose(keys, ref["pool"][fid][0], atol=1e-5), (what, fid)
        assert torch.allclose(values, ref["pool"][fid][1], atol=1e-5), (what, fid)


def test_sigkill_around_checks_retries_and_undos_keeps_every_fact_exactly_once(workers, tmp_path):
    root = stream_template(tmp_path, kill_stream())
    ref_cfg = stream_cfg(root, "ref")
    events = workers.run("verify", ref_cfg).events
    ref = outcome(ref_cfg["url"])
    assert ref["retries"] == {1: 0, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0}
    assert ref["checks"][4] == [("gist", False), ("ice", True)]
    assert ref["checks"][5] == [("ice", False), ("gist", False)]
    assert ref["edits"][2] == [("ice", "rolled_back"), ("gist", "applied")]
    assert ref["edits"][4] == [("gist", "rolled_back"), ("ice", "applied")]
    assert torch.allclose(ref["weights"][LAST_MLP[0]], expected_weights("word1", "word6", "DeafGist"), atol=1e-6)
    assert sorted(ref["pool"]) == [2, 3, 5]
    for j in kill_points(events):
        c = stream_cfg(root, f"kill{j}")
        assert workers.run("verify", c, freeze=j).killed
        assert not workers.run("verify", restart_cfg(c)).killed
        assert_same(outcome(c["url"]), ref, f"killed at {j} {events[j]}")


def kill_points(events: list[str]) -> list[int]:
    """Around the first check each route fails: its record with the retry, before and after its commit
    (so the undo is owed), and for a gist the removal's pool saved but its row not committed. Around the
    retry's failing check (no retry follows): its record's commit. (The raised kills above cover the
    moments after each undo.)"""
    points, checked, routes = [], set(), set()
    for j, e in enumerate(events):
        if not e.startswith("check "):
            continue
        fact_id, route = int(e.split()[1]), e.split()[2]
        first, target = fact_id not in checked, kill_stream()[fact_id - 1]["target"]
        checked.add(fact_id)
        if target not in KILL_MISSES[route] or (first and route in routes):
            continue

        def nth(name: str, n: int = 1) -> int:
            return [k for k in range(j + 1, len(events)) if events[k].startswith(name)][n - 1]

        points.append(nth("commit-before"))
        if first:
            routes.add(route)
            points += [nth("commit-after")] + ([nth("renamed")] if route == "gist" else [])
    return sorted(set(points))


def test_engram_run_checks_each_applied_fact(tmp_path, capsys):
    from agent.cli import main

    model, addon = save_tiny_model(tmp_path)
    path = tmp_path / "facts.jsonl"
    write(path, [{**fact(1), "scope": "user", "user_id": "ann"}, {"text": "Ann keeps bees."}])
    common = ["--model", str(model), "--device", "cpu", "--gist-addon", str(addon),
              "--no-rag", "--until-idle", "--json"]
    assert main(["run", "--source", str(path), "--db", f"sqlite:///{tmp_path / 'a.sqlite'}", *common]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((e["fact_id"], e["route"], e["verified"]) for e in lines if e["event"] == "fact") == [
        (1, "gist", False), (2, "gist", None)]  # the tiny model learns nothing; neither fact may move
    assert next(e for e in lines if e["event"] == "stopped")["not_learned"] == 1
    # (--no-verify: tests/test_agent_loop.py's run of the command.)
