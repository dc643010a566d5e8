"""``$ingest`` on the production store: a real PostgreSQL server started by the tests
(``tests/store/pg_server.py``; skipped with the reason when none can be started). Ingesting the
same records twice stores nothing twice there too (the SQLite runs are in ``test_ingest.py``;
``$process-message``'s concurrent duplicates run on both stores in ``test_process_message.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter.api import create_app
from adapter.store import ResourceStore
from adapter.validation.profiles import ProfileValidator
from tests.api.test_process_message import counts

# Fixtures used here, imported so that pytest finds them (the "as" form marks a re-export).
from tests.api.test_process_message import profile_validator as profile_validator
from tests.store.conftest import postgres_dsn as postgres_dsn
from tests.store.conftest import postgres_server as postgres_server

pytestmark = pytest.mark.anyio

CASES = Path(__file__).resolve().parents[2] / "mappings" / "sp-referral" / "cases"


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
