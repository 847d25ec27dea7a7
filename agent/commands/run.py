"""`engram run`: the long-running agent over one or more fact sources (the loop is agent/loop)."""
from __future__ import annotations

from pathlib import Path

from agent.commands.common import load_state, open_gist, open_store
from agent.commands.facts import CONTEXT_CHOICES, _context_generator_kind
from memory.errors import ConfigError


def _configure_run(p) -> None:
    p.add_argument("--source", action="append", required=True, metavar="FILE|DIR|-",
                   help="a JSONL file to tail, a folder whose *.jsonl files are tailed, or - for standard input; "
                        "repeat for several")
    p.add_argument("--until-idle", action="store_true",
                   help="process what the sources hold now, then exit (1 if lines were rejected or facts failed)")
    p.add_argument("--contexts", default="template", choices=CONTEXT_CHOICES,
                   help="paraphrase contexts for ICE (default: template, offline and fast); auto = OpenAI-compatible "
                        "if ENGRAM_CONTEXT_BASE_URL is set, else the local model")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--no-rag", action="store_true", help="do not keep the RAG index in step with the store")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="every N applied facts, measure retention, locality and fluency into the store "
                        "(`engram report` draws them)")
    p.add_argument("--eval-sample", type=int, default=None, metavar="K",
                   help="learned facts whose retention each self-evaluation measures (default 20)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check each applied fact with a greedy answer to its own prompt (nor retry one "
                        "its route did not learn on the other route)")
    p.add_argument("--consolidate-when-idle", action="store_true",
                   help="while the sources are idle, move global facts from the gist pool into verified ICE weight "
                        "edits, one at a time (off by default: weight edits cost more locality than the pool)")
    p.add_argument("--max-attempts", type=int, default=3, help="failed attempts before a fact is parked (default 3)")
    p.add_argument("--batch", type=int, default=16, help="facts claimed per round (default 16)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between looks at idle sources (default 0.5)")


def cmd_run(args) -> int:
    from agent.loop.loop import LoopConfig
    from agent.loop.sources import Offsets, open_sources
    from agent.loop.view import make_view
    from memory.stages import read_offset

    # Every choice is checked before the model loads.
    eval_config = None
    if args.eval_every is not None:
        from agent.selfeval import SelfEvalConfig

        eval_config = SelfEvalConfig(every=args.eval_every, **_sample(args))  # raises ConfigError on a bad N or K
    elif args.eval_sample is not None:
        raise ConfigError("--eval-sample needs --eval-every")
    config = LoopConfig(max_attempts=args.max_attempts, batch=args.batch, poll_s=args.poll, until_idle=args.until_idle,
                        consolidate_when_idle=args.consolidate_when_idle)
    if args.gist_addon and not Path(args.gist_addon).is_dir():
        raise ConfigError(f"gist add-on directory {args.gist_addon} does not exist")
    kind = _context_generator_kind(args.contexts) if args.contexts != "none" else None
    offsets = Offsets(lambda key: read_offset(store, key))  # read on the first poll, once `store` is open
    sources = open_sources(args.source, offsets)  # a mistyped source fails before a store is created
    store = open_store(args, create=True)
    loop = build_agent(args, store, sources, config, offsets, make_view(args.json), kind, eval_config)
    try:
        return loop.run()
    finally:
        loop.backends.state.close()


def build_agent(args, store, sources, config, offsets, view, kind: str | None, eval_config=None):
    """The agent loop over `store` and its backends, the live model loaded as the store's writer
    (WriterLockError when another process is). Shared by `engram run` and `engram serve`."""
    from agent.loop.loop import AgentLoop, Backends
    from agent.loop.routing import default_router

    router = default_router(store)
    _, loaded, state = load_state(args, writer=True, store=store)
    try:
        from editors.registry import make_editor

        generator = None
        if kind is not None:
            from agent.enrich import generator_from_args

            generator = generator_from_args(kind, loaded)
        rag = None
        if not args.no_rag:
            from memory.vector import VectorIndex

            rag = VectorIndex(directory=store.data_dir / "rag")
        verifier = None
        if not args.no_verify:
            from agent.loop.verify import ModelVerifier

            policy = getattr(router, "policy", None)  # the fallback router has none: the default budget
            budget = {"max_new_tokens": policy.verify_max_new_tokens} if policy is not None else {}
            verifier = ModelVerifier(state.model, loaded.tokenizer, **budget)
        selfeval = None
        if args.eval_every is not None:
            from agent.selfeval import SelfEvaluator

            selfeval = SelfEvaluator(store, loaded.model, loaded.tokenizer, eval_config,
                                     unedited=state.unedited, model_name=loaded.name)
        editor = make_editor(config.weight_backend, loaded.model, loaded.tokenizer)
        consolidator = None
        if args.consolidate_when_idle:
            from agent.consolidate import Consolidator, weights_check

            policy = getattr(router, "policy", None)
            check = weights_check(state.model, loaded.tokenizer, getattr(policy, "verify_max_new_tokens", None))
            consolidator = lambda gist: Consolidator(store, state, editor, gist, check, policy)  # noqa: E731
        backends = Backends(state=state, editor=editor, router=router,
                            open_gist=lambda: open_gist(args, store, loaded, required=True), generator=generator,
                            rag=rag, verifier=verifier, selfeval=selfeval, consolidator=consolidator)
        return AgentLoop(store, sources, backends, view, config, offsets)
    except BaseException:
        state.close()
        raise


def _sample(args) -> dict:
    return {} if args.eval_sample is None else {"sample": args.eval_sample}


COMMANDS = {
    "run": (cmd_run, _configure_run, "the agent: tail fact sources and move every fact through its stages "
                                     "(contexts, routing, weights or gist pool), surviving kills"),
}
