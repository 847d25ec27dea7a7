"""The covariance constraint of the weight editors: general text kept softly, applied edits kept exactly.

ROME's rank-1 update writes through u = C^-1 k*, k* the key at the subject's last token and C = E[k k^T] over
general text (editors/nullspace.py collects it): among the directions with u . k* fixed, it is the one that
moves general text's outputs least on average, where the null space's U U^T k* keeps only the small part of
k* that general text never uses (so the same change at k* needs a larger update, which leaks further).
The keys of applied edits are kept exactly: u (or a full update) loses their directions, so a later edit
moves no output an earlier edit set, until only `min_free` of the key space would be left.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def whitener(moment: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge * mean eigenvalue * I)^-1 [in, in]: the ridge keeps directions general text never used
    from dominating u (a share of the mean eigenvalue, so one setting fits every layer)."""
    c = moment.double()
    d = c.shape[0]
    return torch.linalg.inv(c + ridge * float(c.trace()) / d * torch.eye(d, dtype=c.dtype)).float().contiguous()


@dataclass
class KeptKeys:
    """Per edited matrix, an orthonormal basis Q [in, k] of the applied edits' keys (by fact id): the directions
    an update must not use. The same protocol as editors.nullspace.Preserved (add, keep_only, free_part,
    project_update, free_dims), over the whole key space instead of general text's null space."""

    dims: dict[str, int]  # name -> the key width
    whiten: dict[str, torch.Tensor]  # name -> whitener(C)
    min_free: float = 0.25
    edit_keys: dict[object, dict[str, torch.Tensor]] = field(default_factory=dict)
    _taken: dict[str, torch.Tensor] | None = None

    def taken(self) -> dict[str, torch.Tensor]:
        if self._taken is None:
            device = next(iter(self.whiten.values())).device
            self._taken = {n: torch.zeros(d, 0, device=device) for n, d in self.dims.items()}
            for keys in self.edit_keys.values():
                self._take(keys)
        return self._taken

    def free_dims(self) -> dict[str, int]:
        return {n: self.dims[n] - int(q.shape[1]) for n, q in self.taken().items()}

    def add(self, fact_id, keys: dict[str, torch.Tensor]) -> None:
        self.edit_keys[fact_id] = keys
        if self._taken is not None:
            self._take(keys)

    def keep_only(self, fact_ids) -> None:
        wanted = set(fact_ids)
        if set(self.edit_keys) - wanted:
            self.edit_keys = {f: k for f, k in self.edit_keys.items() if f in wanted}
            self._taken = None

    def free_part(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [in, m] without its part along the kept keys."""
        q = self.taken()[name]
        return x - q @ (q.T @ x)

    def project_update(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """delta (I - Q Q^T): moves no output on a kept key ([out, in], or [in, out] for GPT-2's Conv1D)."""
        q = self.taken()[name]
        if delta.shape[1] == q.shape[0]:
            return delta - (delta @ q) @ q.T
        return delta - q @ (q.T @ delta)

    def direction(self, name: str, key: torch.Tensor) -> torch.Tensor:
        """The update's input direction for subject key `key` [in]: C^-1 k, without the kept keys' part."""
        return self.free_part(name, (self.whiten[name] @ key)[:, None])[:, 0]

    def _take(self, keys: dict[str, torch.Tensor]) -> None:
        for name, q in self._taken.items():
            if name not in keys:
                continue
            k = keys[name].float().to(q.device).T  # [in, n]
            rest = k - q @ (q.T @ k)
            u, s, _ = torch.linalg.svd(rest, full_matrices=False)
            new = u[:, s > 1e-3 * k.norm(dim=0).max().clamp(min=1e-12)]
            if self.dims[name] - q.shape[1] - new.shape[1] >= self.min_free * self.dims[name]:
                self._taken[name] = torch.cat([q, new], dim=1)
