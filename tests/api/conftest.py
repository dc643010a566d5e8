"""An app over an in-memory SQLite store, and an in-process client for it.

Async tests run on anyio's pytest plugin with the asyncio backend, as in ``tests/store``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapter.api import create_app
from adapter.store import SQLiteStore

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store() -> AsyncIterator[SQLiteStore]:
    implementation = SQLiteStore(":memory:")
    try:
        yield implementation
    finally:
        await implementation.close()


@pytest.fixture
def app(store: SQLiteStore) -> FastAPI:
    return create_app(store, max_body_bytes=20_000)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def patient(**extra: Any) -> dict[str, Any]:
    """A synthetic patient (test NHS number 9990000018)."""
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
        "name": [{"family": "Testpatient", "given": ["Alex"]}],
        "gender": "unknown",
        "birthDate": "1980-01-01",
    }
    resource.update(extra)
    return resource


def outcome_issues(response: httpx.Response, status: int, media_type: str = FHIR_JSON) -> list[dict[str, Any]]:
    """Assert ``response`` is an OperationOutcome with ``status`` in ``media_type``; return its issues."""
    from adapter.fhir import json_format, xml_format

    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(media_type)
    codec = json_format if media_type == FHIR_JSON else xml_format
    body = codec.loads(response.content)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"], "an OperationOutcome needs at least one issue"
    issues: list[dict[str, Any]] = body["issue"]
    return issues
