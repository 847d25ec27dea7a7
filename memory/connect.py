"""Opening a database: SQLite's pragmas (WAL, busy timeout), clear errors for a missing driver, and the
one statement that differs by dialect (an upsert)."""
from __future__ import annotations

import importlib
import sqlite3
import time
from pathlib import Path

from sqlalchemy.orm import Session

from memory.errors import StoreError

BUSY_TIMEOUT_MS = 10_000
# pip names of drivers whose import name differs (or that need an extra); others install as imported.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "mysql": "mysql-connector-python", "cx_Oracle": "cx_Oracle", "pymssql": "pymssql"}


def sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _enable_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _enable_wal(cur) -> None:
    """Switch to WAL once. The switch needs an exclusive lock and SQLite does not wait on busy_timeout for
    it, so two first opens at once get "database is locked": retry until the timeout instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the DBAPI's OperationalError; the driver module may vary
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def driver_error(exc: ImportError, driver: str, url: str) -> StoreError:
    # The missing module's name when Python gives one (a driver's own dependency included), else the
    # URL's driver (psycopg without its libpq wrapper raises a nameless ImportError).
    module = (exc.name or driver).split(".")[0]
    package = DRIVER_PACKAGES.get(module, module)
    return StoreError(f"the URL needs the {module} driver: pip install '{package}' (for {url})")


def sqlite_lacks_store(path: Path) -> bool:
    """True when the SQLite file surely has no `meta` table, read without writing (no WAL switch)."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None
        finally:
            conn.close()
    except sqlite3.Error:
        return False  # unreadable this way: let the normal open decide


def upsert(session: Session, model: type, values: dict) -> None:
    """Insert one row or update it by primary key, in one statement (INSERT ... ON CONFLICT DO UPDATE on
    SQLite and PostgreSQL): two processes writing a new key at once cannot both insert it, as they can
    with a read-then-write merge. Other dialects get that merge."""
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        session.merge(model(**values))
        return
    keys = [column.name for column in model.__table__.primary_key]
    stmt = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert(model).values(**values)
    session.execute(stmt.on_conflict_do_update(
        index_elements=keys, set_={name: stmt.excluded[name] for name in values if name not in keys}))
