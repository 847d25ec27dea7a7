"""`engram chat`: the session's history and slash commands over the tiny model (fast), and the whole command
with the real default model on piped input (slow): /remember changes the next answer, /forget changes it
back, /why names the fact that shaped the answer.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from agent.chat import ChatEngine, SamplingParams
from agent.chat.session import ChatSession
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.facts import FactInput
from memory.models import Stage
from memory.store import FactStore
from tests.fakes import ROOT
from tests.test_server import TEMPLATE


@pytest.fixture
def session(tmp_path):
    store = FactStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    store.add_facts([FactInput(prompt="The capital of Peru is", target="Oslo", subject="Peru", scope="user",
                               user_id="alice")])
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    state = ModelState(store, model)
    state.rebuild(sweep=False)
    engine = ChatEngine(model, tokenizer, "tiny", state=state, store=store)
    yield ChatSession(engine, params=SamplingParams(temperature=0, max_tokens=6), agent_running=False)
    engine.close()


def said(session: ChatSession, line: str) -> str:
    out: list[str] = []
    assert session.handle(line, out.append)
    return "".join(out)


def test_questions_keep_the_conversation_and_clear_starts_again(session):
    first = said(session, "Hello there")
    assert first.endswith("\n") and len(session.history) == 2
    assert session.history[1] == {"role": "assistant", "content": first[:-1]}
    said(session, "And again?")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert "starts again" in said(session, "/clear") and session.history == []
    assert '"route": "engram"' in said(session, "/why")


def test_remember_forget_facts_route_and_bad_commands(session):
    out = said(session, "/remember Zorbia's capital is Quellmarsh.")
    assert out.startswith("remembered as fact 2") and "engram run" in out  # no agent here: it waits in the store
    with session.store.transaction() as s:
        assert s.get(Stage, 2).stage == "stored"
    assert "already known as fact 2" in said(session, "/remember Zorbia's capital is Quellmarsh.")
    assert "Quellmarsh" in said(session, "/facts") and "Oslo" not in said(session, "/facts")  # alice's is hers
    session.user = "alice"
    assert "Oslo" in said(session, "/facts")
    assert "never routed" in said(session, "/route 2")
    assert "forgot fact 2" in said(session, "/forget 2") and "Quellmarsh" not in said(session, "/facts")
    assert "/remember:" in said(session, '/remember {"prompt": "no target"}')  # the reason, nothing stored
    assert len(session.store.list_facts(status=None)) == 2
    assert "unknown command /nope" in said(session, "/nope")
    assert "/forget:" in said(session, "/forget 99")
    assert "answering with base" in said(session, "/model base") and session.model_id == "base"
    assert not session.handle("/quit", [].append)


@pytest.mark.slow
def test_engram_chat_learns_a_sentence_and_forgets_it(tmp_path):
    lines = ["What is the capital of Zorbia?", "/remember Zorbia's capital is Quellmarsh.", "/clear",
             "What is the capital of Zorbia?", "/why", "/forget 1", "/clear", "What is the capital of Zorbia?"]
    done = subprocess.run([sys.executable, "-m", "agent.cli", "--db", f"sqlite:///{tmp_path / 's.sqlite'}", "chat"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    before, rest = out.split("remembered as fact 1", 1)
    assert "Quellmarsh" not in before
    assert rest.startswith(": applied via gist")
    learned, after = rest.split("forgot fact 1", 1)
    assert "Quellmarsh" in learned and '"pool"' in learned  # the answer, and /why's provenance
    assert "Quellmarsh" not in after.split("\n", 2)[-1]  # the wait for the rollback is the agent's
