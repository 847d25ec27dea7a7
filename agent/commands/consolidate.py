"""`engram consolidate`: move global facts from the gist pool into verified ICE weight edits."""
from __future__ import annotations

import sys

from agent.commands.common import emit, load_state, open_gist, open_store


def _configure(p) -> None:
    p.add_argument("--limit", type=int, default=None, metavar="N", help="consolidate at most N facts")
    p.add_argument("--retry-failed", action="store_true",
                   help="try again the facts an earlier consolidation did not teach the weights")
    p.add_argument("--dry-run", action="store_true", help="list the candidates; change nothing (no model load)")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")


def cmd_consolidate(args) -> int:
    from agent.consolidate import Consolidator, weights_check
    from agent.loop.signals import StopFlag, stop_on_signals
    from agent.router import policy_from_store
    from memory.errors import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    store = open_store(args)
    policy = policy_from_store(store)
    if args.dry_run:
        ids = Consolidator(store, None, None, None, None, policy).candidates(args.limit, args.retry_failed)
        emit(args, {"candidates": ids}, f"{len(ids)} fact(s) would move from the gist pool into the weights"
             + (f": {', '.join(map(str, ids[:20]))}{' …' if len(ids) > 20 else ''}" if ids else ""))
        return 0
    from editors.registry import make_editor

    _, loaded, state = load_state(args, writer=True, store=store)
    try:
        gist = open_gist(args, store, loaded)
        if gist is None:
            emit(args, {"consolidated": 0}, "the gist pool is empty: nothing to consolidate")
            return 0
        editor = make_editor("ice", loaded.model, loaded.tokenizer)
        tool = Consolidator(store, state, editor, gist,
                            weights_check(state.model, loaded.tokenizer, policy.verify_max_new_tokens), policy)

        def progress(n, total, fact_id, result) -> None:
            if not args.json:
                print(f"\r[{n}/{total}] fact {fact_id}: {len(result.consolidated)} moved, "
                      f"{len(result.not_learned)} not learned", end="", file=sys.stderr, flush=True)

        stop = StopFlag()
        with stop_on_signals(stop):  # SIGTERM/Ctrl-C: finish the fact in hand, record it, stop
            result = tool.run(args.limit, args.retry_failed, progress, stop=lambda: stop.requested)
        if not args.json:
            print(file=sys.stderr)
    finally:
        state.close()
    text = (f"consolidated {len(result.consolidated)} fact(s) into the weights in {result.seconds:.1f} s "
            f"(model version {state.version}); {len(result.not_learned)} not learned by ICE kept their gist")
    if result.stopped:
        text += f"; stopped by {stop.why} (run it again to go on)"
    if result.errors:
        text += f"; {len(result.errors)} failed: " + "; ".join(f"fact {k}: {v}" for k, v in list(result.errors.items())[:5])
    emit(args, result.to_dict(), text)
    return 1 if result.errors else 0


COMMANDS = {
    "consolidate": (cmd_consolidate, _configure, "move global facts from the gist pool into verified ICE weight "
                                                  "edits (their gists leave the pool)"),
}
