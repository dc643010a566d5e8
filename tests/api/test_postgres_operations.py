"""``$process-message`` and ``$ingest`` on the production store: a real PostgreSQL server started by
the tests (``tests/store/pg_server.py``; skipped with the reason when none can be started).

The SQLite runs of the same operations are in ``test_process_message.py`` and ``test_ingest.py``;
these check what depends on the store: that two identical messages sent together are processed
once (PostgreSQL locks the fixed ids rather than serialising every writer), and that ingesting the
same records twice stores nothing twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter.api import create_app
from adapter.store import OperationResult, ResourceStore
from adapter.validation.profiles import ProfileValidator
from tests.api.test_process_message import bars_issues, counts, message, post

# Fixtures used here, imported so that pytest finds them (the "as" form marks a re-export).
from tests.api.test_process_message import profile_validator as profile_validator
from tests.store.conftest import postgres_dsn as postgres_dsn
from tests.store.conftest import postgres_server as postgres_server

pytestmark = pytest.mark.anyio

CASES = Path(__file__).resolve().parents[2] / "mappings" / "sp-referral" / "cases"


class _Together:
    """A store that holds each transaction until two have arrived, so that both messages are past
    every check before either writes: only the store can tell them apart."""

    def __init__(self, inner: ResourceStore) -> None:
        self.inner = inner
        self.arrived = asyncio.Barrier(2)

    async def transaction(self, operations: Any) -> list[OperationResult]:
        await asyncio.wait_for(self.arrived.wait(), timeout=10)
        return await self.inner.transaction(operations)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def postgres(postgres_dsn: str) -> AsyncIterator[ResourceStore]:
    from adapter.store.postgres import PostgresStore

    store = PostgresStore(postgres_dsn)
    try:
        yield store
    finally:
        await store.close()


async def _client(store: Any, validator: ProfileValidator) -> httpx.AsyncClient:
    app = create_app(store, profile_validator=validator, max_body_bytes=200_000)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("same_request_id", [True, False])
async def test_two_identical_messages_sent_together_are_processed_once(
    postgres: ResourceStore,
    profile_validator: ProfileValidator,
    same_request_id: bool,
) -> None:
    async with await _client(_Together(postgres), profile_validator) as client:
        body = message()
        first, second = await asyncio.gather(
            post(client, body, request_id="request-1"),
            post(client, body, request_id="request-1" if same_request_id else "request-2"),
        )
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    rejected = first if first.status_code == 409 else second
    [issue] = bars_issues(rejected, 409, "REC_CONFLICT")
    assert issue["code"] == "duplicate"
    found = await counts(postgres)  # type: ignore[arg-type]
    assert (found["ServiceRequest"], found["Task"], found["Encounter"], found["Patient"]) == (1, 1, 1, 1)
    assert (found["AuditEvent"], found["MessageHeader"]) == (1, 1)


async def test_ingesting_the_same_records_twice_stores_them_once(
    postgres: ResourceStore,
    profile_validator: ProfileValidator,
) -> None:
    body = (CASES / "awkward" / "input.csv").read_bytes()
    async with await _client(postgres, profile_validator) as client:
        answers = [
            await client.post(
                "/fhir/$ingest", params={"mapping": "sp-referral"}, content=body, headers={"Content-Type": "text/csv"}
            )
            for _ in range(2)
        ]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert "0 resources created" in answers[1].json()["issue"][0]["diagnostics"]
    found = await counts(postgres)  # type: ignore[arg-type]
    assert (found["ServiceRequest"], found["Patient"], found["Task"], found["Consent"]) == (3, 2, 3, 3)
    assert len(await postgres.history("ServiceRequest")) == 3
