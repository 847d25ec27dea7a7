"""`engram mcp`: the MCP memory server (agent/adapters/mcp.py) over the store, on stdio or streamable HTTP.

The agent runs in this process, as in `engram serve` and `engram chat`, and starts with the server rather
than on the first `ask`: an assistant that calls `remember` expects the fact to take effect without any
other call. Its writer copy of the model loads in a thread, so the MCP handshake and the memory tools answer
at once. `ask`'s engine (a reader copy) loads on the first `ask` and follows the agent's edits from then on
(agent/chat/follow.py). With --no-agent (or when another process is the store's writer) no model loads
until the first `ask`. On stdio, stdout is the protocol channel: the agent's lines and notes go to stderr.
"""
from __future__ import annotations

import sys
import threading

from agent.commands.background import add_agent_flags, background_agent
from agent.commands.common import note, open_store
from agent.commands.serve import LOOPBACK


class _Agent:
    """The in-process agent, built in a thread; `stop` ends it, or keeps it from starting if it still loads."""

    def __init__(self, args, store):
        self._lock = threading.Lock()
        self._agent = None
        self._stopped = False
        threading.Thread(target=self._load, args=(args, store), name="engram-agent-load", daemon=True).start()

    def _load(self, args, store) -> None:
        from agent.loop.view import LogView

        # the first `ask` may load its own copy meanwhile: model loads take turns (memory/loading.py)
        agent = background_agent(args, store, view=LogView(sys.stderr, sys.stderr))  # never stdout: see above
        if agent is None:
            return
        with self._lock:
            if not self._stopped:
                agent.thread.start()
                self._agent = agent
                return
        agent.loop.backends.state.close()  # the server stopped while the model loaded: let the writer lock go

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            agent = self._agent
        if agent is not None:
            agent.stop()


def cmd_mcp(args) -> int:
    from agent.adapters.mcp import build_server, run

    store = open_store(args, create=True)  # remember writes facts, as POST /v1/facts does

    embedder = None
    if args.embedder == "hash":
        from memory.embeddings import HashEmbedder

        embedder = HashEmbedder()

    def engine_factory():  # on the first `ask` only: the memory tools answer without loading a model
        from agent.chat import ChatEngine

        engine = ChatEngine.from_args(args, store=store)
        engine.embedder = embedder  # the rag routes rank with recall's embedder (their index is opened lazily)
        note(f"engram mcp: model {engine.name} ready at version {engine.model_version}")
        return engine
    server = build_server(store, engine_factory, embedder=embedder)
    if args.transport == "http":
        if args.host not in LOOPBACK:
            note(f"warning: serving MCP on {args.host} with no authentication: anyone who can reach it can "
                 "read and change the memory")
        note(f"engram mcp: streamable HTTP at http://{args.host}:{args.port}/mcp")
    agent = None if args.no_agent else _Agent(args, store)
    try:
        run(server, args.transport, host=args.host, port=args.port)
    except KeyboardInterrupt:  # Ctrl-C is how an HTTP server is stopped: a normal end
        pass
    finally:  # the client closed stdin, Ctrl-C, or an error: the agent stops after its current step
        if agent is not None:
            agent.stop()
        server.engram.close()
    return 0


def _configure(p) -> None:
    p.add_argument("--transport", default="stdio", choices=("stdio", "http"),
                   help="stdio (an assistant starts this command) or streamable HTTP (at /mcp)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind for --transport http (default: loopback)")
    p.add_argument("--port", type=int, default=8001, help="port for --transport http")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--embedder", default="minilm", choices=("minilm", "hash"),
                   help="recall's embedder: the RAG baseline's MiniLM, or a word-hashing one (tests, toy runs)")
    add_agent_flags(p, "the MCP server")
    p.epilog = ("The agent starts with the server (its model loading in the background, so the handshake does "
                "not wait) because an assistant expects `remember` to take effect without another command; "
                "`ask` loads its own copy of the model on first use and follows the agent's edits. With "
                "--no-agent no model loads until the first `ask`.")


COMMANDS = {
    "mcp": (cmd_mcp, _configure, "an MCP memory server, its agent in process: remember, recall, list_facts, "
                                 "forget, history, ask"),
}
