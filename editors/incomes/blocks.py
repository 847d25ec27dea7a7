"""The gist pool's rows in fixed-size blocks, so that no append or removal copies what the pool holds.

One pair of buffers that doubles when full copies every row at each doubling (2.3 GB at 100k facts, a stall
of seconds in the middle of a chat) and a removal copied all rows after it. Here rows live in blocks of
BLOCK rows: an append fills the last block and starts new ones, a removal rewrites its own block only, and
a reader gathers the rows it needs from the blocks that hold them. A `Snapshot` is what one pool version
holds: later appends write past its rows and removals replace blocks, so a snapshot handed out stays valid.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

BLOCK = 1024  # rows per block: 23 MB of SmolLM2-135M gists, so a removal copies at most that


@dataclass(frozen=True)
class Snapshot:
    """The rows of one pool version: `keys[b]`/`values[b]` [L, capacity, KVH, D], the first `used[b]` rows."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    used: tuple[int, ...]
    starts: tuple[int, ...]  # the pool row each block starts at

    def __len__(self) -> int:
        return self.starts[-1] + self.used[-1] if self.used else 0

    def locate(self, rows: list[int]) -> list[tuple[int, list[int]]]:
        """(block, rows within it) for `rows` (pool rows, ascending order kept)."""
        plan: list[tuple[int, list[int]]] = []
        for row in rows:
            block = bisect.bisect_right(self.starts, row) - 1
            if plan and plan[-1][0] == block:
                plan[-1][1].append(row - self.starts[block])
            else:
                plan.append((block, [row - self.starts[block]]))
        return plan

    def gather(self, rows: list[int], layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `rows`: [L, n, KVH, D], or [n, KVH, D] of one layer (by position)."""
        if not rows:  # no sequence reads any row: the branch then reads the zero-gist alone
            k, v = (self.keys[0], self.values[0]) if layer is None else (self.keys[0][layer], self.values[0][layer])
            return (k[:, :0], v[:, :0]) if layer is None else (k[:0], v[:0])
        ks, vs = [], []
        for block, local in self.locate(rows):
            index = torch.tensor(local, dtype=torch.long, device=self.keys[block].device)
            k, v = (self.keys[block], self.values[block]) if layer is None else (
                self.keys[block][layer], self.values[block][layer])
            axis = 1 if layer is None else 0
            ks.append(k.index_select(axis, index))
            vs.append(v.index_select(axis, index))
        if len(ks) == 1:
            return ks[0], vs[0]
        axis = 1 if layer is None else 0
        return torch.cat(ks, dim=axis), torch.cat(vs, dim=axis)

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows, [L, N, KVH, D] (a slice, not a copy, when one block holds them)."""
        if len(self.used) == 1:
            return self.keys[0][:, : self.used[0]], self.values[0][:, : self.used[0]]
        return (torch.cat([k[:, :u] for k, u in zip(self.keys, self.used)], dim=1),
                torch.cat([v[:, :u] for v, u in zip(self.values, self.used)], dim=1))


class RowBlocks:
    def __init__(self, layers: int, n_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.shape = (layers, n_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._used: list[int] = []

    def __len__(self) -> int:
        return sum(self._used)

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows [L, n, KVH, D] after the last one (into the last block's free room, then new blocks)."""
        keys, values = keys.detach().to(self.device, self.dtype), values.detach().to(self.device, self.dtype)
        done, n = 0, keys.shape[1]
        while done < n:
            if not self._used or self._used[-1] == self._keys[-1].shape[1]:
                L, KVH, D = self.shape
                self._keys.append(torch.zeros(L, BLOCK, KVH, D, device=self.device, dtype=self.dtype))
                self._values.append(torch.zeros_like(self._keys[-1]))
                self._used.append(0)
            at = self._used[-1]
            take = min(n - done, self._keys[-1].shape[1] - at)
            with torch.no_grad():
                self._keys[-1][:, at:at + take] = keys[:, done:done + take]
                self._values[-1][:, at:at + take] = values[:, done:done + take]
            self._used[-1] += take
            done += take

    def remove(self, row: int) -> None:
        """Drop one row; the rows after it move up. Only its block is rewritten (as a new tensor, so
        snapshots taken before keep theirs)."""
        starts = self._starts()
        block = bisect.bisect_right(starts, row) - 1
        local = row - starts[block]
        keep = [i for i in range(self._keys[block].shape[1]) if i != local]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._keys[block] = self._keys[block].index_select(1, index)
        self._values[block] = self._values[block].index_select(1, index)
        self._used[block] -= 1
        if not self._used[block] and len(self._used) > 1:
            del self._keys[block], self._values[block], self._used[block]

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(self._keys), tuple(self._values), tuple(self._used), tuple(self._starts()))

    def _starts(self) -> list[int]:
        out, total = [], 0
        for used in self._used:
            out.append(total)
            total += used
        return out
