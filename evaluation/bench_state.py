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
    from editors.registry import make_editor
    from editors.state import ModelState
    from memory.facts import FactInput
    from memory.store import FactStore

    model = loaded.model
    names = make_editor("ice", model, loaded.tokenizer).parameter_names()
    original = snapshot(model, names)
    with tempfile.TemporaryDirectory() as tmp:
        store = FactStore(f"sqlite:///{tmp}/bench.sqlite")
        ids = store.add_facts([FactInput(prompt=f"Fact {i} is", target=f"t{i}") for i in range(edits)]).new_ids
        state = ModelState(store, model)
        editor = RankOneStandIn(model, names)
        started = time.perf_counter()
        try:
            for fact in state.pending_facts():
                state.apply(fact, editor, "ice")
            record_s = time.perf_counter() - started
            state.close()
            seconds = []
            for _ in range(repeats):
                restore(model, original)
                fresh = ModelState(store, model)
                t = time.perf_counter()
                fresh.rebuild(sweep=False)
                seconds.append(time.perf_counter() - t)
                fresh.close()
        finally:
            restore(model, original)
        deltas = sum(p.stat().st_size for p in (store.data_dir / "deltas").iterdir())
    return {"edits": len(ids), "record_seconds": round(record_s, 1), "startup_seconds": round(statistics.median(seconds), 3),
            "delta_mib_per_edit": round(deltas / len(ids) / 2**20, 2)}
