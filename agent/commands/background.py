"""The agent loop inside another command (`engram serve`, `engram chat`): one thread, its own writer copy
of the model, no sources of its own (facts arrive in the store), and a clean stop with its process. When
another process holds the store's writer lock, there is none: that process applies the facts."""
from __future__ import annotations

import sys
import threading

from agent.commands.common import note


def add_agent_flags(p, where: str) -> None:
    p.add_argument("--no-agent", action="store_true",
                   help=f"do not run the agent in {where} (new facts then wait for an `engram run`)")
    p.add_argument("--contexts", default="template", choices=("template", "local", "openai", "none"),
                   help="the in-process agent's paraphrase contexts for ICE (default: template)")
    p.set_defaults(no_rag=False, no_verify=False, eval_every=None, consolidate_when_idle=False)


class BackgroundAgent:
    """The agent loop in a thread: it applies the facts stored by this process (and any other stored fact)
    with its own copy of the model; a chat engine in the same process follows the store to its edits."""

    def __init__(self, loop):
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="engram-agent", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run()
        except Exception as exc:  # noqa: BLE001 - the command goes on answering without its agent
            note(f"the in-process agent stopped: {exc}")
        finally:
            self.loop.backends.state.close()

    def stop(self) -> None:
        self.loop.stop.request("its process stopped")
        self.thread.join(30)


def background_agent(args, store, view=None) -> BackgroundAgent | None:
    """The agent over `store`, not yet started (`.thread.start()`); None when it cannot be the writer.
    `view`: where its lines go (default: one plain line per fact on stderr)."""
    from agent.commands.run import build_agent
    from agent.loop.loop import LoopConfig
    from agent.loop.sources import Offsets
    from agent.loop.view import LogView
    from memory.errors import EngramError
    from memory.lock import WriterLockError
    from memory.stages import read_offset

    try:
        loop = build_agent(args, store, [], LoopConfig(until_idle=False, poll_s=0.5),
                           Offsets(lambda key: read_offset(store, key)), view or LogView(sys.stderr),
                           None if args.contexts == "none" else args.contexts)
    except WriterLockError:
        note("another process (engram run?) is the store's writer: it applies the new facts, and the "
             "answers here follow its edits")
        return None
    except EngramError as exc:
        note(f"no in-process agent: {exc}")
        return None
    note("the agent runs in this process: new facts are routed and applied here")
    return BackgroundAgent(loop)
