"""Consolidation (issue 22 item 4): global gist facts move into verified weight edits and leave the pool;
a fact ICE does not learn keeps its gist and its weights are rolled back; scoped and text facts stay; a kill
between the steps is finished on the next run; the agent consolidates while idle when asked.

Tiny models and the fake weight editor of tests/test_agent_loop.py; a fake check that says "learned" when
the fact's weight edit is applied and its target is not one it is told to miss.
"""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from agent.consolidate import ConsolidationResult, Consolidator
from agent.router import RoutePolicy, Verification
from editors.state import ModelState
from memory.models import Edit, Event, Stage
from tests.test_agent_loop import LAST_MLP, Harness, edit_rows, fact, write


class Killed(BaseException):
    """A SIGKILL stand-in: nothing after it runs, and no `except Exception` catches it."""


def check_of(store, misses=()):
    def check(f) -> Verification:
        with store.transaction() as s:
            there = s.scalar(select(Edit.id).where(Edit.fact_id == f.id, Edit.status == "applied",
                                                   Edit.backend != "gist")) is not None
        ok = there and f.target not in set(misses)
        return Verification(ok, f.target if ok else "something else", f.prompt, f.target)
    return check


def agent_with_gist_facts(tmp_path, records) -> Harness:
    """An agent that ran `records` to idle: facts with a subject are in the pool (the fallback router)."""
    path = tmp_path / "facts.jsonl"
    write(path, records)
    h = Harness(tmp_path)
    assert h.run(h.file(path)) == 0
    return h


def consolidator(h: Harness, misses=(), policy=None) -> Consolidator:
    return Consolidator(h.store, h.state, h.editor, h.gist, check_of(h.store, misses), policy)


def in_pool(h: Harness) -> list[int]:
    return sorted(h.gist.memory.pool.view(None).fact_ids)


def routes(h: Harness) -> dict[int, str]:
    return {i: row.route for i, row in h.stages().items()}


def weights_of(h: Harness) -> torch.Tensor:
    return dict(h.state.model.named_parameters())[LAST_MLP[0]].detach().clone()


def rebuilt(h: Harness) -> torch.Tensor:
    from editors.model import tiny_llama

    state = ModelState(h.store, tiny_llama())
    state.rebuild(sweep=False)
    return dict(state.model.named_parameters())[LAST_MLP[0]].detach().clone()


def test_consolidation_moves_learned_facts_into_the_weights_and_out_of_the_pool(tmp_path):
    h = agent_with_gist_facts(tmp_path, [fact(1), fact(2), fact(3)])
    assert in_pool(h) == [1, 2, 3] and h.state.version == 0
    tool = consolidator(h, misses={"Town2"})
    assert tool.candidates() == [1, 2, 3]
    result = tool.run()
    assert result.consolidated == [1, 3] and result.not_learned == [2] and not result.errors
    assert in_pool(h) == [2]  # the fact ICE did not learn keeps its gist
    assert routes(h) == {1: "ice", 2: "gist", 3: "ice"}
    assert edit_rows(h.store)[2] == [("gist", "applied"), ("ice", "rolled_back")]
    assert edit_rows(h.store)[1] == [("gist", "rolled_back"), ("ice", "applied")]
    assert torch.allclose(weights_of(h), rebuilt(h))  # the rolled-back edit is out of the recorded state too
    assert tool.candidates() == []  # a fact ICE did not learn is not tried again by default ...
    assert tool.candidates(retry_failed=True) == [2]  # ... unless asked
    with h.store.transaction() as s:
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.fact_id == 1).order_by(Event.id))]
    assert kinds[-4:] == ["consolidating", "applied", "consolidated", "rolled_back"]  # the gist goes last
    h.close()


def test_a_stop_request_ends_the_run_between_two_facts_and_the_next_run_goes_on(tmp_path):
    h = agent_with_gist_facts(tmp_path, [fact(1), fact(2), fact(3)])
    tool = consolidator(h)
    asked = []
    result = tool.run(stop=lambda: len(asked) >= 1, progress=lambda *a: asked.append(a))
    assert result.stopped and result.consolidated == [1] and in_pool(h) == [2, 3]
    assert result.to_dict()["stopped"] is True
    result = tool.run()
    assert not result.stopped and result.consolidated == [2, 3] and in_pool(h) == []
    h.close()


