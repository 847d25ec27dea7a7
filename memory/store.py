"""The fact store: every fact, context, edit and event, in SQLite (or any SQLAlchemy URL).

Semantics:
- An identical fact (same content hash) is a no-op reported as a duplicate.
- A new target for the same subject+relation, or for the same prompt, in the same scope supersedes
  the old fact: the old row stays, marked `superseded`, with `superseded_by` pointing to the new one.
- Every change appends to `events`. A batch of facts is one transaction: all of it or none of it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, event, func, insert, inspect, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from memory.errors import NotFoundError, SchemaVersionError, StoreError
from memory.facts import FactInput
from memory.models import SCHEMA_VERSION, Base, Context, Edit, Event, Fact, Meta, utcnow

REPO_ROOT = Path(__file__).resolve().parents[1]
FACT_STATUSES = ("active", "superseded", "deleted")


def default_db_url() -> str:
    return os.environ.get("ENGRAM_DB") or f"sqlite:///{REPO_ROOT / 'store.sqlite'}"


@dataclass
class AddReport:
    stored: int = 0
    duplicates: int = 0
    superseded: int = 0
    fact_ids: list[int | None] = field(default_factory=list)  # per input; the existing id for a duplicate
    new_ids: list[int] = field(default_factory=list)  # ids of the rows this batch wrote


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class FactStore:
    def __init__(self, url: str | None = None):
        self.url = url or default_db_url()
        try:
            parsed = make_url(self.url)
        except Exception as exc:
            raise StoreError(f"invalid database URL {self.url!r}: {exc}") from exc
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.db_path = Path(parsed.database) if self.is_sqlite and parsed.database not in (None, "", ":memory:") else None
        if self.db_path is not None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._open_schema()

    # -- schema ---------------------------------------------------------------------------------
    def _open_schema(self) -> None:
        try:
            has_meta = inspect(self.engine).has_table("meta")
            if has_meta:
                with self._sessions() as s:
                    row = s.get(Meta, "schema_version")
                found = int(row.value) if row else 0
                if found > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"{self.url} has schema version {found}, newer than this Engram's {SCHEMA_VERSION}; "
                        "upgrade Engram to open it"
                    )
            Base.metadata.create_all(self.engine)
            with self.transaction() as s:
                if s.get(Meta, "schema_version") is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the store at {self.url}: {exc}") from exc

    @property
    def data_dir(self) -> Path:
        """Where artifacts (weight deltas, gist pools, the FAISS index) live, beside the database."""
        if env := os.environ.get("ENGRAM_DATA"):
            return Path(env)
        if self.db_path is not None:
            return self.db_path.with_name(self.db_path.stem + ".engram")
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
        if session is not None:
            session.merge(Meta(key=key, value=value))
            return
        with self.transaction() as s:
            s.merge(Meta(key=key, value=value))

    # -- facts ----------------------------------------------------------------------------------
    def add_facts(self, facts: Sequence[FactInput]) -> AddReport:
        """Store a batch in one transaction; duplicates are no-ops, newer targets supersede."""
        report = AddReport()
        if not facts:
            return report
        with self.transaction() as s:
            hashes = [f.content_hash for f in facts]
            known = dict(s.execute(select(Fact.content_hash, Fact.id).where(Fact.content_hash.in_(hashes))).all())
            owners: dict[tuple, tuple[str, int]] = {k: ("db", v) for k, v in self._active_owners(s, facts).items()}
            retired: set[tuple[str, int]] = set()
            new: list[FactInput] = []
            slots: list[tuple[str, int]] = []  # per input: ("db", id) or ("new", position in `new`)
            replaced: list[tuple[tuple[str, int], int]] = []  # (old owner, position of the new fact)
            seen: dict[str, int] = {}
            for fact in facts:
                h = fact.content_hash
                if h in known:
                    slots.append(("db", known[h]))
                    continue
                if h in seen:
                    slots.append(("new", seen[h]))
                    continue
                pos = seen[h] = len(new)
                new.append(fact)
                slots.append(("new", pos))
                for key in fact.supersede_keys():
                    old = owners.get(key)
                    if old is not None and old not in retired:
                        retired.add(old)
                        replaced.append((old, pos))
                    owners[key] = ("new", pos)
            # RETURNING with the hash maps rows to ids without forcing row-at-a-time inserts.
            returned = dict(s.execute(insert(Fact).returning(Fact.content_hash, Fact.id),
                                      [self._row(f) for f in new]).all()) if new else {}
            ids = [returned[f.content_hash] for f in new]
            resolve = lambda slot: slot[1] if slot[0] == "db" else ids[slot[1]]  # noqa: E731
            events = []
            for slot, fact in zip(slots, facts):
                if slot[0] == "db" or fact is not new[slot[1]]:
                    report.duplicates += 1
                    events.append({"fact_id": resolve(slot), "kind": "deduped", "detail": None})
                else:
                    events.append({"fact_id": resolve(slot), "kind": "ingested", "detail": {"scope": fact.scope}})
                report.fact_ids.append(resolve(slot))
            for old, pos in replaced:
                old_id, new_id = resolve(old), ids[pos]
                s.execute(update(Fact).where(Fact.id == old_id).values(status="superseded", superseded_by=new_id))
                events.append({"fact_id": old_id, "kind": "superseded", "detail": {"by": new_id}})
            contexts = [{"fact_id": i, "text": t, "generator": "supplied"} for f, i in zip(new, ids) for t in f.contexts]
            # Core inserts of plain rows: executemany in one statement, not one per row.
            if contexts:
                s.connection().execute(Context.__table__.insert(), contexts)
            s.connection().execute(Event.__table__.insert(), [{**e, "created_at": utcnow()} for e in events])
            report.stored, report.superseded, report.new_ids = len(new), len(replaced), ids
        return report

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
