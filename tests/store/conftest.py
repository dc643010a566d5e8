"""The ``store`` fixture: every ResourceStore implementation, for the one contract suite.

Async tests run on anyio's pytest plugin (installed with httpx) with the asyncio backend. The
``postgres`` param runs on a throwaway cluster started once per session (``tests/store/pg_server.py``)
with an empty ``public`` schema per test; without PostgreSQL binaries (``scripts/install-postgres``)
or when the server cannot start, its tests are skipped with the reason.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapter.store import ResourceStore, SQLiteStore
from tests.store import pg_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A clock that moves one second further each time it is read, from a time with microseconds."""

    def __init__(self, start: datetime = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)) -> None:
        self.next = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            now = self.next
            self.next = now + timedelta(seconds=1)
            return now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg_server.Server]:
    """One PostgreSQL cluster for the session; skips the tests that need it when it cannot start."""
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    try:
        server = pg_server.start()
    except pg_server.Unavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: pg_server.Server) -> str:
    """The DSN of the session's server, with the ``public`` schema emptied for this test."""
    import psycopg

    with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_server.dsn()


@pytest.fixture(params=["sqlite-memory", "sqlite-file", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[ResourceStore]:
    if request.param == "sqlite-memory":
        implementation: ResourceStore = SQLiteStore(":memory:", clock=clock)
    elif request.param == "sqlite-file":
        implementation = SQLiteStore(tmp_path / "store.db", clock=clock)
    else:
        from adapter.store.postgres import PostgresStore

        implementation = PostgresStore(request.getfixturevalue("postgres_dsn"), clock=clock)
    try:
        yield implementation
    finally:
        await implementation.close()
