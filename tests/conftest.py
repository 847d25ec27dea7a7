"""Shared fixtures: a temp store, no progress bars, the real default model loaded once, and PostgreSQL.

PostgreSQL: `$ENGRAM_TEST_POSTGRES_URL` (what .ci/run exports) names a server to use; without it, a
server of our own is started for the session by scripts/postgres.sh when PostgreSQL's binaries are
here, and stopped at the end. With neither, the PostgreSQL tests skip and say why. Each test gets a
schema of its own (a `search_path` in its URL), dropped after it.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("ENGRAM_PROGRESS", "0")

POSTGRES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def store(tmp_path):
    from memory.store import FactStore

    return FactStore(f"sqlite:///{tmp_path / 'store.sqlite'}")


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct from its PyPI wheel (cached as safetensors after the first load)."""
    from editors.model import load_model

    return load_model("smollm2-135m", "cpu")


# -- PostgreSQL ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL database the tests may create schemas in."""
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("no PostgreSQL driver: pip install 'psycopg[binary]'")
    if url := os.environ.get("ENGRAM_TEST_POSTGRES_URL"):
        yield url  # someone else's server: they stop it
        return
    directory = tempfile.mkdtemp(prefix="engram-pg-")
    try:
        # --no-install: a test run never apt-gets; CI's script run does (.ci/run).
        started = subprocess.run([str(POSTGRES_SCRIPT), "start", "--no-install", directory],
                                 capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            lines = [line.removeprefix("postgres.sh: ") for line in started.stderr.splitlines() if line.strip()]
            pytest.skip(f"no PostgreSQL server: {lines[-1] if lines else f'exit {started.returncode}'}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(POSTGRES_SCRIPT), "stop", directory], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL stores' URLs: each call makes a new schema, and the test's
    end drops them all (first ending whatever connections the test's stores left open)."""
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    admin = create_engine(postgres_server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def fresh() -> str:
        schema = f"engram_test_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        made.append(schema)
        # application_name tags the schema's connections, so the teardown can find them.
        url = make_url(postgres_server).update_query_dict({"options": f"-csearch_path={schema}",
                                                           "application_name": schema})
        return url.render_as_string(hide_password=False)

    yield fresh
    with admin.connect() as conn:
        for schema in made:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = :name AND pid <> pg_backend_pid()"), {"name": schema})
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> str:
    """A fresh store's URL on each backend in turn: the store tests' table runs over both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("postgres_url")()
