"""`engram mcp` end to end, with the `mcp` package's own client over stdio.

The server is a real subprocess (`python -m agent.cli --db ... mcp`), started by the client's
`stdio_client`; a copy of its stdout is checked to hold protocol messages only. The memory tools run with
`--no-agent` and `--model` pointing at a directory that does not exist: they work without ever loading a
model, and `ask` reports the load failure as a tool error. `ask` itself runs against a tiny config-built
model saved to disk (tests/fakes.py) with a chat template. Recall ranks with the hash embedder, so nothing
downloads and every call takes milliseconds. No check depends on the tiny model's exact output or on exact
scores. One slow test runs the agent in the server's process with the real default model: a remembered
fact changes `ask`'s answer, and `forget` changes it back.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import asynccontextmanager

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from agent.cli import DEFAULT_MODEL
from tests.fakes import ROOT, save_tiny_model
from tests.test_server import TEMPLATE

TOOLS = {"remember", "recall", "list_facts", "forget", "history", "ask"}
SENTENCE = "Zorbia's capital is Quellmarsh."
PERU = {"prompt": "The capital of Peru is", "target": "Oslo", "subject": "Peru"}
DOG = {"prompt": "The name of Bob's dog is", "target": "Rex", "subject": "Bob's dog"}


@asynccontextmanager
async def mcp_session(tmp_path, model: str, *flags: str):
    """A client session with `engram mcp` over stdio; the server's stderr goes to tmp_path/mcp.log, and every
    line it writes on stdout, to the end of the process, must be a JSON-RPC message (a `tee` keeps a copy)."""
    stdout = tmp_path / "stdout.log"
    params = StdioServerParameters(
        command="sh",
        args=["-c", '"$@" | tee -a "$0"', str(stdout), sys.executable, "-m", "agent.cli", "--db",
              f"sqlite:///{tmp_path / 'store.sqlite'}", "mcp", "--embedder", "hash", "--model", model,
              "--device", "cpu", *flags],
        env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             **{k: os.environ[k] for k in ("HOME", "PATH", "HF_HOME") if k in os.environ}},
        cwd=ROOT)
    with open(tmp_path / "mcp.log", "a") as log:
        async with stdio_client(params, errlog=log) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session
    lines = stdout.read_text().splitlines()
    assert lines and all(json.loads(line)["jsonrpc"] == "2.0" for line in lines), lines[:5]


async def call(session, tool: str, **arguments):
    """The tool's structured result (a list tool's list unwrapped); fails on a tool error."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool}: {result.content}"
    out = result.structured_content
    return out["result"] if isinstance(out, dict) and set(out) == {"result"} else out


