"""SQLAlchemy 2.0 models of the fact store (DESIGN §2, data model).

The same DDL serves SQLite and PostgreSQL. PostgreSQL enforces VARCHAR lengths (SQLite does not): every
bounded column holds either a value memory/facts.py caps at that length or one of our own short names.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """A UTC instant, read back as a naive UTC datetime on every backend. SQLite keeps no zone and returns
    naive wall time; PostgreSQL returns aware times in its session zone: both now read alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        # A naive value is UTC already; SQLite would drop an aware one's zone without converting it.
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value settings of the store: schema version, model version, index version, and the model and
    gist add-on the store is bound to (`model`, `model_fingerprint`, `gist_addon`, ...)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(Text, primary_key=True)  # unbounded: it embeds client Idempotency-Keys
    value: Mapped[str] = mapped_column(Text)


class Fact(Base):
    __tablename__ = "facts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str | None] = mapped_column(String(300))
    relation: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str | None] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(String(300))
    text: Mapped[str | None] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(String(16), default="global")
    user_id: Mapped[str | None] = mapped_column(String(200), index=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    # A hash index on PostgreSQL: a b-tree entry cannot exceed ~2.7 kB, and a 1000-character prompt can.
    __table_args__ = (Index("ix_facts_prompt", "prompt", postgresql_using="hash"), Index("ix_facts_subject_relation", "subject", "relation"))

    @property
    def statement(self) -> str:
        return self.text or f"{self.prompt} {self.target}"


class Context(Base):
    __tablename__ = "contexts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    generator: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Edit(Base):
    __tablename__ = "edits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), index=True)
    backend: Mapped[str] = mapped_column(String(16))  # ice | ftm | gist
    # pending (the work queue: still to route/apply, written with its fact) | applied | failed | rolled_back
    status: Mapped[str] = mapped_column(String(16), default="pending")
    model_version: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    artifact: Mapped[str | None] = mapped_column(Text)  # safetensors delta, relative to the data dir
    checksum: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Event(Base):
    """Append-only log of what happened to every fact, and why."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int | None] = mapped_column(ForeignKey("facts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # gist_pool | adapter | faiss | export
    path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class EvalRun(Base):
    __tablename__ = "eval_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(Text)
    protocol: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(Text)
    methods: Mapped[list] = mapped_column(JSON)
    settings: Mapped[dict | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")
    out_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class EvalPoint(Base):
    __tablename__ = "eval_points"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    n_edits: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)


class Stage(Base):
    """Where one fact stands in the agent loop (agent/loop): stored -> contexts -> routed -> applied, or
    failed (parked after too many failed attempts) or dropped (superseded or deleted before it was applied).

    A process works on a fact only while it holds the fact's lease (owner id, expiry as epoch seconds).
    `edit_id` is the pending `edits` row the routing decision created; the stage settles from that row's
    outcome, so an edit committed just before a kill is completed on restart, never redone."""

    __tablename__ = "stages"
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), index=True)
    route: Mapped[str | None] = mapped_column(String(16))  # ice | gist, once routed
    edit_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed attempts (an error was recorded)
    takeovers: Mapped[int] = mapped_column(Integer, default=0)  # leases taken from a process that died
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[float | None] = mapped_column(Float)  # epoch seconds: floats compare in any backend
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class SourceOffset(Base):
    """How far the agent has read one source (a tailed file): complete lines only, committed together
    with the facts those lines gave, so a restart neither re-reads nor skips a line."""

    __tablename__ = "source_offsets"
    key: Mapped[str] = mapped_column(String(1000), primary_key=True)  # the source's identity (absolute path)
    offset: Mapped[int] = mapped_column(Integer, default=0)  # bytes
    line: Mapped[int] = mapped_column(Integer, default=0)  # lines, for the line numbers of messages
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class FactExtraction(Base):
    """What agent/extract found in a text fact's sentence (issue 22, item 3): one row per attempt, the
    latest being current. status "ok" carries the four fields and how they were found (rules | openai |
    local); status "none" carries only the reason the sentence stays a text fact. The fact row itself is
    filled from an ok row by agent.extract.apply_extraction; its content_hash never changes."""

    __tablename__ = "extractions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), index=True)
    status: Mapped[str] = mapped_column(String(8))  # ok | none
    method: Mapped[str | None] = mapped_column(String(16))  # rules | openai | local; None when nothing was found
    generator: Mapped[str | None] = mapped_column(String(200))  # e.g. "openai:gpt-4o-mini", "rules"
    subject: Mapped[str | None] = mapped_column(String(300))
    relation: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str | None] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(String(300))
    reason: Mapped[str | None] = mapped_column(Text)  # why nothing was found, or why the LLM was overruled
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
