"""The live model state = base weights + the applied edit deltas, in order, versioned in the store.

This is the thin layer between the editors (pure model maths) and the store. It
- runs an editor on a fact and records the result: the delta as a safetensors file written atomically
  (temp file + rename, checksummed), an `edits` row, an event, and a bumped model version;
- rebuilds the live model on restart as base weights + recorded deltas, verifying every checksum;
- rolls back one fact's edit by restoring the base values of the touched tensors and replaying the
  remaining deltas in order, which is bit-exact because each editor leaves `before + delta` in place.

Crash safety: the delta file is written before the row that points to it is committed, so a crash
leaves at worst an unreferenced file (removed on the next rebuild), never a row without its delta.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from editors.base import EditRequest, Editor, apply_delta, restore, snapshot
from memory.atomic import atomic_write
from memory.errors import EditError, NotFoundError, StoreError
from memory.models import Context, Edit, Event, Fact
from memory.store import FactStore

log = logging.getLogger(__name__)

MODEL_VERSION_KEY = "model_version"


@dataclass
class AppliedEdit:
    fact_id: int
    edit_id: int
    ok: bool
    steps: int
    loss: float
    seconds: float
    model_version: int
    error: str | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> str:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return _sha256(path)


class ModelState:
    """The edited model of one store. Create it once per process; call `rebuild()` before use."""

    def __init__(self, store: FactStore, model: torch.nn.Module):
        self.store = store
        self.model = model
        self.delta_dir = store.data_dir / "deltas"
        self._base: dict[str, torch.Tensor] = {}  # base values of every tensor any delta touched

    # -- versions and rows ------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.store.get_meta(MODEL_VERSION_KEY, "0"))

    def applied_edits(self) -> list[Edit]:
        with self.store.transaction() as s:
            query = select(Edit).where(Edit.status == "applied", Edit.backend != "gist").order_by(Edit.model_version, Edit.id)
            return list(s.scalars(query))

    def _remember_base(self, names) -> None:
        params = dict(self.model.named_parameters())
        for name in names:
            if name not in self._base:
                self._base[name] = params[name].detach().clone()

    def _load_delta(self, edit: Edit) -> dict[str, torch.Tensor]:
        path = self.store.data_dir / edit.artifact
        if not path.is_file():
            raise StoreError(f"edit {edit.id} (fact {edit.fact_id}): delta file {path} is missing")
        if _sha256(path) != edit.checksum:
            raise StoreError(f"edit {edit.id} (fact {edit.fact_id}): delta file {path} fails its checksum; "
                             f"roll the fact back with `engram rollback {edit.fact_id}` or restore the file")
        return load_file(str(path))

    # -- restart ----------------------------------------------------------------------------------
    def rebuild(self) -> int:
        """Apply every recorded delta, in order, to the freshly loaded base weights. Returns how many."""
        edits = self.applied_edits()
        for edit in edits:
            delta = self._load_delta(edit)
            self._remember_base(delta)
            apply_delta(self.model, delta)
        self._remove_orphans({edit.artifact for edit in edits})
        return len(edits)

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Delta files no row points to (a crash between file and commit, or rolled back) are dropped."""
        if not self.delta_dir.is_dir():
            return
        with self.store.transaction() as s:
            known = {a for (a,) in s.execute(select(Edit.artifact).where(Edit.artifact.is_not(None)))}
        for path in self.delta_dir.iterdir():
            rel = str(path.relative_to(self.store.data_dir))
            if rel not in known and rel not in referenced:
                log.info("removing unreferenced delta file %s", path)
                path.unlink(missing_ok=True)

    # -- editing ----------------------------------------------------------------------------------
    def request_for(self, fact: Fact) -> EditRequest:
        if fact.prompt is None or fact.target is None:
            raise EditError(f"fact {fact.id} has no prompt/target; natural-language facts go to the gist pool or RAG")
        with self.store.transaction() as s:
            texts = tuple(s.scalars(select(Context.text).where(Context.fact_id == fact.id).order_by(Context.id)))
        return EditRequest(prompt=fact.prompt, target=fact.target, contexts=texts, fact_id=fact.id)

    def apply(self, fact: Fact, editor: Editor, backend: str) -> AppliedEdit:
        """Edit the live model with one fact and record it; a failed edit changes nothing."""
        request = self.request_for(fact)
        before = snapshot(self.model, editor.parameter_names())
        start = time.perf_counter()
        try:
            result = editor.edit(request)
            error = result.error
            if result.ok and any(not torch.isfinite(t).all() for t in result.delta.values()):
                result.ok, error = False, "the edit produced NaN/Inf weights"
        except Exception as exc:  # an editor that raises must not take the agent down
            log.exception("edit of fact %s raised", fact.id)
            result, error = None, f"{type(exc).__name__}: {exc}"
        if result is None or not result.ok:
            restore(self.model, before)
            return self._record_failure(fact, backend, error or "edit failed", time.perf_counter() - start)
        for name in result.delta:
            self._base.setdefault(name, before[name])  # first touch: its value before is the base value
        return self._record_success(fact, backend, result)

    def _record_failure(self, fact: Fact, backend: str, error: str, seconds: float) -> AppliedEdit:
        with self.store.transaction() as s:
            row = Edit(fact_id=fact.id, backend=backend, status="failed", error=error, seconds=seconds,
                       model_version=self.version)
            s.add(row)
            s.add(Event(fact_id=fact.id, kind="edit_failed", detail={"backend": backend, "error": error}))
            s.flush()
            edit_id = row.id
        return AppliedEdit(fact.id, edit_id, False, 0, float("nan"), seconds, self.version, error)

    def _record_success(self, fact: Fact, backend: str, result) -> AppliedEdit:
        version = self.version + 1
        rel = f"deltas/v{version:06d}-fact{fact.id}-{backend}.safetensors"
        try:
            checksum = _write_atomic(result.delta, self.store.data_dir / rel)
            with self.store.transaction() as s:
                row = Edit(fact_id=fact.id, backend=backend, status="applied", model_version=version,
                           steps=result.steps, loss=float(result.loss), seconds=result.seconds,
                           artifact=rel, checksum=checksum)
                s.add(row)
                s.add(Event(fact_id=fact.id, kind="applied", detail={
                    "backend": backend, "model_version": version, "steps": result.steps, "loss": float(result.loss)}))
                self.store.set_meta(MODEL_VERSION_KEY, str(version), session=s)
                s.flush()
                edit_id = row.id
        except BaseException:
            # Not recorded, so not applied: take the delta back out of the live weights.
            self._replay()
            raise
        return AppliedEdit(fact.id, edit_id, True, result.steps, float(result.loss), result.seconds, version)

    # -- rollback ---------------------------------------------------------------------------------
    def _replay(self) -> None:
        """Reset every touched tensor to base and apply the recorded deltas in order (bit-exact)."""
        restore(self.model, self._base)
        for edit in self.applied_edits():
            apply_delta(self.model, self._load_delta(edit))

    def rollback(self, fact_id: int, editors: dict[str, Editor] | None = None) -> int:
        """Remove one fact's edit from the live model; returns the new model version.

        Without `editors`, the later edits' recorded deltas are replayed (bit-exact, fast). A later delta
        was learned on top of the removed one, though, so its fact may stop answering. With `editors`
        (backend -> editor), the later facts are edited again instead, on the model without the removed
        edit, and recorded as new edits; their old rows are marked rolled back."""
        self.store.get_fact(fact_id)
        with self.store.transaction() as s:
            edit = s.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.status == "applied",
                                                Edit.backend != "gist")).first()
            if edit is None:
                raise NotFoundError(f"fact {fact_id} has no applied weight edit to roll back")
            version = self.version + 1
            edit.status = "rolled_back"
            s.add(Event(fact_id=fact_id, kind="rolled_back", detail={"edit": edit.id, "model_version": version}))
            later = []
            if editors is not None:
                later = list(s.scalars(select(Edit).where(Edit.status == "applied", Edit.backend != "gist",
                                                          Edit.model_version > edit.model_version)
                                       .order_by(Edit.model_version)))
                for row in later:
                    row.status = "rolled_back"
                    s.add(Event(fact_id=row.fact_id, kind="rolled_back",
                                detail={"edit": row.id, "reason": f"re-edited after rolling back fact {fact_id}"}))
            self.store.set_meta(MODEL_VERSION_KEY, str(version), session=s)
            redo = [(row.backend, s.get(Fact, row.fact_id)) for row in later]
        self._replay()
        for backend, fact in redo:
            self.apply(fact, editors[backend], backend)
        return self.version

    @contextmanager
    def unedited(self):
        """Inside, the model answers with its base weights (for baselines); the edits come back after."""
        live = snapshot(self.model, list(self._base))
        restore(self.model, self._base)
        try:
            yield self.model
        finally:
            restore(self.model, live)

    # -- housekeeping -----------------------------------------------------------------------------
    def pending_facts(self, limit: int | None = None, retry_failed: bool = False) -> list[Fact]:
        """Active prompt/target facts that no weight edit or gist has handled yet (oldest first)."""
        done = ("applied", "rolled_back") if retry_failed else ("applied", "rolled_back", "failed")
        handled = select(Edit.fact_id).where(Edit.status.in_(done))
        query = (select(Fact).where(Fact.status == "active", Fact.prompt.is_not(None), Fact.target.is_not(None),
                                    Fact.id.not_in(handled)).order_by(Fact.id))
        if limit is not None:
            query = query.limit(limit)
        with self.store.transaction() as s:
            return list(s.scalars(query))

    def stale_edits(self) -> list[int]:
        """Facts whose weight edit is still applied although the fact was superseded or deleted."""
        with self.store.transaction() as s:
            query = (select(Edit.fact_id).join(Fact, Fact.id == Edit.fact_id)
                     .where(Edit.status == "applied", Edit.backend != "gist", Fact.status != "active"))
            return list(s.scalars(query))

    def export(self, out_dir: Path, tokenizer) -> Path:
        """Write the merged (base + deltas) model in Hugging Face format."""
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise EditError(f"{out_dir} exists and is not empty; choose a new directory")
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent if out_dir.parent.exists() else None))
        self.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "engram-export.json").write_text(
            '{"model_version": %d, "edits": %d}\n' % (self.version, len(self.applied_edits())))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
        return out_dir
