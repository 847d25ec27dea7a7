"""`engram serve`: the OpenAI-compatible chat server (agent/server) over the store's live model."""
from __future__ import annotations

import threading

from agent.commands.background import add_agent_flags, background_agent
from agent.commands.common import note, open_store

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args) -> int:
    import uvicorn

    from agent.chat import ChatEngine
    from agent.server import ServerLimits, create_app, set_engine
    from agent.server.app import set_load_error

    store = open_store(args, create=True)  # the server is a long-running agent, as `engram run` is
    if args.host not in LOOPBACK and not args.api_key:
        note(f"warning: serving on {args.host} without --api-key: anyone who can reach it can chat")
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens)
    app = create_app(None, api_keys=args.api_key or (), limits=limits, store=store)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=5))
    engines: list = []

    def load() -> None:  # in the background, so /health answers 503 while the model loads
        try:
            engines.append(ChatEngine.from_args(args, store=store))
            set_engine(app, engines[0])
            note(f"model {engines[0].name} ready at version {engines[0].model_version}; "
                 f"routes: {', '.join(engines[0].routes())}")
        except Exception as exc:  # noqa: BLE001 - any load failure ends the server with its one line
            set_load_error(app, str(exc))
            note(f"engram serve: the model failed to load: {exc}")
            server.should_exit = True

    agents: list = []

    def load_all() -> None:  # the agent after the chat model: /health turns 200 first, posted facts wait
        load()
        agent = background_agent(args, store) if engines and not args.no_agent else None
        if agent is not None:
            agents.append(agent)
            agent.thread.start()

    threading.Thread(target=load_all, name="engram-load", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: a normal stop, not an error
        pass
    finally:
        for agent in agents:
            agent.stop()
        for engine in engines:
            engine.close()
    return 2 if app.state.load_error else 0


def _configure(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (repeatable; /health and /metrics stay open)")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask")
    add_agent_flags(p, "the server")


COMMANDS = {
    "serve": (cmd_serve, _configure, "an OpenAI-compatible chat server over the live model (FastAPI + uvicorn)"),
}
