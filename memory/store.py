"""The fact store: every fact, context, edit and event, in SQLite or PostgreSQL (or any SQLAlchemy URL).

Semantics:
- An identical fact (same content hash) that is active is a no-op reported as a duplicate.
- A new target for the same subject+relation, or for the same prompt, in the same scope supersedes
  the old fact: the old row stays, marked `superseded`, with `superseded_by` pointing to the new one.
- Re-asserting a superseded or deleted fact reactivates its row (history and contexts kept) and
  supersedes whatever owns its keys now, as a new fact would.
- Pending work is an `edits` row with status "pending", written in the same transaction as the fact.
- Every change appends to `events`. A batch of facts is one transaction: all of it or none of it.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, event, func, insert, inspect, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from memory.connect import driver_error, sqlite_lacks_store, sqlite_pragmas, upsert
from memory.errors import FingerprintMismatchError, NotFoundError, SchemaVersionError, StoreError
from memory.facts import FactInput
from memory.models import SCHEMA_VERSION, Base, Context, Edit, Event, Fact, Meta, utcnow

REPO_ROOT = Path(__file__).resolve().parents[1]
FACT_STATUSES = ("active", "superseded", "deleted")
SCHEMA_ATTEMPTS = 5
Slot = tuple[str, int]  # ("db", fact id) or ("new", position among the batch's new facts)


def default_db_url() -> str:
    return os.environ.get("ENGRAM_DB") or f"sqlite:///{REPO_ROOT / 'store.sqlite'}"


@dataclass
class AddReport:
    stored: int = 0
    duplicates: int = 0
    superseded: int = 0
    reactivated: int = 0  # superseded or deleted facts asserted again (not duplicates)
    fact_ids: list[int | None] = field(default_factory=list)  # per input; the existing id for a duplicate
    new_ids: list[int] = field(default_factory=list)  # stored or reactivated: the facts that need routing


class FactStore:
    def __init__(self, url: str | None = None, create: bool = True):
        self.url = url or default_db_url()
        try:
            parsed = make_url(self.url)
        except Exception as exc:
            raise StoreError(f"invalid database URL {self.url!r}: {exc}") from exc
        self.display_url = shown = parsed.render_as_string(hide_password=True)  # never echo a password
        self._server = None if parsed.get_backend_name() == "sqlite" else (
            parsed.get_backend_name(), parsed.host or "local", parsed.port or "", parsed.database or "")
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.db_path = Path(parsed.database) if self.is_sqlite and parsed.database not in (None, "", ":memory:") else None
        if self.db_path is not None:
            if not create and (not self.db_path.exists() or sqlite_lacks_store(self.db_path)):
                raise NotFoundError(f"no Engram store at {shown}; `engram ingest` creates one")
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file where a folder should be, no permission, ...
                raise StoreError(f"cannot create the store's folder {self.db_path.parent}: "
                                 f"{exc.strerror or exc}") from exc
        try:
            self.engine: Engine = create_engine(self.url)
        except ImportError as exc:
            raise driver_error(exc, parsed.get_driver_name(), shown) from exc
        except ArgumentError as exc:
            raise StoreError(f"invalid database URL {shown}: {exc}") from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self._open_schema(create, shown)
        except BaseException:
            self.engine.dispose()  # no pooled connection outlives a refused open
            raise

    # -- schema ---------------------------------------------------------------------------------
    def _open_schema(self, create: bool, shown: str) -> None:
        try:
            with self.engine.connect() as conn:
                found = self._schema_version(conn)
                complete = set(Base.metadata.tables) <= set(inspect(conn).get_table_names())
            if found is None and not create:
                raise NotFoundError(f"no Engram store at {shown}; `engram ingest` creates one")
            if found and complete:
                return  # the common open: reads only, no write lock
            for attempt in range(SCHEMA_ATTEMPTS):
                try:
                    return self._create_schema()
                except SQLAlchemyError as exc:  # a backend without a lock: another process was first
                    if attempt == SCHEMA_ATTEMPTS - 1 or not (
                            isinstance(exc, IntegrityError) or "already exists" in str(exc)):
                        raise
                    time.sleep(0.05 * (attempt + 1))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the store at {shown}: {exc}") from exc

    def _schema_version(self, conn: Connection) -> int | None:
        """None: no store here; 0: a `meta` table without a version yet. Refuses a newer schema."""
        if not inspect(conn).has_table("meta"):
            return None
        row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).first()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.display_url} has schema version {found}, newer than this Engram's "
                                     f"{SCHEMA_VERSION}; upgrade Engram to open it")
        return found

    def _create_schema(self) -> None:
        """Create the missing tables and the version row, holding the database's write lock throughout,
        so two first opens at once serialize instead of both issuing CREATE TABLE."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now, before checking
            elif conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(5731020)")  # any fixed key of ours
            found = self._schema_version(conn)
            Base.metadata.create_all(conn, checkfirst=True)
            if not found:
                conn.execute(insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
            conn.commit()

    @property
    def data_dir(self) -> Path:
        """Where artifacts (weight deltas, gist pools, the FAISS index) live, beside the database."""
        if env := os.environ.get("ENGRAM_DATA"):
            return Path(env)
        if self.db_path is not None:
            return self.db_path.with_name(self.db_path.stem + ".engram")
        if self._server is not None:
            # One folder per database server and name: stores sharing a folder would sweep each other's deltas.
            return REPO_ROOT / "engram-data" / re.sub(r"[^\w.-]+", "_", "-".join(map(str, self._server)))
        return REPO_ROOT / "engram-data"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    # -- meta -----------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._sessions() as s:
            row = s.get(Meta, key)
            return row.value if row else default

    def set_meta(self, key: str, value: str, session: Session | None = None) -> None:
        with self._joined(session) as s:
            upsert(s, Meta, {"key": key, "value": value})

    def bind_fingerprint(self, kind: str, name: str, fingerprint: str) -> None:
        """Tie this store to one model (kind "model") or add-on (kind "gist_addon"): the first call records
        meta `<kind>` = name and `<kind>_fingerprint`; a later call with another fingerprint is refused."""
        key = f"{kind}_fingerprint"
        if self.get_meta(key) is None:
            try:
                with self.transaction() as s:
                    # The insert first: it takes the write lock, and a concurrent first binder fails it.
                    s.execute(insert(Meta).values(key=key, value=fingerprint))
                    upsert(s, Meta, {"key": kind, "value": name})
                return
            except IntegrityError:
                pass  # another process bound first: compare with what it recorded
        bound = self.get_meta(key)
        if bound != fingerprint:
            bound_name, flag = self.get_meta(kind, "?"), "--" + kind.replace("_", "-")
            label = kind.replace("_", " ")
            raise FingerprintMismatchError(
                f"this store's edits belong to {label} {bound_name} (fingerprint {bound}), not {name} "
                f"({fingerprint}); open it with {flag} {bound_name} or use another --db")

    # -- facts ----------------------------------------------------------------------------------
    @contextmanager
    def _joined(self, session: Session | None) -> Iterator[Session]:
        """The caller's transaction when one is given (the caller commits it), else one of our own."""
        if session is not None:
            yield session
            return
        with self.transaction() as s:
            yield s

    def add_facts(self, facts: Sequence[FactInput], pending_backend: str | None = None,
                  session: Session | None = None) -> AddReport:
        """Store a batch in one transaction (the caller's `session`, if given): active duplicates are
        no-ops, newer targets supersede, superseded or deleted facts asserted again are reactivated. With
        `pending_backend`, every fact stored or reactivated (and still active at the end) gets a pending
        edit row for that backend."""
        report = AddReport()
        if not facts:
            return report
        with self._joined(session) as s:
            hashes = list({f.content_hash for f in facts})
            rows = s.execute(select(Fact.content_hash, Fact.id, Fact.status, Fact.superseded_by)
                             .where(Fact.content_hash.in_(hashes))).all()
            known: dict[str, Slot] = {h: ("db", i) for h, i, _, _ in rows}
            owners: dict[tuple, Slot] = {k: ("db", v) for k, v in self._active_owners(s, facts).items()}
            before: dict[Slot, tuple[str, int | None]] = {slot: ("active", None) for slot in owners.values()}
            before.update({("db", i): (st, sup) for _, i, st, sup in rows})
            # The batch is replayed in memory (a status per slot), then only its net change is written.
            status: dict[Slot, str] = {slot: st for slot, (st, _) in before.items()}
            by: dict[Slot, Slot | None] = {}  # slots whose status changed -> their superseder
            log: list[tuple[Slot, str, dict | None, Slot | None]] = []  # (fact, kind, detail, "by" slot)
            new: list[FactInput] = []
            order: list[Slot] = []  # stored or reactivated, in input order: the report's new_ids
            slots: list[Slot] = []
            for fact in facts:
                slot = known.get(fact.content_hash)
                if slot is None:
                    slot = known[fact.content_hash] = ("new", len(new))
                    new.append(fact)
                    status[slot] = "active"
                    log.append((slot, "ingested", {"scope": fact.scope}, None))
                elif status[slot] == "active":
                    log.append((slot, "deduped", None, None))
                    slots.append(slot)
                    continue
                else:
                    log.append((slot, "reactivated", {"previous": status[slot]}, None))
                    status[slot], by[slot] = "active", None
                if slot not in order:
                    order.append(slot)
                self._take_keys(fact, slot, owners, status, by, log)
                slots.append(slot)
            # RETURNING with the hash maps rows to ids without forcing row-at-a-time inserts.
            returned = dict(s.execute(insert(Fact).returning(Fact.content_hash, Fact.id),
                                      [self._row(f) for f in new]).all()) if new else {}
            ids = [returned[f.content_hash] for f in new]
            resolve = lambda slot: slot[1] if slot[0] == "db" else ids[slot[1]]  # noqa: E731
            final = {slot: (status[slot], None if sup is None else resolve(sup)) for slot, sup in by.items()}
            # A stored fact that ends where it began (re-ingesting the same file: an old value, then its
            # newer one) was not reactivated: its assertions are duplicates and its transitions vanish.
            same = {slot for slot, end in final.items() if before.get(slot) == end}
            for slot, (st, sup) in final.items():
                if slot not in same:
                    s.execute(update(Fact).where(Fact.id == resolve(slot)).values(status=st, superseded_by=sup))
            log = [(x, "deduped", None, None) if x in same and k == "reactivated" else (x, k, d, sup)
                   for x, k, d, sup in log if not (x in same and k == "superseded")]
            events = [{"fact_id": resolve(x), "kind": k, "created_at": utcnow(),
                       "detail": {"by": resolve(sup)} if sup is not None else d} for x, k, d, sup in log]
            contexts = [{"fact_id": i, "text": t, "generator": "supplied"} for f, i in zip(new, ids) for t in f.contexts]
            # Core inserts of plain rows: executemany in one statement, not one per row.
            if contexts:
                s.connection().execute(Context.__table__.insert(), contexts)
            s.connection().execute(Event.__table__.insert(), events)
            order = [slot for slot in order if slot not in same]
            live = [slot for slot in order if status[slot] == "active"]
            self._queue(s, [resolve(x) for x in live if x[0] == "new"],
                        [resolve(x) for x in live if x[0] == "db"], pending_backend)
            kinds = [e["kind"] for e in events]
            report.stored, report.duplicates = len(new), kinds.count("deduped")
            report.superseded = kinds.count("superseded")
            report.reactivated = sum(slot[0] == "db" for slot in order)
            report.fact_ids, report.new_ids = [resolve(x) for x in slots], [resolve(x) for x in order]
        return report

    @staticmethod
    def _take_keys(fact: FactInput, slot: Slot, owners: dict[tuple, Slot], status: dict[Slot, str],
                   by: dict[Slot, Slot | None], log: list) -> None:
        """Make `slot` the owner of the fact's keys, superseding their active owners."""
        for key in fact.supersede_keys():
            old = owners.get(key)
            if old is not None and old != slot and status.get(old) == "active":
                status[old], by[old] = "superseded", slot
                log.append((old, "superseded", None, slot))
            owners[key] = slot

    @staticmethod
    def _queue(s: Session, new_ids: list[int], reactivated_ids: list[int], backend: str | None) -> None:
        """Pending edit rows: new facts get one for `backend` when given. A reactivated fact with no
        applied edit is queued again on `backend`, else on the backend of its latest edit (none if it
        never had one); a fact already pending on that backend gets no second row."""
        queue = [(i, backend) for i in new_ids] if backend else []
        history: dict[int, list[tuple[str, str]]] = {i: [] for i in reactivated_ids}
        query = select(Edit.fact_id, Edit.backend, Edit.status).where(Edit.fact_id.in_(reactivated_ids))
        for fact_id, edit_backend, edit_status in s.execute(query.order_by(Edit.id)) if reactivated_ids else ():
            history[fact_id].append((edit_backend, edit_status))
        for fact_id, edits in history.items():
            target = backend or (edits[-1][0] if edits else None)
            # An edit still applied is live: nothing to redo; nor to queue twice.
            if target and not any(st == "applied" for _, st in edits) and (target, "pending") not in edits:
                queue.append((fact_id, target))
        if queue:
            s.connection().execute(Edit.__table__.insert(), [
                {"fact_id": i, "backend": b, "status": "pending", "created_at": utcnow()} for i, b in queue])

    @staticmethod
    def _row(fact: FactInput) -> dict:
        return {
            "subject": fact.subject, "relation": fact.relation, "prompt": fact.prompt, "target": fact.target,
            "text": fact.text, "scope": fact.scope, "user_id": fact.user_id,
            "content_hash": fact.content_hash, "status": "active",
        }

    @staticmethod
    def _active_owners(s: Session, facts: Sequence[FactInput]) -> dict[tuple, int]:
        """Active facts that the batch might supersede, keyed like FactInput.supersede_keys()."""
        prompts = {f.prompt for f in facts if f.prompt}
        subjects = {f.subject.lower() for f in facts if f.subject and f.relation}
        # Subjects compare case-insensitively, like FactInput.supersede_keys().
        query = select(Fact).where(Fact.status == "active",
                                   Fact.prompt.in_(prompts) | func.lower(Fact.subject).in_(subjects))
        owners: dict[tuple, int] = {}
        for old in s.scalars(query):
            probe = FactInput(prompt=old.prompt, target=old.target, subject=old.subject, relation=old.relation,
                              text=old.text, scope=old.scope, user_id=old.user_id)
            for key in probe.supersede_keys():
                owners[key] = old.id
        return owners

    def get_fact(self, fact_id: int) -> Fact:
        with self._sessions() as s:
            fact = s.get(Fact, fact_id)
        if fact is None:
            raise NotFoundError(f"no fact with id {fact_id}")
        return fact

    def list_facts(self, status: str | None = "active", limit: int | None = None, offset: int = 0,
                   user_id: str | None = None, include_global: bool = True) -> list[Fact]:
        query = select(Fact).order_by(Fact.id).offset(offset)
        if status:
            query = query.where(Fact.status == status)
        if user_id is not None:
            query = query.where((Fact.user_id == user_id) | (Fact.scope == "global") if include_global
                                else Fact.user_id == user_id)
        if limit is not None:
            query = query.limit(limit)
        with self._sessions() as s:
            return list(s.scalars(query))

    def delete_fact(self, fact_id: int, reason: str | None = None) -> Fact:
        with self.transaction() as s:
            fact = s.get(Fact, fact_id)
            if fact is None:
                raise NotFoundError(f"no fact with id {fact_id}")
            fact.status = "deleted"
            s.add(Event(fact_id=fact_id, kind="deleted", detail={"reason": reason} if reason else None))
        return fact

    def history(self, fact_id: int) -> list[Event]:
        self.get_fact(fact_id)
        with self._sessions() as s:
            return list(s.scalars(select(Event).where(Event.fact_id == fact_id).order_by(Event.id)))

    def log_event(self, fact_id: int | None, kind: str, session: Session | None = None, **detail) -> None:
        row = Event(fact_id=fact_id, kind=kind, detail=detail or None)
        if session is not None:
            session.add(row)
            return
        with self.transaction() as s:
            s.add(row)

    # -- contexts -------------------------------------------------------------------------------
    def add_contexts(self, fact_id: int, texts: Sequence[str], generator: str) -> int:
        with self.transaction() as s:
            if s.get(Fact, fact_id) is None:
                raise NotFoundError(f"no fact with id {fact_id}")
            if texts:
                s.execute(insert(Context), [{"fact_id": fact_id, "text": t, "generator": generator} for t in texts])
            s.add(Event(fact_id=fact_id, kind="contexts", detail={"generator": generator, "n": len(texts)}))
        return len(texts)

    def contexts(self, fact_id: int) -> list[Context]:
        self.get_fact(fact_id)
        with self._sessions() as s:
            return list(s.scalars(select(Context).where(Context.fact_id == fact_id).order_by(Context.id)))

    def facts_without_contexts(self, limit: int | None = None) -> list[Fact]:
        has = select(Context.fact_id).distinct()
        query = select(Fact).where(Fact.status == "active", Fact.id.not_in(has)).order_by(Fact.id)
        if limit is not None:
            query = query.limit(limit)
        with self._sessions() as s:
            return list(s.scalars(query))

    # -- summary --------------------------------------------------------------------------------
    def counts(self) -> dict:
        with self._sessions() as s:
            by_status = dict(s.execute(select(Fact.status, func.count()).group_by(Fact.status)).all())
            n_contexts = s.scalar(select(func.count()).select_from(Context))
            edits: dict[str, dict[str, int]] = {}
            for backend, status, n in s.execute(select(Edit.backend, Edit.status, func.count()).group_by(Edit.backend, Edit.status)):
                edits.setdefault(backend, {})[status] = n
        return {
            "facts": {status: by_status.get(status, 0) for status in FACT_STATUSES},
            "contexts": n_contexts,
            "edits": edits,
        }