def test_scoped_text_and_subjectless_weight_facts_are_not_candidates(tmp_path):
    records = [fact(1), {"text": "Ann keeps bees.", "scope": "user", "user_id": "ann"},
               {**fact(2), "scope": "user", "user_id": "ann"}, fact(3, subject=False)]
    h = agent_with_gist_facts(tmp_path, records)
    assert routes(h)[4] == "ice"  # the subjectless fact went to the weights already
    assert consolidator(h).candidates() == [1]
    everyone = RoutePolicy(weight_scopes=("global", "user"))  # a policy that lets user facts in
    assert consolidator(h, policy=everyone).candidates() == [1, 3]  # the text fact has no prompt: never
    h.close()


def test_an_edit_that_fails_leaves_the_gist_and_is_recorded(tmp_path):
    from tests.test_agent_loop import FakeEditor

    h = agent_with_gist_facts(tmp_path, [fact(1)])
    h.editor = FakeEditor(h.state.model, fail={"Town1"})
    result = consolidator(h).run()
    assert result.errors == {1: "did not learn it"} and in_pool(h) == [1] and routes(h) == {1: "gist"}
    assert consolidator(h).candidates() == []
    h.close()


@pytest.mark.parametrize("where", ["check", "gist_remove"])
def test_a_kill_between_the_steps_is_finished_on_the_next_run(tmp_path, monkeypatch, where):
    h = agent_with_gist_facts(tmp_path, [fact(1), fact(2)])
    tool = consolidator(h)

    def killed(*_a, **_k):
        raise Killed(where)

    if where == "check":  # the weight edit is applied and recorded, the check never ran
        tool.check = killed
    else:  # the stage says ice, the gist is still in the pool
        monkeypatch.setattr(h.gist, "remove", killed)
    with pytest.raises(Killed):
        tool.step(1, ConsolidationResult())
    monkeypatch.undo()
    assert 1 in in_pool(h) and tool.in_both() == [1]
    again = consolidator(h)
    result = again.run()
    assert result.reconciled == [1] and sorted(result.consolidated) == [1, 2]
    assert in_pool(h) == [] and routes(h) == {1: "ice", 2: "ice"}
    assert [row for row in edit_rows(h.store)[1] if row[0] == "ice"] == [("ice", "applied")]  # edited once
    h.close()


def test_the_agent_consolidates_while_idle_when_asked(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1), fact(2), {**fact(3), "scope": "user", "user_id": "ann"}])
    h = Harness(tmp_path, consolidate_when_idle=True)
    h.backends.consolidator = lambda gist: Consolidator(h.store, h.state, h.editor, gist, check_of(h.store))
    assert h.run(h.file(path)) == 0
    assert routes(h) == {1: "ice", 2: "ice", 3: "gist"} and in_pool(h) == []
    assert sorted(h.gist.memory.pool.view("ann").fact_ids) == [3]
    notes = [e["text"] for e in h.events("note")]
    assert sum("consolidated into the weights" in n for n in notes) == 2
    with h.store.transaction() as s:
        assert s.scalar(select(Stage.route).where(Stage.fact_id == 1)) == "ice"
    h.close()


def test_without_the_flag_the_agent_leaves_the_pool_alone(tmp_path):
    path = tmp_path / "facts.jsonl"
    write(path, [fact(1)])
    h = Harness(tmp_path)
    h.backends.consolidator = lambda gist: Consolidator(h.store, h.state, h.editor, gist, check_of(h.store))
    assert h.run(h.file(path)) == 0 and routes(h) == {1: "gist"} and in_pool(h) == [1]
    h.close()


def test_engram_consolidate_dry_run_lists_the_candidates_and_changes_nothing(tmp_path, capsys):
    import json

    from agent.cli import main

    h = agent_with_gist_facts(tmp_path, [fact(1), fact(2), {**fact(3), "scope": "user", "user_id": "ann"}])
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    before = edit_rows(h.store)
    assert main(["consolidate", "--db", url, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"candidates": [1, 2]}
    assert main(["consolidate", "--db", url, "--dry-run", "--limit", "1"]) == 0
    assert "1 fact(s) would move from the gist pool into the weights: 1" in capsys.readouterr().out
    assert main(["consolidate", "--db", url, "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert edit_rows(h.store) == before
    h.close()
