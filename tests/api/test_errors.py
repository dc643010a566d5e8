"""Every error leaves the API as an OperationOutcome with the right status, negotiated like any response."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from adapter.api import create_app
from adapter.fhir import json_format
from adapter.store import SQLiteStore
from tests.api.conftest import FHIR_JSON, FHIR_XML, outcome_issues, patient

pytestmark = pytest.mark.anyio

JSON_BODY = {"Content-Type": FHIR_JSON}


async def create(client: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(
        f"/fhir/{resource['resourceType']}", content=json_format.dumps(resource), headers=JSON_BODY
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def history_total(client: httpx.AsyncClient) -> int:
    total: int = (await client.get("/fhir/_history")).json()["total"]
    return total


async def test_406_when_accept_names_nothing_we_write_and_nothing_is_stored(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/fhir/Patient", content=json_format.dumps(patient()), headers={**JSON_BODY, "Accept": "text/html"}
    )
    [issue] = outcome_issues(response, 406)
    assert issue["code"] == "not-supported"
    assert await history_total(client) == 0


async def test_406_for_an_unknown_format_parameter(client: httpx.AsyncClient) -> None:
    [issue] = outcome_issues(await client.get("/fhir/metadata", params={"_format": "turtle"}), 406)
    assert issue["expression"] == ["_format"]


async def test_415_for_a_body_that_is_not_fhir_json_or_xml(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir/Patient", content=b"name=Alex", headers={"Content-Type": "text/plain"})
    [issue] = outcome_issues(response, 415)
    assert issue["code"] == "not-supported"
    no_type = await client.post("/fhir/Patient", content=json_format.dumps(patient()))
    outcome_issues(no_type, 415)


async def test_413_for_a_body_over_the_limit(client: httpx.AsyncClient) -> None:
    # The app in conftest accepts bodies up to 20,000 bytes.
    big = patient(name=[{"family": "X" * 25_000}])
    response = await client.post("/fhir/Patient", content=json_format.dumps(big), headers=JSON_BODY)
    [issue] = outcome_issues(response, 413)
    assert issue["code"] == "too-costly"
    assert await history_total(client) == 0


async def test_413_is_checked_on_the_bytes_read_not_only_content_length(client: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        for _ in range(30):
            yield b" " * 1000

    response = await client.post("/fhir/Patient", content=chunks(), headers=JSON_BODY)
    assert "content-length" not in response.request.headers
    outcome_issues(response, 413)


async def test_404_for_a_type_r4_does_not_define(client: httpx.AsyncClient) -> None:
    [issue] = outcome_issues(await client.get("/fhir/Referral/1"), 404)
    assert "Referral" in issue["diagnostics"]
    outcome_issues(await client.post("/fhir/Referral", content=b"{}", headers=JSON_BODY), 404)
    # In the 4.0.1 package but not an R4 resource type (not in ValueSet resource-types).
    outcome_issues(await client.get("/fhir/SubscriptionStatus/1"), 404)


async def test_404_for_an_unknown_id_and_an_unknown_version(client: httpx.AsyncClient) -> None:
    [issue] = outcome_issues(await client.get("/fhir/Patient/no-such-patient"), 404)
    assert issue["code"] == "not-found"
    created = await create(client, patient())
    outcome_issues(await client.get(f"/fhir/Patient/{created['id']}/_history/9"), 404)
    outcome_issues(await client.get("/fhir/Patient/no-such-patient/_history"), 404)
    outcome_issues(await client.delete("/fhir/Patient/no-such-patient"), 404)


async def test_404_for_a_path_no_route_serves_in_xml_when_asked(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Patient/1/_history/1/more", headers={"Accept": FHIR_XML})
    [issue] = outcome_issues(response, 404, FHIR_XML)
    assert issue["code"] == "not-found"


async def test_405_names_every_method_allowed_at_the_path(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir/Patient/1", content=b"{}", headers={"Content-Type": "application/fhir+json"})
    [issue] = outcome_issues(response, 405)
    assert issue["code"] == "not-supported"
    assert response.headers["allow"] == "DELETE, GET, HEAD, PATCH, PUT"


async def test_410_for_a_deleted_resource_in_xml_when_asked(client: httpx.AsyncClient) -> None:
    created = await create(client, patient())
    await client.delete(f"/fhir/Patient/{created['id']}")
    response = await client.get(f"/fhir/Patient/{created['id']}", params={"_format": "xml"})
    [issue] = outcome_issues(response, 410, FHIR_XML)
    assert issue["code"] == "deleted"


async def test_412_when_if_match_is_not_the_current_version(client: httpx.AsyncClient) -> None:
    created = await create(client, patient())
    url = f"/fhir/Patient/{created['id']}"
    stale = {**JSON_BODY, "If-Match": 'W/"7"'}
    response = await client.put(url, content=json_format.dumps({**created, "active": True}), headers=stale)
    [issue] = outcome_issues(response, 412)
    assert issue["code"] == "conflict"
    outcome_issues(await client.delete(url, headers={"If-Match": 'W/"2"'}), 412)
    assert (await client.get(url)).json()["meta"]["versionId"] == "1"


async def test_422_lists_the_validation_issues_with_their_expressions(client: httpx.AsyncClient) -> None:
    invalid = patient(gender="robot", birthDate="01/01/1980")
    response = await client.post("/fhir/Patient", content=json_format.dumps(invalid), headers=JSON_BODY)
    issues = outcome_issues(response, 422)
    expressions = {expression for issue in issues if issue["severity"] == "error" for expression in issue["expression"]}
    assert {"Patient.gender", "Patient.birthDate"} <= expressions
    assert await history_total(client) == 0


async def test_422_on_update_too_in_xml_when_asked(client: httpx.AsyncClient) -> None:
    invalid = patient(id="sp-1", unknownElement=True)
    response = await client.put(
        "/fhir/Patient/sp-1", content=json_format.dumps(invalid), headers={**JSON_BODY, "Accept": FHIR_XML}
    )
    issues = outcome_issues(response, 422, FHIR_XML)
    assert any("unknownElement" in issue["diagnostics"] for issue in issues)


@pytest.mark.parametrize(
    ("content", "content_type", "code"),
    [
        (b'{"resourceType": "Patient",', FHIR_JSON, "structure"),
        (b"[]", FHIR_JSON, "invalid"),
        (b"", FHIR_JSON, "invalid"),
        (b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/>', FHIR_XML, "structure"),
        (
            b'<?xml version="1.0"?><!DOCTYPE Patient [<!ENTITY x "y">]>'
            b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/></Patient>',
            FHIR_XML,
            "security",
        ),
    ],
)
async def test_400_for_a_body_that_cannot_be_read(
    client: httpx.AsyncClient, content: bytes, content_type: str, code: str
) -> None:
    response = await client.post("/fhir/Patient", content=content, headers={"Content-Type": content_type})
    [issue] = outcome_issues(response, 400)
    assert issue["code"] == code


async def test_deeply_nested_json_is_refused_and_the_server_keeps_serving(client: httpx.AsyncClient) -> None:
    deep = b'{"resourceType": "Patient", "extension": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    [issue] = outcome_issues(await client.post("/fhir/Patient", content=deep, headers=JSON_BODY), 413)
    assert issue["code"] == "too-costly" and "deep" in issue["diagnostics"]
    assert (await client.get("/fhir/metadata")).status_code == 200
    assert await history_total(client) == 0


@pytest.mark.parametrize("number", [b"1" * 5000, b"1e999999999999999999999"])
async def test_a_number_python_cannot_hold_is_a_400_not_a_500(client: httpx.AsyncClient, number: bytes) -> None:
    """Over 4,300 digits (Python's int limit) or beyond Decimal's exponents: both escaped the
    parser as ValueError / decimal.InvalidOperation."""
    body = b'{"resourceType": "Patient", "multipleBirthInteger": ' + number + b"}"
    [issue] = outcome_issues(await client.post("/fhir/Patient", content=body, headers=JSON_BODY), 400)
    assert "number" in issue["diagnostics"]
    assert await history_total(client) == 0


async def test_400_when_the_body_type_is_not_the_url_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir/Practitioner", content=json_format.dumps(patient()), headers=JSON_BODY)
    [issue] = outcome_issues(response, 400)
    assert issue["expression"] == ["resourceType"]


@pytest.mark.parametrize("body_id", ["sp-other", None])
async def test_400_when_the_body_id_is_not_the_url_id_on_update(client: httpx.AsyncClient, body_id: str | None) -> None:
    resource = patient() if body_id is None else patient(id=body_id)
    response = await client.put("/fhir/Patient/sp-url", content=json_format.dumps(resource), headers=JSON_BODY)
    [issue] = outcome_issues(response, 400)
    assert issue["expression"] == ["id"]
    assert await history_total(client) == 0


@pytest.mark.parametrize("bad_id", ["has_underscore", "x" * 65, "sp%20space"])
async def test_400_for_an_id_with_bad_syntax(client: httpx.AsyncClient, bad_id: str) -> None:
    [issue] = outcome_issues(await client.get(f"/fhir/Patient/{bad_id}"), 400)
    assert issue["expression"] == ["id"]
    put = await client.put(f"/fhir/Patient/{bad_id}", content=json_format.dumps(patient(id=bad_id)), headers=JSON_BODY)
    outcome_issues(put, 400)


@pytest.mark.parametrize(
    ("query", "expression"),
    [({"_count": "many"}, "_count"), ({"_count": "-1"}, "_count"), ({"_since": "yesterday"}, "_since")],
)
async def test_400_for_bad_history_parameters(
    client: httpx.AsyncClient, query: dict[str, str], expression: str
) -> None:
    [issue] = outcome_issues(await client.get("/fhir/_history", params=query), 400)
    assert issue["expression"] == [expression]


class BrokenStore(SQLiteStore):
    """A store whose reads fail unexpectedly, with internals in the message."""

    async def read(self, type: str, id: str) -> dict[str, Any]:
        raise RuntimeError("database password is hunter2")


async def test_500_for_an_unexpected_error_without_internal_details() -> None:
    store = BrokenStore(":memory:")
    app = create_app(store)
    # The server error middleware re-raises after answering (so the server logs it); keep the answer.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/fhir/Patient/1", headers={"Accept": FHIR_XML})
    finally:
        await store.close()
    [issue] = outcome_issues(response, 500, FHIR_XML)
    assert issue["code"] == "exception"
    assert b"hunter2" not in response.content
    assert b"RuntimeError" not in response.content


async def test_errors_fall_back_to_json_when_the_request_asked_for_an_unwritable_format(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/fhir/Patient/no-such", headers={"Accept": "text/csv"})
    outcome_issues(response, 406, FHIR_JSON)


async def test_every_error_about_a_resource_names_it_in_an_expression(client: httpx.AsyncClient) -> None:
    created = await create(client, patient())
    url = f"/fhir/Patient/{created['id']}"
    stale = await client.put(url, content=json_format.dumps(created), headers={**JSON_BODY, "If-Match": 'W/"9"'})
    answers = [
        (await client.get("/fhir/Patient/nobody"), 404),
        (stale, 412),
        (await client.post("/fhir/Patient", content=b"x", headers={"Content-Type": "text/plain"}), 415),
        (await client.get(url, headers={"Accept": "text/html"}), 406),
        (await client.delete("/fhir/Patient"), 405),
    ]
    await client.delete(url)
    answers.append((await client.get(url), 410))
    for response, status in answers:
        for issue in outcome_issues(response, status):
            assert issue["expression"] == ["Patient"], (status, issue)
