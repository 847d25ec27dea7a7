"""One terminal chat (`engram chat`): the history, the slash commands, the streamed answers.

A line is a question unless it starts with "/". `/remember` stores a fact (a sentence, or a JSON fact)
with its agent stages, as `POST /v1/facts` does, and waits briefly for the agent to apply it, so the next
answer already knows it (the gist pool by default: it takes effect at once). The session keeps the
conversation; `/clear` starts it again when it no longer fits the model's context window.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.chat.engine import ROUTES, ChatEngine, SamplingParams
from agent.chat.prompts import ChatInputError

HELP = """/remember <sentence or JSON fact>   learn a fact (routed and applied by the agent)
/forget <id>                        delete a fact (its edit rolled back, its gist removed)
/facts                              the facts this user sees
/route <id>                         why a fact went to the weights or the pool, and what happened
/why                                which stored facts shaped the last answer
/model <id>                         answer with another route: engram, base, rag, rag-subject, icl
/clear                              forget the conversation (not the facts)
/quit                               leave (Ctrl-D too)"""
APPLIED, GONE = ("applied",), ("failed", "dropped")


@dataclass
class ChatSession:
    engine: ChatEngine
    model_id: str = "engram"
    user: str | None = None
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0, max_tokens=128))
    wait_s: float = 60.0  # how long /remember waits for the agent to apply the fact
    agent_running: bool = True
    history: list[dict] = field(default_factory=list)
    last: dict | None = None  # the last answer's provenance

    @property
    def store(self):
        return self.engine.store

    def handle(self, line: str, write: Callable[[str], None]) -> bool:
        """Answer one line, writing as it goes; False once the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self._ask(line, write)
            return True
        name, _, rest = line[1:].partition(" ")
        command = getattr(self, f"_cmd_{name.replace('-', '_')}", None)
        if name in ("quit", "exit"):
            return False
        if command is None:
            write(f"unknown command /{name}; /help lists them\n")
            return True
        try:
            command(rest.strip(), write)
        except Exception as exc:  # noqa: BLE001 - one bad command never ends the session
            write(f"/{name}: {exc}\n")
        return True

    # -- questions ----------------------------------------------------------------------------------
    def _ask(self, question: str, write) -> None:
        messages = self.history + [{"role": "user", "content": question}]
        try:
            stream = self.engine.start(self.engine.prepare(self.model_id, messages, self.user, self.params.max_tokens),
                                       self.params)
        except ChatInputError as exc:
            write(f"{exc} (/clear starts the conversation again)\n")
            return
        text = ""
        for event in stream:
            if event.text:
                text += event.text
                write(event.text)
        write("\n")
        self.history = messages + [{"role": "assistant", "content": text}]
        self.last = {"model_version": stream.model_version, **stream.provenance}

    # -- commands -----------------------------------------------------------------------------------
    def _cmd_help(self, _rest: str, write) -> None:
        write(HELP + "\n")

    def _cmd_remember(self, rest: str, write) -> None:
        from memory.facts import parse_fact
        from memory.stages import add_with_stages

        if not rest:
            write("/remember needs a sentence or a JSON fact\n")
            return
        record = json.loads(rest) if rest.startswith("{") else {"text": rest}
        if self.user and isinstance(record, dict) and "scope" not in record:
            record = {**record, "scope": "user", "user_id": self.user}
        added = add_with_stages(self.store, [parse_fact(record)])  # a bad fact: its reason, nothing stored
        (fact_id,) = added.fact_ids
        if added.duplicates:
            write(f"already known as fact {fact_id}\n")
            return
        write(f"remembered as fact {fact_id}")
        if not self.agent_running:
            write("; an `engram run` on this store will apply it\n")
            return
        stage = self._wait(fact_id)
        self._changed()
        route = f" via {stage['route']}" if stage and stage.get("route") else ""
        write(f": {stage['stage'] if stage else 'stored'}{route}\n" if stage and stage["stage"] in APPLIED + GONE
              else f": still {stage['stage'] if stage else 'stored'} after {self.wait_s:.0f} s (the agent goes on)\n")

    def _wait(self, fact_id: int) -> dict | None:
        from memory.models import Stage

        deadline = time.monotonic() + self.wait_s
        while True:
            with self.store.transaction() as s:
                row = s.get(Stage, fact_id)
                stage = {"stage": row.stage, "route": row.route} if row is not None else None
            if stage is None or stage["stage"] in APPLIED + GONE or time.monotonic() > deadline:
                return stage
            time.sleep(0.2)

    def _changed(self) -> None:
        if self.engine.follower is not None:  # the next answer catches up with the agent at once
            self.engine.follower.expire()

    def _cmd_forget(self, rest: str, write) -> None:
        from sqlalchemy import select

        from memory.models import Edit

        fact = self.store.delete_fact(int(rest), reason="forgotten in engram chat")
        deadline = time.monotonic() + (self.wait_s if self.agent_running else 0)
        while time.monotonic() < deadline:  # until the agent has rolled its edit back or removed its gist
            with self.store.transaction() as s:
                if s.scalar(select(Edit.id).where(Edit.fact_id == fact.id, Edit.status == "applied")) is None:
                    break
            time.sleep(0.2)
        self._changed()
        write(f"forgot fact {fact.id}: {fact.statement}\n")

    def _cmd_facts(self, _rest: str, write) -> None:
        facts = self.store.list_facts(user_id=self.user)
        if self.user is None:
            facts = [f for f in facts if f.scope == "global"]
        write("".join(f"{f.id:>6}  {f.statement}\n" for f in facts) or "(no facts)\n")

    def _cmd_route(self, rest: str, write) -> None:
        from agent.router import explain

        payload = explain(self.store, int(rest))
        decision, outcome = payload.get("decision") or {}, payload.get("outcome") or {}
        write(f"fact {payload['fact_id']}: {payload['statement']}\n  "
              + (f"{decision.get('route')}: {decision.get('reason')}\n  {outcome.get('summary', outcome)}\n"
                 if decision else f"{payload.get('message')}\n"))

    def _cmd_why(self, _rest: str, write) -> None:
        write(json.dumps(self.last, indent=2, default=str) + "\n" if self.last else "no answer yet\n")

    def _cmd_model(self, rest: str, write) -> None:
        if rest not in ROUTES:
            write(f"/model takes one of {', '.join(ROUTES)}\n")
            return
        self.model_id = rest
        write(f"answering with {rest}\n")

    def _cmd_clear(self, _rest: str, write) -> None:
        self.history = []
        write("the conversation starts again\n")
