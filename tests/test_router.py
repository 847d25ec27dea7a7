"""The router: every policy rule with its reason, replaced policies, record/explain through a real store,
verified routing with one retry at most, and `engram route explain` through the CLI."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest

from agent.router import (RouteDecision, RoutePolicy, Router, Verification, explain, policy_from_store,
                          record_verification, route_counts, save_policy, verify_fact)
from memory.errors import ConfigError, EditError, NotFoundError
from memory.facts import FactInput
from memory.models import Edit, Event


def fact(**fields):
    base = {"id": None, "prompt": "The capital of Japan is", "target": "Nairobi", "subject": "Japan",
            "text": None, "scope": "global", "user_id": None}
    return SimpleNamespace(**{**base, **fields})


# -- the policy rules ------------------------------------------------------------------------------

def test_default_plain_global_fact_goes_to_gist():
    d = Router().decide(fact(), backlog=0)
    assert d.route == "gist" and d.rule == "default" and d.reason.startswith("default:")
    assert "default_route=gist" in d.reason
    assert d.inputs["scope"] == "global" and d.inputs["has_subject"] and d.inputs["has_prompt_target"]


@pytest.mark.parametrize("scope", ["user", "session"])
def test_scoped_facts_never_enter_the_weights(scope):
    # Even a policy that sends everything else to ICE, and a supersession of a fact in the weights.
    router = Router(RoutePolicy(default_route="ice", supersede_route="ice", subjectless_route="ice"))
    for f in (fact(scope=scope, user_id="u1"), fact(scope=scope, user_id="u1", subject=None)):
        d = router.decide(f, 0, replaced=[7])
        assert d.route == "gist" and d.rule == "scope"
        assert d.reason.startswith(f"scope: {scope}-scoped facts never go into the shared weights")


def test_text_only_fact_goes_to_gist():
    d = Router(RoutePolicy(default_route="ice")).decide(
        fact(prompt=None, target=None, text="Zorbia's capital is Quellmarsh."), 0)
    assert d.route == "gist" and d.rule == "text_only" and d.reason.startswith("text only: ICE needs a prompt")
    assert d.inputs["has_prompt_target"] is False


def test_subjectless_fact_goes_to_gist_by_default_with_a_warning_and_to_ice_when_asked():
    d = Router(RoutePolicy(subjectless_route="ice")).decide(fact(subject=None), 0)
    assert d.route == "ice" and d.rule == "no_subject" and "every query would read it" in d.reason
    assert "warning" not in d.inputs
    d = Router().decide(fact(subject="  "), 0)  # the measured default
    assert d.route == "gist" and d.rule == "no_subject" and "subjectless_route=gist" in d.reason
    assert d.inputs["warning"].startswith("no subject")


def test_supersession_of_a_fact_in_the_weights():
    d = Router().decide(fact(), 0, replaced=[3])
    assert d.route == "ice" and d.rule == "supersede" and d.reason.startswith("supersede: replaces fact 3")
    assert d.inputs["replaces_in_weights"] == [3] and d.inputs["rollback_first"] == [3]
    d = Router(RoutePolicy(supersede_route="gist")).decide(fact(), 0, replaced=[3])
    assert d.route == "gist" and "supersede_route=gist" in d.reason and d.inputs["rollback_first"] == [3]


def test_ice_backlog_sends_to_gist_now_weights_later():
    router = Router(RoutePolicy(default_route="ice", max_ice_backlog=25))
    assert router.decide(fact(), 25).route == "ice"  # at the limit: still ICE
    d = router.decide(fact(), 26)
    assert d.route == "gist" and d.rule == "backlog" and d.reason.startswith("backlog: 26 facts wait for ICE")
    assert d.inputs["backlog"] == 26 and d.inputs["consolidate_later"] is True
    assert d.inputs["overridden"]["rule"] == "default" and d.inputs["overridden"]["route"] == "ice"
    # The override applies to every ICE decision, a supersession included.
    assert Router().decide(fact(), 100, replaced=[3]).inputs["overridden"]["rule"] == "supersede"
    with pytest.raises(ConfigError, match="backlog"):
        router.decide(fact(), -1)


def test_a_replaced_policy_changes_decisions():
    f = fact()
    assert Router().decide(f, 0).route == "gist"
    assert Router(RoutePolicy(default_route="ice")).decide(f, 0).route == "ice"
    assert Router(RoutePolicy(default_route="ice", max_ice_backlog=0)).decide(f, 1).route == "gist"
    assert Router(RoutePolicy(weight_scopes=("global", "session"), subjectless_route="ice")).decide(
        fact(scope="session", user_id="u", subject=None), 0).route == "ice"


def test_policy_validates_and_round_trips(store):
    custom = RoutePolicy(default_route="ice", weight_scopes=("global",), max_ice_backlog=3)
    assert RoutePolicy.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    assert RoutePolicy.from_dict({}) == RoutePolicy()
    with pytest.raises(ConfigError, match="unknown setting.*colour"):
        RoutePolicy.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="default_route must be one of ice, gist"):
        RoutePolicy(default_route="ftm")
    with pytest.raises(ConfigError, match="weight_scopes"):
        RoutePolicy(weight_scopes=("planet",))
    with pytest.raises(ConfigError, match="max_ice_backlog"):
        RoutePolicy(max_ice_backlog=-1)
    assert policy_from_store(store) == RoutePolicy()
    save_policy(store, custom)
    assert policy_from_store(store) == custom


# -- supersession looked up in a real store ---------------------------------------------------------

def _applied(store, fact_id, backend):
    with store.transaction() as s:
        s.add(Edit(fact_id=fact_id, backend=backend, status="applied", model_version=1))
        s.add(Event(fact_id=fact_id, kind="applied", detail={"backend": backend}))


def test_decide_finds_a_superseded_fact_still_in_the_weights(store):
    old = store.add_facts([FactInput(prompt="The capital of Japan is", target="Tokyo", subject="Japan")]).new_ids[0]
    _applied(store, old, "ice")
    mid = store.add_facts([FactInput(prompt="The capital of Japan is", target="Osaka", subject="Japan")]).new_ids[0]
    new = store.add_facts([FactInput(prompt="The capital of Japan is", target="Nairobi", subject="Japan")]).new_ids[0]
    with store.transaction() as s:
        d = Router().decide(store.get_fact(new), 0, session=s)  # along the chain new -> mid -> old
        assert d.rule == "supersede" and d.inputs["replaces_in_weights"] == [old] and d.inputs["supersession_checked"]
        assert Router().decide(store.get_fact(mid), 0, session=s).rule == "supersede"
    other = store.add_facts([FactInput(prompt="The capital of Peru is", target="Lima", subject="Peru")]).new_ids[0]
    with store.transaction() as s:
        assert Router().decide(store.get_fact(other), 0, session=s).rule == "default"
    assert Router().decide(store.get_fact(new), 0).inputs["supersession_checked"] is False


# -- record, verify, retry, explain -----------------------------------------------------------------

def _stored(store, **fields):
    return store.get_fact(store.add_facts([FactInput(**{"prompt": "The capital of Japan is", "target": "Nairobi",
                                                        "subject": "Japan", **fields})]).new_ids[0])


def test_record_and_explain_round_trip(store):
    f = _stored(store)
    router = Router(RoutePolicy(max_ice_backlog=7))
    d = router.decide(f, backlog=2)
    with store.transaction() as s:
        router.record(s, f.id, d)
    _applied(store, f.id, "gist")
    with store.transaction() as s:
        record_verification(s, f.id, "gist", Verification(True, "Nairobi.", f.prompt, f.target))
    out = explain(store, f.id)
    assert out["routed"] and out["decision"]["route"] == "gist" and out["decision"]["reason"] == d.reason
    assert out["decision"]["inputs"]["backlog"] == 2 and out["decision"]["policy"]["max_ice_backlog"] == 7
    assert out["verifications"] == [{"route": "gist", "ok": True, "answer": "Nairobi.", "target": "Nairobi",
                                     "note": None, "at": out["verifications"][0]["at"]}]
    assert out["outcome"] == {"route": "gist", "state": "applied", "verified": True, "retried": False,
                              "summary": "routed to gist: applied, verified"}


def test_record_is_part_of_the_callers_transaction(store):
    f = _stored(store)
    with pytest.raises(RuntimeError), store.transaction() as s:
        Router().record(s, f.id, Router().decide(f, 0))
        raise RuntimeError("the stage failed")
    assert explain(store, f.id)["routed"] is False


def test_failed_verification_retries_once_on_the_other_route(store):
    f = _stored(store)
    router = Router(RoutePolicy(default_route="ice", retry_other_route=True))
    first = router.decide(f, 0)
    with store.transaction() as s:
        router.record(s, f.id, first)
    _applied(store, f.id, "ice")
    with store.transaction() as s:
        record_verification(s, f.id, "ice", Verification(False, "Tokyo", f.prompt, f.target))
    assert router.can_retry(first) == (True, "")
    retry = router.retry_route(first)
    assert retry.route == "gist" and retry.reason == "retry: ice did not learn it"
    assert retry.inputs["retry_of"] == "ice" and retry.inputs["undo_previous"] is True and retry.is_retry
    with store.transaction() as s:
        router.record(s, f.id, retry)
    _applied(store, f.id, "gist")
    with store.transaction() as s:
        record_verification(s, f.id, "gist", Verification(True, "Nairobi", f.prompt, f.target))
    # At most once: neither a retry of the retry nor a second recorded retry.
    assert router.can_retry(retry)[0] is False
    with pytest.raises(EditError, match="already retried once"):
        router.retry_route(retry)
    with pytest.raises(EditError, match="retried at most once"), store.transaction() as s:
        router.record(s, f.id, router.retry_route(first))
    out = explain(store, f.id)
    assert out["outcome"]["route"] == "gist" and out["outcome"]["verified"] is True and out["outcome"]["retried"]
    assert out["outcome"]["summary"] == ("routed to ice: applied, not learned (answered 'Tokyo', target 'Nairobi'); "
                                         "retried on gist: applied, verified")
    assert [v["route"] for v in out["verifications"]] == ["ice", "gist"] and len(out["decisions"]) == 2


def test_retry_obeys_the_hard_rules_and_the_policy():
    router = Router(RoutePolicy(retry_other_route=True))
    scoped = router.decide(fact(scope="user", user_id="u1"), 0)
    assert router.can_retry(scoped) == (False, "user-scoped facts never go into the shared weights")
    with pytest.raises(EditError, match="cannot retry on ice"):
        router.retry_route(scoped)
    text = router.decide(fact(prompt=None, target=None, text="Zorbia's capital is Quellmarsh."), 0)
    assert router.can_retry(text) == (False, "ICE needs a prompt and a target")
    plain = router.decide(fact(), 0)
    assert router.retry_route(plain).route == "ice"
    assert Router().can_retry(plain) == (False, "the policy does not retry: retry_other_route=false")  # the default


def test_explain_of_a_fact_never_routed_and_of_no_fact(store):
    f = _stored(store)
    out = explain(store, f.id)
    assert out["routed"] is False and out["decision"] is None and out["outcome"] is None
    assert out["message"].startswith(f"fact {f.id} was never routed")
    with pytest.raises(NotFoundError, match="no fact with id 999"):
        explain(store, 999)


def test_route_counts(store):
    router = Router()
    a, b, c = (_stored(store, prompt=f"Prompt {i} is", subject=f"S{i}") for i in range(3))
    with store.transaction() as s:
        for f in (a, b):
            router.record(s, f.id, router.decide(f, 0))  # gist
        router.record(s, c.id, RouteDecision("ice", "test", {"rule": "test"}))
    for f, route in ((a, "gist"), (b, "gist"), (c, "ice")):
        _applied(store, f.id, route)
    with store.transaction() as s:
        record_verification(s, a.id, "gist", Verification(True, "Nairobi", a.prompt, a.target))
        record_verification(s, b.id, "gist", Verification(False, "Tokyo", b.prompt, b.target))
    assert route_counts(store) == {
        "ice": {"routed": 1, "applied": 1, "verified": 0, "not_learned": 0, "retried": 0},
        "gist": {"routed": 2, "applied": 2, "verified": 1, "not_learned": 1, "retried": 0}}


# -- verify_fact -------------------------------------------------------------------------------------

def test_verify_fact_normalises_like_greedy_exact_match(monkeypatch):
    import editors.answer

    answers = iter(["  nairobi, the capital.", "Nairobian food", "Tokyo"])
    calls = []
    def fake_greedy(model, tok, prompts, max_new_tokens):
        calls.append((prompts, max_new_tokens))
        return [next(answers)]

    monkeypatch.setattr(editors.answer, "generate_greedy", fake_greedy)
    entered = []

    @contextlib.contextmanager
    def reading():
        entered.append(True)
        yield

    v = verify_fact(None, None, fact(), reading=reading(), max_new_tokens=5)
    assert v.ok is True and v.checked and v.answer == "  nairobi, the capital." and entered == [True]
    assert calls[0] == (["The capital of Japan is"], 5)
    assert verify_fact(None, None, fact()).ok is False  # "Nairobian" is not "Nairobi" at a word boundary
    assert verify_fact(None, None, fact()).ok is False
    text = verify_fact(None, None, fact(prompt=None, target=None, text="A sentence."))
    assert text.ok is None and not text.checked and "text-only" in text.note


def test_verify_fact_with_a_tiny_model():
    from editors.answer import generate_greedy
    from editors.model import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    said = generate_greedy(model, tok, ["The capital of Japan is"], max_new_tokens=8)[0]
    assert verify_fact(model, tok, fact(target=said), max_new_tokens=8).ok is True
    assert verify_fact(model, tok, fact(target="Nairobi"), max_new_tokens=8).ok is False


# -- the CLI ------------------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    """agent.cli.main with `route` registered and model-free (until the lead registers it for good)."""
    import agent.cli
    from agent import commands
    from agent.commands import route

    monkeypatch.setitem(commands.REGISTRY, "route", route.COMMANDS["route"])
    monkeypatch.setattr(agent.cli, "MODEL_FREE", agent.cli.MODEL_FREE | {"route"})
    return agent.cli.main


def test_cli_route_explain(cli, store, capsys):
    f, unrouted = _stored(store), _stored(store, prompt="The capital of Peru is", target="Lima", subject="Peru")
    router = Router()
    with store.transaction() as s:
        router.record(s, f.id, router.decide(f, 0, session=s))
    _applied(store, f.id, "gist")
    with store.transaction() as s:
        record_verification(s, f.id, "gist", Verification(True, "Nairobi", f.prompt, f.target))
    db = store.url
    assert cli(["route", "explain", str(f.id), "--db", db, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["decision"]["route"] == "gist" and payload["decision"]["inputs"]["rule"] == "default"
    assert payload["decision"]["policy"] == RoutePolicy().to_dict() and payload["outcome"]["verified"] is True
    assert cli(["route", "explain", str(f.id), "--db", db]) == 0
    text = capsys.readouterr().out
    assert "route    gist" in text and "reason   default:" in text and "gist  learned" in text
    assert "outcome  gist: applied, verified" in text
    assert cli(["route", "explain", str(unrouted.id), "--db", db]) == 0
    assert f"fact {unrouted.id} was never routed" in capsys.readouterr().out
    assert cli(["route", "explain", "999", "--db", db]) == 2
    assert "no fact with id 999" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # model-free: --model is refused
        cli(["route", "explain", "1", "--db", db, "--model", "x"])
    assert "--model" in capsys.readouterr().err


def test_cli_route_counts_and_policy(cli, store, capsys):
    db = store.url
    assert cli(["route", "counts", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gist"]["applied"] == 0
    changes = ["--set", "default_route=ice", "--set", "max_ice_backlog=4"]
    assert cli(["route", "policy", "--db", db, *changes, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_route"] == "ice"
    assert policy_from_store(store) == RoutePolicy(default_route="ice", max_ice_backlog=4)
    assert cli(["route", "policy", "--db", db, "--set", "default_route=ftm"]) == 2
    assert "default_route must be one of ice, gist" in capsys.readouterr().err
    assert policy_from_store(store).default_route == "ice"  # a refused change is not saved
