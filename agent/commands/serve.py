"""`engram serve`: the OpenAI-compatible chat server (agent/server) over the store's live model."""
from __future__ import annotations

import sys
import threading

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

    def start_agent() -> None:  # after the chat model: /health turns 200 first, posted facts wait in the store
        agent = _in_process_agent(args, store)
        if agent is not None:
            agents.append(agent)
            agent.thread.start()

    def load_all() -> None:
        load()
        if engines and not args.no_agent:
            start_agent()

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


class _Agent:
    """The agent loop in a thread of the server: it applies the facts posted to /v1/facts (and any other
    stored fact) with its own copy of the model; the chat engine follows the store to its edits."""

    def __init__(self, loop):
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="engram-agent", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run()
        except Exception as exc:  # noqa: BLE001 - the server keeps answering chats without its agent
            note(f"engram serve: the agent stopped: {exc}")
        finally:
            self.loop.backends.state.close()

    def stop(self) -> None:
        self.loop.stop.request("server stopped")
        self.thread.join(30)


def _in_process_agent(args, store) -> _Agent | None:
    from agent.commands.run import build_agent
    from agent.loop.loop import LoopConfig
    from agent.loop.sources import Offsets
    from agent.loop.view import LogView
    from memory.errors import EngramError
    from memory.lock import WriterLockError
    from memory.stages import read_offset

    try:
        loop = build_agent(args, store, [], LoopConfig(until_idle=False, poll_s=0.5),
                           Offsets(lambda key: read_offset(store, key)), LogView(sys.stderr),
                           None if args.contexts == "none" else args.contexts)
    except WriterLockError:
        note("another process (engram run?) is the store's writer: it applies the facts posted here, and "
             "the chat answers follow its edits")
        return None
    except EngramError as exc:
        note(f"engram serve: no in-process agent: {exc}")
        return None
    note("the agent runs in this server: facts posted to /v1/facts are routed and applied here")
    return _Agent(loop)


def _configure(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (repeatable; /health and /metrics stay open)")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask")
    p.add_argument("--no-agent", action="store_true",
                   help="do not run the agent in the server (facts posted here then wait for an `engram run`)")
    p.add_argument("--contexts", default="template", choices=("template", "local", "openai", "none"),
                   help="the in-process agent's paraphrase contexts for ICE (default: template)")
    p.set_defaults(no_rag=False, no_verify=False, eval_every=None, consolidate_when_idle=False)


COMMANDS = {
    "serve": (cmd_serve, _configure, "an OpenAI-compatible chat server over the live model (FastAPI + uvicorn)"),
}
