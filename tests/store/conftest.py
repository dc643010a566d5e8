"""The ``store`` fixture: every ResourceStore implementation, for the one contract suite.

Async tests run on anyio's pytest plugin (installed with httpx) with the asyncio backend. A PostgreSQL
store joins as one more param of ``store`` when it exists.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapter.store import ResourceStore, SQLiteStore


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


@pytest.fixture(params=["sqlite-memory", "sqlite-file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[ResourceStore]:
    if request.param == "sqlite-memory":
        implementation: ResourceStore = SQLiteStore(":memory:", clock=clock)
    else:
        implementation = SQLiteStore(tmp_path / "store.db", clock=clock)
    try:
        yield implementation
    finally:
        await implementation.close()
