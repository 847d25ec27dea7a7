"""`engram mcp`: the MCP memory server (agent/adapters/mcp.py) over the store, on stdio or streamable HTTP."""
from __future__ import annotations

from agent.commands.common import note, open_store
from agent.commands.serve import LOOPBACK


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
    try:
        run(server, args.transport, host=args.host, port=args.port)
    except KeyboardInterrupt:  # Ctrl-C is how an HTTP server is stopped: a normal end
        pass
    finally:
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


COMMANDS = {
    "mcp": (cmd_mcp, _configure, "an MCP memory server: remember, recall, list_facts, forget, history, ask"),
}
