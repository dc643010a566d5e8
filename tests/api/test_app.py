"""The app factory: the route dispatch in front of the table's routes, and no per-request telemetry."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Match, Route

from adapter.api.app import _Dispatch
from adapter.fhir import json_format
from tests.api.conftest import FHIR_JSON, patient

pytestmark = pytest.mark.anyio

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PATHS = (
    "/fhir",
    "/fhir/",
    "/fhir/metadata",
    "/fhir/metadata\n",
    "/fhir/_history",
    "/fhir/$process-message",
    "/fhir/$ingest",
    "/fhir/Patient",
    "/fhir/Patient/",
    "/fhir//Patient",
    "/fhir/Patient/_history",
    "/fhir/Patient/_search",
    "/fhir/Patient/$validate",
    "/fhir/Patient/1",
    "/fhir/Patient/1/_history",
    "/fhir/Patient/1/_history/2",
    "/fhir/Patient/1/_history/2/more",
    "/fhir/Patient/1/$validate",
    "/fhir/Patient/_history/2",
    "/fhir/_history/Patient",
    "/other/Patient",
)


def scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": root_path + path, "root_path": root_path, "headers": []}


def scanned(routes: list[Route], request: dict[str, Any]) -> tuple[Route, dict[str, Any]] | None:
    """The route Starlette's in-order scan serves ``request`` with, and its child scope, if any fully matches."""
    for route in routes:
        match, child_scope = route.matches(request)
        if match is Match.FULL:
            return route, child_scope
    return None


async def test_the_dispatch_picks_the_route_the_in_order_scan_picks(app: FastAPI) -> None:
    dispatch, *routes = app.router.routes
    assert isinstance(dispatch, _Dispatch) and all(isinstance(route, Route) for route in routes)
    for method, path, root_path in itertools.product(METHODS, PATHS, ("", "/proxied")):
        request = scope(method, path, root_path)
        match, child_scope = dispatch.matches(request)
        expected = scanned(routes, request)  # type: ignore[arg-type]
        if expected is None:
            assert match is Match.NONE, (method, path)
        else:
            assert match is Match.FULL and child_scope == expected[1], (method, path)


async def test_literal_segments_and_operations_win_over_ids(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/fhir/Patient", content=json_format.dumps(patient()), headers={"Content-Type": FHIR_JSON}
    )
    id = created.json()["id"]
    assert (await client.get("/fhir/metadata")).json()["resourceType"] == "CapabilityStatement"
    assert (await client.get("/fhir/Patient/_history")).json()["type"] == "history"
    assert (await client.get(f"/fhir/Patient/{id}/_history")).json()["type"] == "history"
    assert (await client.get(f"/fhir/Patient/{id}/_history/1")).json()["id"] == id
    searched = await client.post(
        "/fhir/Patient/_search",
        content=b"gender=unknown",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert searched.json()["type"] == "searchset" and searched.json()["total"] == 1
    validated = await client.post(
        "/fhir/Patient/$validate", content=json_format.dumps(patient()), headers={"Content-Type": FHIR_JSON}
    )
    assert validated.json()["resourceType"] == "OperationOutcome"
    head = await client.head(f"/fhir/Patient/{id}")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == 'W/"1"'


async def test_a_trailing_slash_is_still_redirected_and_a_wrong_method_still_405(client: httpx.AsyncClient) -> None:
    redirected = await client.get("/fhir/Patient/")
    assert redirected.status_code == 307 and redirected.headers["location"].endswith("/fhir/Patient")
    refused = await client.delete("/fhir/Patient")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD, POST, PUT"


async def test_urls_are_still_built_from_the_routes(app: FastAPI) -> None:
    assert app.url_path_for("read", type="Patient", id="1") == "/fhir/Patient/1"


async def test_a_request_does_not_look_for_opentelemetry_providers(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import _logs, metrics, trace

    looked: list[str] = []
    for module, name in (
        (trace, "get_tracer_provider"),
        (metrics, "get_meter_provider"),
        (_logs, "get_logger_provider"),
    ):
        monkeypatch.setattr(module, name, lambda name=name: looked.append(name))
    assert (await client.get("/fhir/metadata")).status_code == 200
    assert looked == []
