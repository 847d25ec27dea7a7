"""`engram serve` end to end: a real uvicorn server on 127.0.0.1 and the official `openai` client against it.

The engine runs a tiny config-built Llama with a character-level tokenizer given a chat template, over a
temp store with a global and a user-scoped fact, so every call takes milliseconds. Nothing depends on the
tiny model's exact output: checks compare the server with itself (greedy is repeatable, a stream joins to
the plain answer, a seed repeats) and check the shapes, statuses and provenance.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import openai
import pytest
import torch
import uvicorn

from agent.chat import ChatEngine, EngineConfig
from agent.server import ServerLimits, create_app, set_engine
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.embeddings import HashEmbedder
from memory.facts import FactInput
from memory.store import FactStore

KEY = "sk-test-key"
LIMITS = ServerLimits(max_body_bytes=20_000, max_messages=8, max_tokens=64, max_n=4)
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
HELLO = [{"role": "user", "content": "What is the capital of Japan?"}]


@contextmanager
def serving(app):
    """`app` on a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    store = FactStore(f"sqlite:///{tmp_path_factory.mktemp('serve') / 'store.sqlite'}")
    store.add_facts([FactInput(prompt="The capital of Japan is", target="Nairobi", subject="Japan"),
                     FactInput(prompt="The capital of Peru is", target="Oslo", subject="Peru", scope="user",
                               user_id="alice")])
    model = tiny_llama()
    state = ModelState(store, model)
    state.rebuild(sweep=False)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    engine = ChatEngine(model, tokenizer, "tiny", state=state, store=store, config=EngineConfig(rag_k=5),
                        embedder=HashEmbedder())
    yield engine
    engine.close()
    store.engine.dispose()


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, api_keys=[KEY], limits=LIMITS)) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)


class Raw:
    """One plain HTTP response (stdlib http.client, so the raw checks share no code with the openai client)."""

    def __init__(self, response: http.client.HTTPResponse):
        self.status_code, self.headers = response.status, {k.lower(): v for k, v in response.getheaders()}
        self.content = response.read()

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        return json.loads(self.content)


def call(url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> Raw:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=payload, headers={**sent, **(headers or {})})
        return Raw(connection.getresponse())
    finally:
        connection.close()


def get(url: str, path: str, headers: dict | None = None) -> Raw:
    return call(url, "GET", path, headers=headers)


def raw_stream(url: str, body: dict) -> list[str]:
    """The `data:` payloads of one streamed answer, as sent."""
    response = call(url, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def test_models_lists_every_route(client):
    assert {m.id for m in client.models.list()} == {"engram", "base", "icl", "rag", "rag-subject"}
    assert client.models.retrieve("rag").id == "rag"


def test_a_plain_call_has_the_openai_shape_usage_and_the_engram_field(client, engine):
    raw = client.chat.completions.with_raw_response.create(model="engram", messages=HELLO, max_tokens=6,
                                                           temperature=0)
    answer = raw.parse()
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == "engram"
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = json.loads(raw.text)["engram"]
    assert extra["model_version"] == engine.model_version and extra["route"] == "engram"
    assert extra["provenance"]["weights"] == "edited"
    assert raw.headers["x-engram-model-version"] == str(engine.model_version)
    again = client.chat.completions.create(model="engram", messages=HELLO, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is repeatable
    assert again.id != answer.id


def test_streaming_without_include_usage_sends_no_usage_chunk(client, url):
    plain = client.chat.completions.create(model="engram", messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="engram", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.choices and c.usage is None for c in chunks)  # a usage chunk would have no choices
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    payloads = raw_stream(url, {"model": "engram", "messages": HELLO, "max_tokens": 4, "stream": True})
    assert payloads[-1] == "[DONE]"
    assert not any("usage" in json.loads(p) for p in payloads[:-1])
    assert "engram" in json.loads(payloads[0])


def test_streaming_with_include_usage_ends_with_one_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="engram", messages=HELLO, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 0 and 0 < last.usage.completion_tokens <= 5
    assert all(c.usage is None and c.choices for c in body)


def test_stop_strings_cut_the_answer_there(client):
    full = client.chat.completions.create(model="base", messages=HELLO, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 3, text
    stop = text[2]
    cut = client.chat.completions.create(model="base", messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="base", messages=HELLO, max_tokens=12, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.find(stop)]


def test_n_choices_and_a_seed_repeat(client):
    ask = dict(model="engram", messages=HELLO, max_tokens=6, temperature=1.0, top_p=0.9, n=2, seed=7)
    first, second = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.completion_tokens <= 12


def test_baselines_show_only_the_users_facts(client):
    def provenance(model: str, user: str | None, **extra) -> dict:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=2,
                                                               user=user, temperature=0, **extra)
        return json.loads(raw.text)["engram"]["provenance"]

    alice, bob = provenance("icl", "alice"), provenance("icl", "bob")
    assert provenance("icl", None, extra_headers={"X-Engram-User": "alice"}) == alice  # the header scopes too
    assert len(alice["icl_facts"]) == 2 and len(bob["icl_facts"]) == 1
    assert set(bob["icl_facts"]) < set(alice["icl_facts"])
    hits = provenance("rag", "bob")["rag_hits"]
    assert [h["fact_id"] for h in hits] == bob["icl_facts"]  # the one global fact; alice's never
    assert provenance("base", None)["weights"] == "base"


def test_a_bad_or_missing_key_is_refused_but_health_stays_open(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="engram", messages=HELLO)
    assert caught.value.status_code == 401
    response = get(url, "/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert get(url, "/health").status_code == 200
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    good.chat.completions.create(model="engram", messages=HELLO, max_tokens=2)
    metrics = get(url, "/metrics").text
    assert 'engram:request_success_total{route="engram",status="200"}' in metrics
    assert "engram:generation_tokens_total" in metrics
    for name in ("engram:e2e_request_latency_seconds_count", 'engram:time_to_first_token_seconds_bucket{le="+Inf"}',
                 "engram:gist_pool_facts", 'engram:queue_facts{stage="stored"}'):
        assert name in metrics, name
    count = [line for line in metrics.splitlines() if line.startswith("engram:e2e_request_latency_seconds_count")]
    assert int(count[0].split()[-1]) >= 1


def test_an_oversized_body_gets_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="engram", messages=[{"role": "user", "content": "x" * 30_000}])
    assert caught.value.status_code == 413
    assert caught.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert caught.value.body["type"] == "not_found_error" and caught.value.body["param"] == "model"


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "auto"},
    {"logprobs": True},
    {"response_format": {"type": "json_object"}},
])
def test_fields_engram_cannot_honour_get_a_clear_400(client, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="engram", messages=HELLO, **extra)
    field = next(iter(extra))
    assert caught.value.body["param"] == field and "not supported" in caught.value.body["message"]


