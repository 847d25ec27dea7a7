"""Helpers every subcommand shares: opening the store, loading the model, printing."""
from __future__ import annotations

import json
import sys

from memory.store import FactStore


def open_store(args) -> FactStore:
    return FactStore(args.db)


def load(args):
    from editors.model import load_model

    return load_model(args.model, args.device)


def emit(args, payload: dict, text: str) -> None:
    """Print JSON for programs (--json), or the human text."""
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def note(message: str) -> None:
    print(message, file=sys.stderr)


def load_state(args):
    """The store, the base model, and the live model state rebuilt from the recorded edits."""
    from editors.state import ModelState

    store = open_store(args)
    loaded = load(args)
    state = ModelState(store, loaded.model)
    n = state.rebuild()
    if n:
        note(f"replayed {n} recorded edit(s); model version {state.version}")
    return store, loaded, state


def open_gist(args, store, loaded, required: bool = False):
    """The store's gist pool on the live model, or None when the store has no gist facts (and none is required)."""
    from editors.gist_state import GIST, GistState
    from editors.incomes.memory import GistMemory

    if not required and not store.counts()["edits"].get(GIST, {}).get("applied"):
        return None
    memory = GistMemory.open(loaded.model, loaded.tokenizer, loaded.name, getattr(args, "gist_addon", None),
                             relation_gate=not getattr(args, "no_relation_gate", False),
                             answer_copy=not getattr(args, "no_answer_copy", False))
    gist = GistState(store, memory)
    n = gist.open()
    if n:
        note(f"gist pool: {n} fact(s), {memory.pool.bytes_per_fact()} bytes each")
    return gist
