"""Delta files: written whole and checksummed; one that is missing or fails its checksum is named."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from memory.atomic import atomic_write
from memory.errors import StoreError


@dataclass(frozen=True)
class BadDelta:
    """A recorded edit whose delta file cannot be used."""

    edit_id: int
    fact_id: int
    path: Path
    problem: str  # "missing" | "corrupt"

    def describe(self) -> str:
        what = "is missing" if self.problem == "missing" else "fails its checksum"
        return f"edit {self.edit_id} (fact {self.fact_id}): delta file {self.path} {what}"


class CorruptDeltaError(StoreError):
    """Recorded deltas are missing or corrupt; the message names each and the ways out."""

    def __init__(self, bad: list[BadDelta]):
        self.bad = bad
        facts = ", ".join(str(b.fact_id) for b in bad)
        ways = (f"roll the fact back with `engram rollback {bad[0].fact_id}`, or drop the bad delta and edit the "
                "fact again with `engram edit --skip-corrupt` (or restore the file)") if len(bad) == 1 else (
                f"roll the facts back (`engram rollback FACT` for each of {facts}), or drop the bad deltas and "
                "edit their facts again with `engram edit --skip-corrupt` (or restore the files)")
        super().__init__("; ".join(b.describe() for b in bad) + "; " + ways)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_delta(tensors: dict[str, torch.Tensor], path: Path) -> str:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return sha256_of(path)
