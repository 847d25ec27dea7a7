"""The live model state = base weights + the applied edit deltas, in order, versioned in the store.

This is the thin layer between the editors (pure model maths) and the store. It
- runs an editor on a fact and records the result: the delta as a safetensors file written atomically
  (temp file + rename, checksummed), an `edits` row, an event, and a bumped model version;
- rebuilds the live model on restart as base weights + recorded deltas, verifying every checksum,
  starting from the newest weight checkpoint (editors/checkpoints.py, every 50 edits) when one holds the
  first applied edits, so a restart replays fewer than 50 deltas however long the history;
- rolls back one fact's edit by restoring the base values of the touched tensors and replaying the
  remaining deltas in order, which is bit-exact because each editor leaves `before + delta` in place.

Crash safety: the delta file is written before the row that points to it is committed, so a crash
leaves at worst an unreferenced file, never a row without its delta. Such orphans are swept only by the
holder of the store's writer lock (memory/lock.py), and only once older than ORPHAN_GRACE_S, so a reader
(`ask`, `export`) can never delete a delta that a writer has written and not yet committed.

Work still owed is an `edits` row with status "pending" (the store's work queue): a rollback that edits
the later facts again commits their pending rows in the same transaction that rolls their old edits
back, so a kill midway leaves them pending for the next `engram edit`, never lost.

A delta file that is missing or fails its checksum stops the rebuild with CorruptDeltaError, which names
it and both ways out: `engram rollback FACT` (the rebuild then skips that fact's delta), or
`--skip-corrupt`, which drops the corrupt deltas: their edits are marked failed ("delta file corrupt"
or "... missing"), a "delta_corrupt" event is logged and a pending row makes each fact due again, so the
next `engram edit` re-edits it on top of the others.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session

from editors.base import EditRequest, Editor, apply_delta, restore, snapshot
from editors.deltas import BadDelta, CorruptDeltaError, write_delta
from memory.errors import EditError, NotFoundError
from memory.lock import WriterLock
from memory.models import Context, Edit, Event, Fact
from memory.store import FactStore

log = logging.getLogger(__name__)

MODEL_VERSION_KEY = "model_version"
GIST = "gist"  # the gist pool's backend (editors/gist_state.py); every other backend edits weights
ORPHAN_GRACE_S = 60.0  # a delta file younger than this may still be on its way to its row: never swept


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


class ModelState:
    """The edited model of one store. Create it once per process; call `rebuild()` before use."""

    def __init__(self, store: FactStore, model: torch.nn.Module, lock: WriterLock | None = None,
                 checkpoint_every: int | None = None):
        """`checkpoint_every`: applied edits between weight checkpoints (editors/checkpoints; 0: none)."""
        from editors.checkpoints import EVERY

        self.checkpoint_every = EVERY if checkpoint_every is None else int(checkpoint_every)
        self._checkpointed = 0  # applied edits the newest checkpoint holds
        self.store = store
        self.model = model
        self.delta_dir = store.data_dir / "deltas"
        self.lock = lock if lock is not None else WriterLock(store.data_dir)
        self.orphan_grace_s = ORPHAN_GRACE_S
        self.skipped: list[BadDelta] = []  # the deltas the last rebuild(skip_corrupt=True) dropped
        self._base: dict[str, torch.Tensor] = {}  # base values of every tensor any delta touched

    # -- the writer lock --------------------------------------------------------------------------
    def acquire_writer(self, timeout: float = 0.0) -> None:
        """Become the store's one writer (kept until close()); WriterLockError if another process is."""
        if not self.lock.held:
            self.lock.acquire(timeout)

    def close(self) -> None:
        self.lock.release()

    # -- versions and rows ------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.store.get_meta(MODEL_VERSION_KEY, "0"))

    def applied_edits(self) -> list[Edit]:
        with self.store.transaction() as s:
            query = (select(Edit).where(Edit.status == "applied", Edit.backend != GIST)
                     .order_by(Edit.model_version, Edit.id))
            return list(s.scalars(query))

    def _applied_requests(self) -> list[EditRequest]:
        """The applied weight edits as requests (prompt, target, fact id, subject; no contexts), oldest first."""
        with self.store.transaction() as s:
            rows = s.execute(select(Fact.id, Fact.prompt, Fact.target, Fact.subject).join(Edit, Edit.fact_id == Fact.id)
                             .where(Edit.status == "applied", Edit.backend != GIST)
                             .order_by(Edit.model_version, Edit.id)).all()
        return [EditRequest(prompt=p, target=t, fact_id=i, subject=subject) for i, p, t, subject in rows if p and t]

    def _remember_base(self, names) -> None:
        params = dict(self.model.named_parameters())
        for name in names:
            if name not in self._base:
                self._base[name] = params[name].detach().clone()

    def _read_delta(self, edit: Edit) -> tuple[dict[str, torch.Tensor] | None, BadDelta | None]:
        path = self.store.data_dir / (edit.artifact or "")
        try:
            data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
        except (FileNotFoundError, IsADirectoryError):
            return None, BadDelta(edit.id, edit.fact_id, path, "missing")
        if hashlib.sha256(data).hexdigest() != edit.checksum:
            return None, BadDelta(edit.id, edit.fact_id, path, "corrupt")
        return load_bytes(data), None

    def _load_delta(self, edit: Edit) -> dict[str, torch.Tensor]:
        delta, bad = self._read_delta(edit)
        if bad is not None:
            raise CorruptDeltaError([bad])
        return delta

    # -- restart ----------------------------------------------------------------------------------
    def rebuild(self, sweep: bool = True, skip_corrupt: bool = False, skip_facts: Collection[int] = ()) -> int:
        """Apply every recorded delta, in order, to the freshly loaded base weights. Returns how many.

        A missing or corrupt delta raises CorruptDeltaError naming all of them (the model is left at its
        base weights), except: the deltas of `skip_facts` are not read at all (the fact is about to be
        rolled back), and with `skip_corrupt` the bad ones are dropped (see the module doc; listed in
        `self.skipped`) and the rest are applied as recorded, as `rollback --replay-deltas` would.
        `sweep`: remove orphan delta files, which only the writer-lock holder does; readers pass False."""
        self.skipped = []
        skip = set(skip_facts)
        edits = [e for e in self.applied_edits() if e.fact_id not in skip]
        bad: list[BadDelta] = []
        for edit in edits[self._from_checkpoint(edits):]:
            delta, problem = self._read_delta(edit)
            if problem is not None:
                bad.append(problem)  # keep going: the error names every bad delta at once
                continue
            self._remember_base(delta)
            apply_delta(self.model, delta)
        if bad and not skip_corrupt:
            restore(self.model, self._base)
            raise CorruptDeltaError(bad)
        if bad:
            self._drop_bad(bad)
        if sweep:
            self._sweep()
        return len(edits) - len(bad)

    def _from_checkpoint(self, edits: list[Edit]) -> int:
        """The newest usable weight checkpoint of `edits` into the model; how many edits it holds (0: none)."""
        from editors.checkpoints import restore_latest

        self._checkpointed = restore_latest(self, edits) if self.checkpoint_every else 0
        return self._checkpointed

    def _maybe_checkpoint(self) -> None:
        from editors.checkpoints import write_if_due

        if self.checkpoint_every:
            write_if_due(self)

    def reload(self) -> int:
        """A reader's catch-up: back to the base weights, then every applied delta again (a rollback may
        have taken one out of the middle). Never sweeps; CorruptDeltaError leaves the base weights."""
        restore(self.model, self._base)
        return self.rebuild(sweep=False)

    def _drop_bad(self, bad: list[BadDelta]) -> None:
        """Record that these deltas are gone from the live model: failed, with the fact due again."""
        self.acquire_writer()
        with self.store.transaction() as s:
            version = self.version + 1
            for b in bad:
                row = s.get(Edit, b.edit_id)
                row.status, row.error = "failed", f"delta file {b.problem}"
                s.add(Edit(fact_id=row.fact_id, backend=row.backend, status="pending"))
                s.add(Event(fact_id=row.fact_id, kind="delta_corrupt", detail={
                    "edit": row.id, "file": str(b.path), "problem": b.problem, "model_version": version}))
            self.store.set_meta(MODEL_VERSION_KEY, str(version), session=s)
        for b in bad:
            log.warning("skipped %s; the fact is pending again", b.describe())
        self.skipped = bad

    def _sweep(self) -> None:
        held = self.lock.held
        if not held and not self.lock.try_acquire():
            log.info("another process is writing to this store: not sweeping orphan delta files")
            return
        try:
            self._remove_orphans({edit.artifact for edit in self.applied_edits()})
        finally:
            if not held:
                self.lock.release()  # taken only for the sweep

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Delta files no row points to (a crash between file and commit) are dropped, once older than
        the grace: the lock already keeps other writers out, the grace is a second safety."""
        if not self.delta_dir.is_dir():
            return
        with self.store.transaction() as s:
            known = {a for (a,) in s.execute(select(Edit.artifact).where(Edit.artifact.is_not(None)))}
        cutoff = time.time() - self.orphan_grace_s
        for path in self.delta_dir.iterdir():
            rel = str(path.relative_to(self.store.data_dir))
            if rel in known or rel in referenced:
                continue
            try:
                young = path.stat().st_mtime > cutoff
            except FileNotFoundError:
                continue
            if not young:
                log.info("removing unreferenced delta file %s", path)
                path.unlink(missing_ok=True)

    # -- editing ----------------------------------------------------------------------------------
    def request_for(self, fact: Fact) -> EditRequest:
        if fact.prompt is None or fact.target is None:
            raise EditError(f"fact {fact.id} has no prompt/target; natural-language facts go to the gist pool or RAG")
        with self.store.transaction() as s:
            texts = tuple(s.scalars(select(Context.text).where(Context.fact_id == fact.id).order_by(Context.id)))
        return EditRequest(prompt=fact.prompt, target=fact.target, contexts=texts, fact_id=fact.id,
                           subject=fact.subject)

    def apply(self, fact: Fact, editor: Editor, backend: str) -> AppliedEdit:
        """Edit the live model with one fact and record it; a failed edit changes nothing. The result
        fulfils the fact's pending weight row if it has one (so each fact ends applied once)."""
        self.acquire_writer()
        request = self.request_for(fact)
        preserve = getattr(editor, "preserve", None)  # a constrained editor keeps the applied edits' keys
        if preserve is not None:
            preserve(self._applied_requests())
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
        except BaseException:  # Ctrl-C mid-edit: the live model goes back to how it was, the fact stays pending
            restore(self.model, before)
            raise
        if result is None or not result.ok:
            restore(self.model, before)
            return self._record_failure(fact, backend, error or "edit failed", time.perf_counter() - start)
        for name in result.delta:
            self._base.setdefault(name, before[name])  # first touch: its value before is the base value
        return self._record_success(fact, backend, result)

    @staticmethod
    def _fulfil(s: Session, fact_id: int, **fields) -> Edit:
        """The fact's oldest pending weight row, filled in with the outcome; a new row if it has none."""
        row = s.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.status == "pending", Edit.backend != GIST)
                        .order_by(Edit.id)).first() or Edit(fact_id=fact_id)
        for key, value in fields.items():
            setattr(row, key, value)
        s.add(row)
        s.flush()
        return row

    def _record_failure(self, fact: Fact, backend: str, error: str, seconds: float) -> AppliedEdit:
        with self.store.transaction() as s:
            row = self._fulfil(s, fact.id, backend=backend, status="failed", error=error, seconds=seconds,
                               model_version=self.version)
            s.add(Event(fact_id=fact.id, kind="edit_failed", detail={"backend": backend, "error": error}))
            edit_id = row.id
        return AppliedEdit(fact.id, edit_id, False, 0, float("nan"), seconds, self.version, error)

    def _record_success(self, fact: Fact, backend: str, result) -> AppliedEdit:
        version = self.version + 1
        rel = f"deltas/v{version:06d}-fact{fact.id}-{backend}.safetensors"
        try:
            checksum = write_delta(result.delta, self.store.data_dir / rel)
            with self.store.transaction() as s:
                row = self._fulfil(s, fact.id, backend=backend, status="applied", model_version=version,
                                   steps=result.steps, loss=float(result.loss), seconds=result.seconds,
                                   artifact=rel, checksum=checksum, error=None)
                s.add(Event(fact_id=fact.id, kind="applied", detail={
                    "backend": backend, "model_version": version, "steps": result.steps, "loss": float(result.loss)}))
                self.store.set_meta(MODEL_VERSION_KEY, str(version), session=s)
                edit_id = row.id
        except BaseException:
            # Not recorded, so not applied: take the delta back out of the live weights.
            self._replay()
            raise
        self._maybe_checkpoint()
        return AppliedEdit(fact.id, edit_id, True, result.steps, float(result.loss), result.seconds, version)

    # -- rollback ---------------------------------------------------------------------------------
    def _replay(self) -> None:
        """Reset every touched tensor to base and apply the recorded deltas in order (bit-exact)."""
        restore(self.model, self._base)
        edits = self.applied_edits()
        for edit in edits[self._from_checkpoint(edits):]:
            apply_delta(self.model, self._load_delta(edit))

    def rollback(self, fact_id: int, editors: dict[str, Editor] | None = None) -> int:
        """Remove one fact's edit from the live model; returns the new model version.

        Without `editors`, the later edits' recorded deltas are replayed (bit-exact, fast). A later delta
        was learned on top of the removed one, though, so its fact may stop answering. With `editors`
        (backend -> editor), the later facts are edited again instead, on the model without the removed
        edit: their old rows are marked rolled back and, in the same transaction, a pending row per fact
        is queued, which each re-edit then fulfils (a kill midway leaves the rest for `engram edit`)."""
        self.acquire_writer()
        with self.store.transaction() as s:
            edit = applied_weight_edit(s, fact_id)
            version = self.version + 1
            edit.status = "rolled_back"
            s.add(Event(fact_id=fact_id, kind="rolled_back", detail={"edit": edit.id, "model_version": version}))
            later = []
            if editors is not None:
                later = list(s.scalars(select(Edit).where(Edit.status == "applied", Edit.backend != GIST,
                                                          Edit.model_version > edit.model_version)
                                       .order_by(Edit.model_version, Edit.id)))
                missing = sorted({row.backend for row in later} - set(editors))
                if missing:
                    raise EditError(f"cannot re-edit the later facts: no editor given for {', '.join(missing)}")
                for row in later:
                    row.status = "rolled_back"
                    s.add(Event(fact_id=row.fact_id, kind="rolled_back",
                                detail={"edit": row.id, "reason": f"re-edited after rolling back fact {fact_id}"}))
                    s.add(Edit(fact_id=row.fact_id, backend=row.backend, status="pending"))
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
        """Active prompt/target facts owed a weight edit (oldest first): those with no edit row at all,
        and those whose newest weight row is pending (failed too, with retry_failed). A fact with an
        applied edit, or queued for the gist pool, is not; nor is one the user rolled back."""
        due = ("pending", "failed") if retry_failed else ("pending",)
        newest = (select(Edit.status).where(Edit.fact_id == Fact.id, Edit.backend != GIST)
                  .order_by(Edit.id.desc()).limit(1).scalar_subquery())
        untouched = ~exists().where(Edit.fact_id == Fact.id)
        settled = exists().where(Edit.fact_id == Fact.id, or_(
            Edit.status == "applied", and_(Edit.backend == GIST, Edit.status == "pending")))
        query = (select(Fact).where(Fact.status == "active", Fact.prompt.is_not(None), Fact.target.is_not(None),
                                    or_(untouched, and_(newest.in_(due), ~settled))).order_by(Fact.id))
        if limit is not None:
            query = query.limit(limit)
        with self.store.transaction() as s:
            return list(s.scalars(query))

    def stale_edits(self) -> list[int]:
        """Facts whose weight edit is still applied although the fact was superseded or deleted."""
        with self.store.transaction() as s:
            query = (select(Edit.fact_id).join(Fact, Fact.id == Edit.fact_id)
                     .where(Edit.status == "applied", Edit.backend != GIST, Fact.status != "active"))
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


def applied_weight_edit(s: Session, fact_id: int) -> Edit:
    """The fact's applied weight edit (what a rollback removes); NotFoundError if there is none."""
    if s.get(Fact, fact_id) is None:
        raise NotFoundError(f"no fact with id {fact_id}")
    edit = s.scalars(select(Edit).where(Edit.fact_id == fact_id, Edit.status == "applied",
                                        Edit.backend != GIST)).first()
    if edit is None:
        raise NotFoundError(f"fact {fact_id} has no applied weight edit to roll back")
    return edit