def test_limits_and_bad_input_get_400_and_unknown_fields_are_ignored(client, url):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="engram", messages=HELLO, max_tokens=65)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="engram", messages=HELLO * 9)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="engram", messages=[{"role": "tool", "content": "x"}])
    assert "messages[0].role" in caught.value.body["param"]
    response = call(url, "POST", "/v1/chat/completions", b"{not json", {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    fine = client.chat.completions.create(model="engram", messages=HELLO, max_tokens=2,
                                          extra_body={"frequency_penalty": 0.5, "no_such_field": 1})
    assert fine.choices[0].finish_reason in ("stop", "length")


def test_request_ids_are_echoed_or_made(url):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert get(url, "/v1/models", {**auth, "X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = get(url, "/v1/models", auth).headers["x-request-id"]
    assert made.startswith("req-") and len(made) > 10
    assert get(url, "/nope", {"X-Request-Id": "r2", **auth}).headers["x-request-id"] == "r2"


def test_failures_become_500s_in_the_error_shape_and_the_server_lives_on(client, engine, url, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "prepare", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="engram", messages=HELLO)
    assert caught.value.body["type"] == "server_error" and "boom" in caught.value.body["message"]
    monkeypatch.undo()
    monkeypatch.setattr(engine, "_one", broken)  # fails after the stream has begun
    payloads = raw_stream(url, {"model": "engram", "messages": HELLO, "stream": True})
    assert json.loads(payloads[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(payloads[-1])["error"]["type"] == "server_error"  # the last chunk, no [DONE]
    monkeypatch.undo()
    assert not engine.lock.locked()
    assert client.chat.completions.create(model="engram", messages=HELLO, max_tokens=2).choices


def test_health_is_503_while_the_model_loads_then_200(engine):
    app = create_app(None)
    with serving(app) as base:
        loading = get(base, "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert get(base, "/v1/models").status_code == 503
        set_engine(app, engine)
        ready = get(base, "/health")
        assert ready.status_code == 200 and ready.json()["model_version"] == engine.model_version
        assert get(base, "/v1/models").status_code == 200  # no --api-key: /v1 is open


def scoped_pool_engine(path, **engine_options) -> tuple[ChatEngine, FactStore, list[int]]:
    """A tiny engine whose pool holds a global Japan fact and alice's Peru fact (ids in that order)."""
    from editors.gist_state import GistState
    from editors.incomes import GistAddon, GistConfig
    from editors.incomes.memory import GistMemory

    store = FactStore(f"sqlite:///{path / 'store.sqlite'}")
    ids = store.add_facts([FactInput(prompt="The capital of Japan is", target="Nairobi", subject="Japan"),
                           FactInput(prompt="The capital of Peru is", target="Oslo", subject="Peru", scope="user",
                                     user_id="alice")]).new_ids
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    gist = GistState(store, GistMemory(model, tokenizer, GistAddon.for_model(model, GistConfig())))
    gist.open()
    gist.add([store.get_fact(i) for i in ids])
    state = ModelState(store, model)
    state.rebuild(sweep=False)
    return ChatEngine(model, tokenizer, "tiny", state=state, gist=gist, store=store, **engine_options), store, ids


def test_the_engram_route_reads_the_gist_pool_scoped_by_user(tmp_path):
    engine, store, ids = scoped_pool_engine(tmp_path)
    try:
        with serving(create_app(engine)) as base:
            chat = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)

            def pool(user: str | None) -> dict:
                raw = chat.chat.completions.with_raw_response.create(
                    model="engram", messages=HELLO, max_tokens=4, user=user, temperature=0.7, seed=1)
                assert raw.parse().choices[0].message.content is not None
                return json.loads(raw.text)["engram"]["provenance"]["pool"]

            alice, bob, nobody = pool("alice"), pool("bob"), pool(None)
            assert alice["rows_in_view"] == 2 and bob["rows_in_view"] == 1 and nobody["rows_in_view"] == 1
            assert alice["rows_mentioned"] == bob["rows_mentioned"] == [ids[0]]  # the question names Japan
            peru = [{"role": "user", "content": "Tell me about Peru"}]
            assert engine.prepare("engram", peru, "alice").provenance["pool"]["rows_mentioned"] == [ids[1]]
            assert engine.prepare("engram", peru, "bob").provenance["pool"]["rows_mentioned"] == []
            streamed = chat.chat.completions.create(model="engram", messages=HELLO, max_tokens=4, user="alice",
                                                    stream=True)
            assert streamed.response.headers["x-engram-route"] == "engram"
            assert sum(1 for c in streamed if c.choices[0].finish_reason) == 1
    finally:
        engine.close()
        store.engine.dispose()


def test_engram_serve_loads_in_the_background_and_answers(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.fakes import ROOT, save_tiny_model

    model_dir, addon_dir = save_tiny_model(tmp_path)
    db = f"sqlite:///{tmp_path / 'store.sqlite'}"
    FactStore(db).add_facts([FactInput(prompt="The capital of Japan is", target="Nairobi", subject="Japan")])
    with socket.socket() as probe:  # a free port (released just before the server binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would block the server's access log
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "agent.cli", "--db", db, "serve", "--model",
                                   str(model_dir), "--device", "cpu", "--gist-addon", str(addon_dir), "--port",
                                   str(port), "--api-key", KEY], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    base, seen = f"http://127.0.0.1:{port}", set()
    try:
        deadline = time.monotonic() + 120
        while 200 not in seen:
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            try:
                seen.add(get(base, "/health").status_code)
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        assert seen <= {200, 503}
        chat = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
        answer = chat.chat.completions.create(model="engram", messages=HELLO, max_tokens=3)
        assert answer.usage.completion_tokens <= 3 and answer.choices[0].message.role == "assistant"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    output = log.read_text()
    assert server.returncode == 0, output
    assert "ready at version 0" in output


def test_engram_serve_on_a_store_it_cannot_open_is_one_line(tmp_path, capsys):
    from agent.cli import main

    (tmp_path / "file").write_text("not a folder")
    assert main(["--db", f"sqlite:///{tmp_path / 'file' / 'store.sqlite'}", "serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "store" in err


def test_concurrent_chats_are_answered_one_model_version_each(client, engine):
    from concurrent.futures import ThreadPoolExecutor

    def streamed(i: int) -> tuple[str, int]:
        stream = client.chat.completions.create(model="engram" if i % 2 else "base", messages=HELLO,
                                                max_tokens=6, temperature=0, stream=True)
        version = int(stream.response.headers["x-engram-model-version"])
        finishes = [c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason]
        return finishes[0], version

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(streamed, range(12)))
    assert all(reason in ("stop", "length") for reason, _ in results)
    assert {version for _, version in results} == {engine.model_version}
    assert not engine.lock.locked()


def test_base_answers_with_the_unedited_weights_and_engram_with_the_edits(tmp_path):
    from agent.chat import SamplingParams
    from tests.fakes import FakeEditor, add_targets

    store = FactStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    (fact_id,) = add_targets(store, "Paris")
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    state = ModelState(store, model)
    state.apply(store.get_fact(fact_id), FakeEditor(model), "fake")
    edited = ChatEngine(model, tokenizer, "tiny", state=state, store=store)
    plain = ChatEngine(tiny_llama(), tokenizer, "tiny")  # the same seeded base model, never edited
    greedy = SamplingParams(temperature=0, max_tokens=8)
    try:
        assert edited.model_version == 1 and edited.weight_edits == [fact_id]
        answer = edited.complete(edited.prepare("base", HELLO), greedy)
        assert answer.provenance["weights"] == "base" and answer.model_version == 1
        assert answer.choices[0].text == plain.complete(plain.prepare("base", HELLO), greedy).choices[0].text
        live = edited.complete(edited.prepare("engram", HELLO), greedy)
        assert live.provenance["weight_edits"] == [fact_id] and live.provenance["weights"] == "edited"
        weights = dict(model.named_parameters())
        assert not all(torch.equal(weights[n], p) for n, p in tiny_llama().named_parameters())  # edits came back
    finally:
        edited.close()
        store.engine.dispose()
