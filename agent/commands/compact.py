"""`engram compact`: merge the gist pool's segments into one, without the rows removed since; loads no model.

Safe beside a running agent: every pool write takes the pool's lock, and readers that listed a merged
segment read the new manifest (editors/incomes/segments.py).
"""
from __future__ import annotations

from agent.commands.common import emit, open_store


def _configure_compact(p) -> None:
    pass


def cmd_compact(args) -> int:
    from editors.gist_state import pool_segments

    store = open_store(args)
    segments = pool_segments(store)
    if not segments.exists():
        emit(args, {"pool": None}, "this store has no gist pool: nothing to compact")
        return 0
    cleaned = segments.recover()  # an old single pool file is migrated first; leftovers of kills removed
    done = segments.compact()
    payload = {"pool": str(segments.directory), "removed_files": cleaned, **done.to_dict()}
    if done.bytes:
        text = (f"compacted the gist pool: {done.segments} segment(s) into one of {done.rows} row(s), "
                f"{done.dropped} removed row(s) dropped, {done.bytes / 1e6:.1f} MB written")
    else:
        text = f"the gist pool is compact already: {done.segments} segment(s), {done.rows} row(s)"
    if cleaned:
        text += f"; removed {cleaned} file(s) interrupted writes left"
    emit(args, payload, text)
    return 0


COMMANDS = {
    "compact": (cmd_compact, _configure_compact,
                "merge the gist pool's segments into one file, dropping the rows removed since (no model)"),
}
