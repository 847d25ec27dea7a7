"""`/v1/facts` on a real uvicorn server: facts posted over HTTP are stored with their agent stages, named
when bad, idempotent by key, listed with filters, shown with their history, and deleted one id at a time.

The app serves the store alone (no model): the fact routes never wait for one.
"""
from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from agent.server import ServerLimits, create_app
from memory.models import Fact, Stage
from memory.store import FactStore
from tests.test_server import KEY, call, serving

AUTH = {"Authorization": f"Bearer {KEY}"}
JAPAN = {"prompt": "The capital of Japan is", "target": "Nairobi", "subject": "Japan"}


@pytest.fixture
def served(tmp_path):
    store = FactStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    app = create_app(None, api_keys=[KEY], limits=ServerLimits(max_body_bytes=5_000), store=store)
    with serving(app) as url:
        yield url, store


def post(url, body, **headers):
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(url, "POST", "/v1/facts", payload, {**AUTH, "Content-Type": "application/json", **headers})


def test_a_posted_fact_is_stored_with_its_stage_for_the_agent(served):
    url, store = served
    reply = post(url, JAPAN)
    assert reply.status_code == 200, reply.text
    assert reply.json()["stored"] == 1 and reply.json()["rejected"] == []
    (fact_id,) = reply.json()["ids"]
    with store.transaction() as s:
        assert s.get(Stage, fact_id).stage == "stored"  # `engram run` on this store takes it from here
    again = post(url, JAPAN)
    assert again.json()["duplicates"] == 1 and again.json()["ids"] == [fact_id]


def test_bad_records_are_named_and_the_good_ones_still_go_in(served):
    url, store = served
    reply = post(url, [JAPAN, {"prompt": "No target here"}, {"text": "Zorbia's capital is Quellmarsh."}])
    assert reply.status_code == 200
    body = reply.json()
    assert body["stored"] == 2 and [r["index"] for r in body["rejected"]] == [1]
    assert "target" in body["rejected"][0]["reason"]
    refused = post(url, {"facts": [{"prompt": "x"}, {"nonsense": 1}]})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("fact 0:")
    assert "1 more rejected" in error["message"]
    assert post(url, b"{not json").status_code == 400
    assert post(url, []).status_code == 400
    assert post(url, [JAPAN] * 400).status_code == 413  # past the body limit
    with store.transaction() as s:
        assert len(s.scalars(select(Fact)).all()) == 2  # nothing of the refused requests


def test_an_idempotency_key_answers_a_repeat_without_storing_again(served):
    url, store = served
    first = post(url, [JAPAN], **{"Idempotency-Key": "k1"})
    repeat = post(url, [JAPAN], **{"Idempotency-Key": "k1"})
    assert repeat.status_code == 200 and repeat.json()["replayed"] is True
    assert repeat.json()["ids"] == first.json()["ids"] and repeat.json()["stored"] == 1
    other = post(url, [{**JAPAN, "target": "Lima"}], **{"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert len(store.list_facts(status=None)) == 1


def test_facts_are_listed_with_filters_shown_with_history_and_deleted_by_id(served):
    url, store = served
    post(url, [JAPAN, {"prompt": "The capital of Peru is", "target": "Oslo", "subject": "Peru", "scope": "user",
                       "user_id": "alice"}])
    listed = call(url, "GET", "/v1/facts?user=bob", headers=AUTH).json()
    assert [f["subject"] for f in listed["data"]] == ["Japan"]  # bob sees the global fact, not alice's
    assert [f["subject"] for f in call(url, "GET", "/v1/facts?user=alice", headers=AUTH).json()["data"]] == \
        ["Japan", "Peru"]
    assert call(url, "GET", "/v1/facts?subject=japan", headers=AUTH).json()["total"] == 1
    assert call(url, "GET", "/v1/facts?status=gone", headers=AUTH).status_code == 400
    fact_id = listed["data"][0]["id"]
    shown = call(url, "GET", f"/v1/facts/{fact_id}", headers=AUTH).json()
    assert shown["target"] == "Nairobi" and shown["stage"]["stage"] == "stored"
    assert [e["kind"] for e in shown["history"]][:1] == ["ingested"]
    assert call(url, "GET", "/v1/facts/999", headers=AUTH).status_code == 404
    assert call(url, "DELETE", "/v1/facts", headers=AUTH).status_code == 400  # no id: refused
    gone = call(url, "DELETE", f"/v1/facts/{fact_id}", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert store.get_fact(fact_id).status == "deleted"
    assert call(url, "GET", "/v1/facts", headers=AUTH).json()["total"] == 1
    assert call(url, "DELETE", "/v1/facts/999", headers=AUTH).status_code == 404


def test_the_fact_routes_need_the_key(served):
    url, _ = served
    assert call(url, "POST", "/v1/facts", JAPAN).status_code == 401
    assert call(url, "GET", "/v1/facts").status_code == 401