async def refused(session, tool: str, **arguments) -> str:
    """A tool error's message (the call must be refused, not crash the server)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool} should have been refused: {result.structured_content}"
    return " ".join(getattr(block, "text", "") for block in result.content)


def ids(facts) -> set[int]:
    return {f["id"] for f in facts}


def test_memory_tools_over_stdio_without_a_model(tmp_path):
    async def main():
        async with mcp_session(tmp_path, str(tmp_path / "no-such-model"), "--no-agent") as s:
            assert TOOLS <= {tool.name for tool in (await s.list_tools()).tools}

            first = await call(s, "remember", fact=SENTENCE)
            assert len(first["ids"]) == 1 and first["duplicate"] is False and first["stored"] == 1
            again = await call(s, "remember", fact=SENTENCE)
            assert again["ids"] == first["ids"] and again["duplicate"] is True
            [zorbia] = first["ids"]
            [peru] = (await call(s, "remember", fact=PERU, user="alice"))["ids"]
            [dog] = (await call(s, "remember", fact=DOG, user="bob"))["ids"]
            assert "target" in await refused(s, "remember", fact={"prompt": "The capital of Chile is"})
            assert "user_id" in await refused(s, "remember", fact={**DOG, "user_id": "bob"}, user="alice")

            # each user sees the global fact and their own, never the other's; no user sees global only
            alice = await call(s, "list_facts", user="alice")
            assert ids(alice) == {zorbia, peru}
            assert {f["scope"] for f in alice if f["id"] == peru} == {"user"}
            assert ids(await call(s, "list_facts", user="bob")) == {zorbia, dog}
            assert ids(await call(s, "list_facts")) == {zorbia}
            assert len(await call(s, "list_facts", user="alice", limit=1)) == 1

            hits = await call(s, "recall", query="What is the capital of Peru?", k=5, user="alice")
            assert peru in ids(hits) and dog not in ids(hits)
            assert all(isinstance(h["score"], float) for h in hits)
            assert next(h for h in hits if h["id"] == peru)["statement"].endswith("Oslo")
            assert [h["id"] for h in await call(s, "recall", query="capital of Peru", k=1, user="alice")] == [peru]
            bob_hits = await call(s, "recall", query="What is the capital of Peru?", k=5, user="bob")
            assert peru not in ids(bob_hits) and ids(bob_hits) <= {zorbia, dog}

            # history: stored with its stage row (the agent routes it), hidden from another user
            record = await call(s, "history", fact_id=peru, user="alice")
            assert record["id"] == peru and record["target"] == "Oslo" and record["stage"]["stage"] == "stored"
            assert "no fact" in await refused(s, "history", fact_id=peru, user="bob")
            assert "no fact" in await refused(s, "history", fact_id=10_000)

            # forget: one id, the owner's only; then gone from list_facts and recall
            assert "no fact" in await refused(s, "forget", fact_id=peru, user="bob")
            assert await call(s, "forget", fact_id=peru, user="alice") == {"id": peru, "deleted": True}
            assert ids(await call(s, "list_facts", user="alice")) == {zorbia}
            assert peru not in ids(await call(s, "recall", query="capital of Peru", k=5, user="alice"))
            assert peru in ids(await call(s, "list_facts", user="alice", status="deleted"))
            kinds = [e["kind"] for e in (await call(s, "history", fact_id=peru, user="alice"))["history"]]
            assert kinds[-1] == "deleted"

            # no model was needed so far; `ask` tries to load one, and its failure is a tool error
            assert "model" in await refused(s, "ask", question="What is the capital of Zorbia?")
            assert ids(await call(s, "list_facts", user="bob")) == {zorbia, dog}  # the server lives on

    anyio.run(main)
    assert "ready at version" not in (tmp_path / "mcp.log").read_text()


@pytest.fixture
def tiny_model(tmp_path):
    """A tiny model whose saved tokenizer has a chat template, and a fresh gist add-on."""
    from transformers import AutoTokenizer

    model_dir, addon_dir = save_tiny_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir, addon_dir


def test_ask_answers_from_the_model_with_its_provenance(tmp_path, tiny_model):
    model_dir, addon_dir = tiny_model

    async def main():  # no agent: the weights and the pool hold still, so greedy answers repeat
        async with mcp_session(tmp_path, str(model_dir), "--gist-addon", str(addon_dir), "--no-agent") as s:
            [peru] = (await call(s, "remember", fact=PERU, user="alice"))["ids"]
            [japan] = (await call(s, "remember", fact={"prompt": "The capital of Japan is", "target": "Nairobi",
                                                       "subject": "Japan"}))["ids"]
            question = "What is the capital of Peru?"
            answer = await call(s, "ask", question=question, user="alice", max_tokens=4)
            assert isinstance(answer["text"], str) and answer["finish_reason"] in ("stop", "length")
            assert answer["model_version"] == 0 and answer["route"] == "engram"
            assert answer["provenance"]["route"] == "engram" and answer["provenance"]["user"] == "alice"
            assert answer["provenance"]["weights"] == "edited"
            assert await call(s, "ask", question=question, user="alice", max_tokens=4) == answer  # greedy

            base = await call(s, "ask", question=question, model="base", max_tokens=4)
            assert base["route"] == "base" and base["provenance"]["weights"] == "base"

            # the RAG route names the facts it showed: alice's fact for alice, never for bob
            for_alice = await call(s, "ask", question=question, user="alice", model="rag", max_tokens=2)
            assert peru in {h["fact_id"] for h in for_alice["provenance"]["rag_hits"]}
            for_bob = await call(s, "ask", question=question, user="bob", model="rag", max_tokens=2)
            assert {h["fact_id"] for h in for_bob["provenance"]["rag_hits"]} == {japan}

            assert "does not exist" in await refused(s, "ask", question=question, model="gpt-9")
            assert "max_tokens" in await refused(s, "ask", question=question, max_tokens=0)

    anyio.run(main)
    assert "ready at version 0" in (tmp_path / "mcp.log").read_text()


def test_streamable_http_serves_the_same_tools_when_the_agent_cannot_load(tmp_path):
    import signal
    import socket
    import subprocess

    from mcp import Client

    with socket.socket() as probe:  # a free port (released just before the server binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "mcp.log", "w")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen([sys.executable, "-m", "agent.cli", "--db", f"sqlite:///{tmp_path / 'store.sqlite'}",
                               "mcp", "--transport", "http", "--port", str(port), "--embedder", "hash",
                               "--model", str(tmp_path / "no-such-model")],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)

    async def main():
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            assert TOOLS <= {tool.name for tool in (await client.list_tools()).tools}
            await call(client, "remember", fact=SENTENCE, user="alice")
            assert [h["statement"] for h in await call(client, "recall", query="Zorbia", user="alice")] == [SENTENCE]
            assert await call(client, "recall", query="Zorbia", user="bob") == []
            while "no in-process agent" not in (tmp_path / "mcp.log").read_text():  # its model does not exist
                assert time.monotonic() < deadline, (tmp_path / "mcp.log").read_text()
                await anyio.sleep(0.1)

    try:
        deadline = time.monotonic() + 60
        while True:  # until the server listens
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "mcp.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        anyio.run(main)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        log.close()
    assert server.returncode == 0, (tmp_path / "mcp.log").read_text()


async def until(check, what: str, seconds: float):
    """check()'s first truthy result, asked every half second."""
    deadline = time.monotonic() + seconds
    while not (found := await check()):
        assert time.monotonic() < deadline, what
        await anyio.sleep(0.5)
    return found


