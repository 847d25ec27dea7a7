"""Helpers every subcommand shares: opening the store, loading the model, printing."""
from __future__ import annotations

import json
import sys
from collections.abc import Collection

from memory.store import FactStore


def open_store(args, create: bool = False) -> FactStore:
    """The store at --db. Only commands that write pass create=True; the others fail on a missing store."""
    return FactStore(args.db, create=create)


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


def load_state(args, writer: bool = False, skip_facts: Collection[int] = (), store: FactStore | None = None):
    """The store, the base model, and the live model state rebuilt from the recorded edits.

    writer=True (edit, rollback): take the store's writer lock before the model loads (failing at once
    if another process holds it) and sweep orphan delta files; readers never delete files.
    `skip_facts`: facts whose deltas are not read (a rollback's fact: its delta may be the corrupt one).
    `args.skip_corrupt`: drop missing/corrupt deltas instead of stopping; their facts become pending."""
    from editors.state import ModelState
    from memory.lock import WriterLock

    store = store if store is not None else open_store(args)
    lock = WriterLock(store.data_dir)
    if writer:
        lock.acquire()
    loaded = load(args)
    _bind_model(store, loaded, writer)
    state = ModelState(store, loaded.model, lock=lock)
    n = state.rebuild(sweep=writer, skip_corrupt=getattr(args, "skip_corrupt", False), skip_facts=skip_facts)
    for bad in state.skipped:
        note(f"skipped {bad.describe()}: its edit is marked failed and fact {bad.fact_id} is pending again")
    if n:
        note(f"replayed {n} recorded edit(s); model version {state.version}")
    return store, loaded, state


def _bind_model(store: FactStore, loaded, writer: bool) -> None:
    """Deltas and gists belong to one base model: the store records its fingerprint once something is written
    with it, and refuses another model after that (FingerprintMismatchError names both)."""
    from editors.fingerprint import model_fingerprint

    if writer or store.get_meta("model_fingerprint") is not None or any(store.counts()["edits"].values()):
        store.bind_fingerprint("model", loaded.name, model_fingerprint(loaded.model, loaded.name))


def open_gist(args, store, loaded, required: bool = False):
    """The store's gist pool on the live model (compressing the facts queued for it), or None when the store
    has no gist facts, applied or queued (and none is required)."""
    from editors.gist_state import GistState, has_gist_work
    from editors.incomes.memory import GistMemory

    if not required and not has_gist_work(store):  # no gist applied or queued: no pool to open
        return None
    memory = GistMemory.open(loaded.model, loaded.tokenizer, loaded.name, getattr(args, "gist_addon", None),
                             relation_gate=not getattr(args, "no_relation_gate", False),
                             answer_copy=not getattr(args, "no_answer_copy", False))
    gist = GistState(store, memory)
    n = gist.open()
    addon = memory.addon.fingerprint()  # another add-on is allowed: open() compressed the pool again with it
    if store.get_meta("gist_addon_fingerprint") != addon:
        store.set_meta("gist_addon_fingerprint", addon)
    if n:
        note(f"gist pool: {n} fact(s), {memory.pool.bytes_per_fact()} bytes each")
    return gist
