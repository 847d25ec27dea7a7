"""The whole product over HTTP with the real default model: `engram serve` (its agent in process) on a fresh
store, the official `openai` client. A sentence posted to /v1/facts changes the next chat answer; a DELETE
changes it back; another user's scoped fact never reaches this user.

Slow (the real SmolLM2-135M, loaded twice: the chat engine and the agent's writer copy).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.fakes import ROOT

pytestmark = pytest.mark.slow
def question(country: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of {country}?"}]


def request(base: str, method: str, path: str, body=None, user: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"X-Engram-User": user} if user else {})}
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(base + path, data, headers, method=method), timeout=60) as r:
        return json.loads(r.read())


def wait_for(check, what: str, server, log, seconds: float = 240):
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline and server.poll() is None, f"{what}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_a_sentence_posted_over_http_changes_the_answer_and_a_delete_changes_it_back(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "agent.cli", "--db", f"sqlite:///{tmp_path / 's.sqlite'}",
                                   "serve", "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    try:
        def healthy():
            try:
                return request(base, "GET", "/health")["status"] == "ok"
            except OSError:
                return False
        wait_for(healthy, "the server never became healthy", server, log)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(user: str | None = None, country: str = "Zorbia") -> str:
            reply = client.chat.completions.create(model="engram", messages=question(country), temperature=0,
                                                   max_tokens=12, user=user)
            return reply.choices[0].message.content

        assert "Quellmarsh" not in ask()
        (fact_id,) = request(base, "POST", "/v1/facts", {"text": "Zorbia's capital is Quellmarsh."})["ids"]
        (carols,) = request(base, "POST", "/v1/facts", {"text": "Velmora's capital is Brightwater.", "scope": "user",
                                                        "user_id": "carol"})["ids"]

        def applied(fid):
            return lambda: (request(base, "GET", f"/v1/facts/{fid}")["stage"] or {}).get("stage") == "applied"
        wait_for(applied(fact_id), "the posted fact was never applied", server, log)
        wait_for(lambda: "Quellmarsh" in ask(), "the answer never changed", server, log, seconds=30)
        wait_for(applied(carols), "carol's fact was never applied", server, log)
        assert "Brightwater" in ask("carol", "Velmora")
        assert "Brightwater" not in ask("dave", "Velmora")  # carol's scoped fact is hers alone
        request(base, "DELETE", f"/v1/facts/{fact_id}")
        rolled_back = lambda: "rolled_back" in [e["kind"] for e in request(base, "GET", f"/v1/facts/{fact_id}")["history"]]  # noqa: E731
        wait_for(rolled_back, "the deleted fact was never taken out", server, log)
        wait_for(lambda: "Quellmarsh" not in ask(), "the answer never changed back", server, log, seconds=30)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    assert server.returncode == 0, log.read_text()[-3000:]