@pytest.mark.slow
def test_the_agent_in_process_applies_a_remembered_fact_and_forget_takes_it_out(tmp_path):
    """The real default model, loaded twice: the agent's writer copy at startup, `ask`'s on the first ask."""
    async def main():
        async with mcp_session(tmp_path, DEFAULT_MODEL) as s:
            async def ask():
                return await call(s, "ask", question="What is the capital of Zorbia?", max_tokens=12)

            async def history(fact_id, check):
                record = await call(s, "history", fact_id=fact_id)
                return record if check(record) else None

            assert "Quellmarsh" not in (await ask())["text"]
            [fact] = (await call(s, "remember", fact=SENTENCE))["ids"]
            record = await until(lambda: history(fact, lambda r: r["stage"]["stage"] == "applied"),
                                 "the agent never applied the fact", 120)
            assert record["stage"]["route"] == "gist"  # the router's default

            async def learned():  # the engine follows the store at most once a second
                answer = await ask()
                return answer if "Quellmarsh" in answer["text"] else None
            answer = await until(learned, "the answer never reflected the fact", 30)
            assert fact in answer["provenance"]["pool"]["rows_mentioned"]

            await call(s, "forget", fact_id=fact)
            await until(lambda: history(fact, lambda r: "rolled_back" in [e["kind"] for e in r["history"]]),
                        "the agent never took the fact out", 60)

            async def forgotten():
                return "Quellmarsh" not in (await ask())["text"]
            await until(forgotten, "the answer still reflects the forgotten fact", 30)

    anyio.run(main)
    log = (tmp_path / "mcp.log").read_text()
    assert "the agent runs in this process" in log, log[-3000:]
    assert "stopped (its process stopped)" in log, log[-3000:]  # it stopped cleanly when stdin closed
