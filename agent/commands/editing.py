"""Weight-edit commands: edit (apply pending facts in sequence), rollback FACT_ID, export DIR."""
from __future__ import annotations

import sys
from pathlib import Path

from agent.commands.common import emit, load_state, note, open_store
from agent.progress import progress
from memory.errors import ConfigError, EngramError


def _skip_corrupt_flag(p) -> None:
    p.add_argument("--skip-corrupt", action="store_true",
                   help="rebuild without missing or corrupt delta files: their edits are marked failed and "
                        "their facts become pending again (re-edited by `engram edit`)")


def _configure_edit(p) -> None:
    p.add_argument("--method", default="ice", help="weight editor: ice (default) or ftm")
    p.add_argument("--limit", type=int, default=None, help="edit at most N pending facts")
    p.add_argument("--retry-failed", action="store_true", help="also retry facts whose edit failed before")
    _skip_corrupt_flag(p)


def cmd_edit(args) -> int:
    from editors.registry import WEIGHT_EDITORS, make_editor

    # Every choice is checked before the model loads (which takes seconds to minutes).
    if args.method not in WEIGHT_EDITORS:
        raise ConfigError(f"unknown edit method {args.method!r}: choose one of {', '.join(WEIGHT_EDITORS)}")
    if args.limit is not None and args.limit < 1:
        raise EngramError("--limit must be at least 1")
    store, loaded, state = load_state(args, writer=True)
    for fact_id in state.stale_edits():
        note(f"fact {fact_id} was superseded or deleted: rolling its edit back first")
        state.rollback(fact_id)
    editor = make_editor(args.method, loaded.model, loaded.tokenizer)
    facts = state.pending_facts(args.limit, args.retry_failed)
    results = []
    bar = progress(facts, desc=f"{args.method} edits", unit=" facts")
    for fact in bar:
        done = state.apply(fact, editor, args.method)
        results.append(done)
        line = (f"fact {fact.id}: {'ok' if done.ok else 'FAILED'} steps {done.steps} loss {done.loss:.3f} "
                f"{done.seconds:.1f} s" + (f" ({done.error})" if done.error else ""))
        bar.set_postfix_str(f"loss {done.loss:.3f} steps {done.steps}")
        if not args.json:
            bar.write(line, file=sys.stderr)
    ok = sum(r.ok for r in results)
    payload = {"method": args.method, "applied": ok, "failed": len(results) - ok, "model_version": state.version,
               "skipped_corrupt": [b.fact_id for b in state.skipped], "edits": [r.__dict__ for r in results]}
    emit(args, payload, f"applied {ok}, failed {len(results) - ok}, model version {state.version}")
    return 0 if ok == len(results) else 1


def _configure_rollback(p) -> None:
    p.add_argument("fact_id", type=int)
    p.add_argument("--replay-deltas", action="store_true",
                   help="replay the later edits' recorded deltas (fast, bit-exact) instead of editing their facts again")
    _skip_corrupt_flag(p)


def cmd_rollback(args) -> int:
    from editors.registry import WEIGHT_EDITORS, make_editor
    from editors.state import applied_weight_edit

    store = open_store(args)
    with store.transaction() as s:
        applied_weight_edit(s, args.fact_id)  # a wrong fact id fails before the model loads
    # The fact's own delta is not read: it is being removed, and may be the corrupt one the error named.
    _, loaded, state = load_state(args, writer=True, skip_facts={args.fact_id}, store=store)
    editors = None if args.replay_deltas else {
        method: make_editor(method, loaded.model, loaded.tokenizer) for method in WEIGHT_EDITORS}
    version = state.rollback(args.fact_id, editors)
    waiting = len(state.pending_facts())
    if waiting:
        note(f"{waiting} fact(s) wait for a weight edit (new, or left by an interrupted rollback): run `engram edit`")
    emit(args, {"fact_id": args.fact_id, "model_version": version},
         f"rolled back the edit of fact {args.fact_id}; model version {version}")
    return 0


def _configure_export(p) -> None:
    p.add_argument("dir", help="a new (or empty) directory for the merged model")


def cmd_export(args) -> int:
    _, loaded, state = load_state(args)
    out = state.export(Path(args.dir), loaded.tokenizer)
    emit(args, {"dir": str(out), "model_version": state.version},
         f"wrote the merged model (version {state.version}) to {out}")
    return 0


COMMANDS = {
    "edit": (cmd_edit, _configure_edit, "apply pending facts to the live model as weight edits, in sequence"),
    "rollback": (cmd_rollback, _configure_rollback, "remove one fact's weight edit from the live model"),
    "export": (cmd_export, _configure_export, "write the merged, edited model in Hugging Face format"),
}
