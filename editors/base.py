"""The one protocol every weight editor implements, and the types it exchanges.

An editor is model maths only: weights in, a delta and an undo record out. Recording edits in the
store (delta files, rows, model versions) is done by a thin layer above that calls the editor.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the weights: `prompt` should be continued by `target`."""

    prompt: str
    target: str
    contexts: tuple[str, ...] = ()
    fact_id: int | None = None
    subject: str | None = None  # the preservation term asks about it (editors/preservation.py)


@dataclass
class EditResult:
    """What one edit did. `delta` maps parameter names to (new - old) for the touched tensors only."""

    steps: int
    loss: float
    seconds: float
    delta: dict[str, torch.Tensor] = field(repr=False)
    ok: bool = True
    error: str | None = None
    history: list[dict] = field(default_factory=list, repr=False)  # per-step loss terms, for sweeps


@runtime_checkable
class Editor(Protocol):
    """edit() changes the live model in place and returns the delta; rollback() undoes the last edit
    (or the one whose delta is given); state_dict()/load_state_dict() carry the editor's own state
    (config and optimiser-free bookkeeping), never the model weights."""

    name: str

    def parameter_names(self) -> list[str]:
        """Every parameter an edit may touch (callers snapshot these before editing)."""
        ...

    def edit(self, request: EditRequest) -> EditResult: ...

    def rollback(self, delta: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def apply_delta(model: torch.nn.Module, delta: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """Add (sign=+1) or subtract (sign=-1) a delta in place, by parameter name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in delta.items():
            params[name].add_(tensor.to(params[name].device, params[name].dtype), alpha=sign)


def snapshot(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters (the undo record of an edit in progress)."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in names}


def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors back into the model, bit for bit."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def finalize_delta(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn an in-place edit into a replayable delta.

    Float addition does not round-trip ((w + d) - d may differ from w), so we set each touched weight
    to exactly `before + delta`: replaying the stored deltas on the base weights then rebuilds the live
    model bit for bit, which is what restart and rollback rely on."""
    params = dict(model.named_parameters())
    delta: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, old in before.items():
            delta[name] = (params[name].detach() - old).clone()
            params[name].copy_(old + delta[name])
    return delta
