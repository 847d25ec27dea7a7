"""`engram chat`: a terminal chat with the live model, streamed, with history and slash commands
(agent/chat/session.py). The agent runs in the same process, so `/remember` takes effect at once."""
from __future__ import annotations

import os
import sys

from agent.commands.background import add_agent_flags, background_agent
from agent.commands.common import note, open_store


def cmd_chat(args) -> int:
    from agent.chat import ChatEngine, SamplingParams
    from agent.chat.session import ChatSession
    from agent.loop.view import LogView

    store = open_store(args, create=True)
    engine = ChatEngine.from_args(args, store=store)
    agent = None
    if not args.no_agent:
        quiet = open(os.devnull, "w")  # its per-fact lines would break into the conversation
        agent = background_agent(args, store, view=LogView(quiet, quiet))
        if agent is not None:
            agent.thread.start()
    session = ChatSession(engine, args.model_id, args.user,
                          SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens),
                          agent_running=agent is not None)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        note(f"engram chat: {engine.name}, model version {engine.model_version}, answering as "
             f"{args.model_id}{f' for {args.user}' if args.user else ''}; /help for commands, Ctrl-D to leave")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:  # Ctrl-C drops the line being typed, as a shell does
                write("\n")
                continue
            if not session.handle(line, write):
                break
    finally:
        if agent is not None:
            agent.stop()
        engine.close()
    return 0


def _configure(p) -> None:
    p.add_argument("--model-id", default="engram", choices=("engram", "base", "rag", "rag-subject", "icl"),
                   help="the route that answers (default: engram, the edited weights and the gist pool)")
    p.add_argument("--user", default=None, help="chat as this user: their scoped facts plus the global ones")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    add_agent_flags(p, "the chat")


COMMANDS = {
    "chat": (cmd_chat, _configure, "chat with the live model in the terminal (streamed; /remember, /forget, "
                                   "/facts, /route, /why)"),
}
