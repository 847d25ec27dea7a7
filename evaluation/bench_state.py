"""`engram bench --sections startup`: how long a restart takes to rebuild the live model after N recorded
weight edits (the deltas after the newest checkpoint: editors/checkpoints.py), against N.

The edits are recorded through ModelState.apply itself, so the deltas, rows and checkpoints are the real
ones; only the editor is a stand-in: each edit adds a small seeded rank-1 update to every matrix the weight
editors touch, as a subject-keyed edit does, in milliseconds instead of seconds (a restart reads the
recorded deltas; it never runs the editor, so its time does not depend on how they were learned).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from editors.base import EditResult, finalize_delta, restore, snapshot


@dataclass
class RankOneStandIn:
    """A deterministic stand-in editor: a seeded rank-1 update of each named matrix per edit."""

    model: torch.nn.Module
    names: list[str]
    scale: float = 1e-4
    name: str = "standin"

    def parameter_names(self) -> list[str]:
        return list(self.names)

    def edit(self, request) -> EditResult:
        started = time.perf_counter()
        before = snapshot(self.model, self.names)
        generator = torch.Generator().manual_seed(int(request.fact_id or 0))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self.names:
                weight = params[name]
                a = torch.randn(weight.shape[0], 1, generator=generator)
                u = torch.randn(1, weight.shape[1], generator=generator)
                weight.add_((self.scale * a * u).to(weight.dtype))
        return EditResult(steps=1, loss=0.0, seconds=time.perf_counter() - started,
                          delta=finalize_delta(self.model, before))

    def rollback(self, delta) -> None:
        raise NotImplementedError("the bench never rolls back")

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        pass


def bench_startup(loaded, edits: int, repeats: int = 3) -> dict:
    """Record `edits` weight edits in a fresh store, then time ModelState.rebuild() on the base weights
    (median of `repeats`); the live model is put back to its weights before the bench at the end."""
    from editors.checkpoints import EVERY

    out: dict = {}
    # Also just before the next checkpoint: the most deltas a restart replays after N edits.
    worst = edits + EVERY - 1 - edits % EVERY
    ((_, seconds), (_, worst_s)) = startup_times(loaded, (edits, worst), repeats, out)
    return {"edits": edits, "record_seconds": out["record_seconds"], "startup_seconds": seconds,
            "worst_case_edits": worst, "worst_case_startup_seconds": worst_s,
            "delta_mib_per_edit": out["delta_mib_per_edit"]}


def startup_times(loaded, sizes: tuple[int, ...], repeats: int = 3, out: dict | None = None) -> list[tuple[int, float]]:
    """(n, median seconds of a rebuild) as the recorded edits reach each n of `sizes` in one fresh store;
    `out` gets the time spent recording and the delta bytes per edit."""
    from editors.registry import make_editor
    from editors.state import ModelState
    from memory.facts import FactInput
    from memory.store import FactStore

    model = loaded.model
    names = make_editor("ice", model, loaded.tokenizer).parameter_names()
    original = snapshot(model, names)
    sizes = tuple(sorted(sizes))
    times = []
    out = {} if out is None else out
    with tempfile.TemporaryDirectory() as tmp:
        store = FactStore(f"sqlite:///{tmp}/bench.sqlite")
        ids = store.add_facts([FactInput(prompt=f"Fact {i} is", target=f"t{i}") for i in range(sizes[-1])]).new_ids
        editor = RankOneStandIn(model, names)
        record_s, done = 0.0, 0
        try:
            for n in sizes:
                state = ModelState(store, model)
                state.rebuild(sweep=False)
                started = time.perf_counter()
                for fact in state.pending_facts(limit=n - done):
                    state.apply(fact, editor, "ice")
                record_s += time.perf_counter() - started
                done = n
                state.close()
                seconds = []
                for _ in range(repeats):
                    restore(model, original)
                    fresh = ModelState(store, model)
                    t = time.perf_counter()
                    fresh.rebuild(sweep=False)
                    seconds.append(time.perf_counter() - t)
                    fresh.close()
                times.append((n, round(statistics.median(seconds), 3)))
        finally:
            restore(model, original)
        deltas = sum(p.stat().st_size for p in (store.data_dir / "deltas").iterdir())
    out.update(record_seconds=round(record_s, 1), delta_mib_per_edit=round(deltas / len(ids) / 2**20, 2))
    return times
