"""Transaction and batch Bundles at the base: atomic, urn:uuid references rewritten, conditional
entries, per-entry responses, and errors that name the entry."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import FHIR_JSON, outcome_issues, patient

pytestmark = pytest.mark.anyio

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def entry(method: str, url: str, resource: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"request": {"method": method, "url": url, **extra.pop("request", {})}, **extra}
    if resource is not None:
        item["resource"] = resource
    return item


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


async def send(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await client.post("/fhir", json=body, headers={"Content-Type": FHIR_JSON, **headers})


def referral(subject: str) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"reference": subject}}


def nhs_patient(number: str) -> dict[str, Any]:
    return patient(identifier=[{"system": NHS, "value": number}])


async def total(client: httpx.AsyncClient, type: str, **params: str) -> int:
    response = await client.get(f"/fhir/{type}", params={**params, "_summary": "count"})
    assert response.status_code == 200
    count: int = response.json()["total"]
    return count


async def test_a_transaction_creates_everything_and_resolves_urn_uuid_references(client: httpx.AsyncClient) -> None:
    pid = "urn:uuid:3f2a1c5e-0000-4000-8000-000000000001"
    response = await send(
        client,
        bundle(
            "transaction",
            entry("POST", "ServiceRequest", referral(pid), fullUrl="urn:uuid:3f2a1c5e-0000-4000-8000-000000000002"),
            entry("POST", "Patient", nhs_patient("9990000018"), fullUrl=pid),
            entry("GET", "ServiceRequest?patient.identifier=9990000018"),
        ),
        Prefer="return=representation",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transaction-response"
    created_request, created_patient, search = body["entry"]
    assert created_request["response"]["status"] == "201 Created"
    assert created_patient["response"]["location"].startswith(f"Patient/{created_patient['resource']['id']}/_history/1")
    assert created_request["resource"]["subject"]["reference"] == f"Patient/{created_patient['resource']['id']}"
    assert search["resource"]["total"] == 1 and search["response"]["status"] == "200 OK"
    stored = await client.get(f"/fhir/ServiceRequest/{created_request['resource']['id']}")
    assert stored.json()["subject"]["reference"] == f"Patient/{created_patient['resource']['id']}"


async def test_an_invalid_entry_fails_the_whole_transaction_and_names_it(client: httpx.AsyncClient) -> None:
    response = await send(
        client,
        bundle(
            "transaction",
            entry("POST", "Patient", nhs_patient("9990000018"), fullUrl="urn:uuid:a"),
            entry("POST", "Patient", patient(gender="sometimes"), fullUrl="urn:uuid:b"),
        ),
    )
    issues = outcome_issues(response, 422)
    assert "Bundle.entry[1].resource.gender" in {e for issue in issues for e in issue.get("expression", [])}
    assert await total(client, "Patient") == 0


async def test_a_store_error_rolls_the_transaction_back_and_names_the_entry(client: httpx.AsyncClient) -> None:
    kept = (await client.post("/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON})).json()
    response = await send(
        client,
        bundle(
            "transaction",
            entry("POST", "Patient", nhs_patient("9990000026")),
            entry("PUT", f"Patient/{kept['id']}", {**kept, "gender": "female"}, request={"ifMatch": 'W/"7"'}),
        ),
    )
    [issue] = outcome_issues(response, 412)
    assert issue["expression"] == ["Bundle.entry[1].request"]
    assert await total(client, "Patient") == 1
    assert (await client.get(f"/fhir/Patient/{kept['id']}")).json()["meta"]["versionId"] == "1"


async def test_conditional_entries_reuse_what_exists(client: httpx.AsyncClient) -> None:
    existing = (
        await client.post("/fhir/Patient", json=nhs_patient("9990000018"), headers={"Content-Type": FHIR_JSON})
    ).json()
    response = await send(
        client,
        bundle(
            "transaction",
            entry(
                "POST",
                "Patient",
                nhs_patient("9990000018"),
                fullUrl="urn:uuid:p",
                request={"ifNoneExist": f"identifier={NHS}|9990000018"},
            ),
            entry("POST", "ServiceRequest", referral("urn:uuid:p")),
            entry("PUT", f"Patient?identifier={NHS}|9990000026", nhs_patient("9990000026")),
        ),
        Prefer="return=representation",
    )
    assert response.status_code == 200, response.text
    matched, request, upserted = response.json()["entry"]
    assert matched["response"]["status"] == "200 OK" and matched["resource"]["id"] == existing["id"]
    assert request["resource"]["subject"]["reference"] == f"Patient/{existing['id']}"
    assert upserted["response"]["status"] == "201 Created"
    assert await total(client, "Patient") == 2
    # The same Bundle again changes nothing: the conditional entries find what the first made.
    again = await send(
        client,
        bundle(
            "transaction",
            entry(
                "POST", "Patient", nhs_patient("9990000018"), request={"ifNoneExist": f"identifier={NHS}|9990000018"}
            ),
            entry("PUT", f"Patient?identifier={NHS}|9990000026", nhs_patient("9990000026")),
        ),
    )
    assert [e["response"]["status"] for e in again.json()["entry"]] == ["200 OK", "200 OK"]
    assert await total(client, "Patient") == 2


async def test_a_batch_runs_entries_independently(client: httpx.AsyncClient) -> None:
    response = await send(
        client,
        bundle(
            "batch",
            entry("POST", "Patient", nhs_patient("9990000018")),
            entry("POST", "Patient", patient(gender="sometimes")),
            entry("DELETE", "Patient/nobody"),
            entry("GET", "Patient/nobody"),
            entry("PATCH", "Patient/x"),
        ),
    )
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "404 Not Found", "404 Not Found", "400 Bad Request"]
    assert body["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert await total(client, "Patient") == 1


async def test_only_transaction_and_batch_bundles_are_taken_at_the_base(client: httpx.AsyncClient) -> None:
    [issue] = outcome_issues(await send(client, bundle("collection")), 400)
    assert issue["expression"] == ["Bundle.type"]
    outcome_issues(await send(client, patient()), 400)
    # A transaction is validated first: R4's bdl-3 requires entry.request.
    issues = outcome_issues(await send(client, bundle("transaction", {"resource": patient()})), 422)
    assert any(issue["diagnostics"].startswith("bdl-3") for issue in issues)
    batch = await send(client, bundle("batch", {"resource": patient()}))
    [failed] = batch.json()["entry"]
    assert failed["response"]["status"] == "400 Bad Request"
    assert failed["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[0].request"]
    wrong_type = entry("POST", "Patient", referral("Patient/x"))
    [issue] = outcome_issues(await send(client, bundle("transaction", wrong_type)), 400)
    assert issue["expression"] == ["Bundle.entry[0].resource"]


async def test_a_transaction_in_xml_gets_its_response_in_xml(client: httpx.AsyncClient) -> None:
    from adapter.fhir import xml_format

    body = bundle(
        "transaction",
        entry("POST", "Patient", nhs_patient("9990000018"), fullUrl="urn:uuid:6d7f0b1a-0000-4000-8000-000000000001"),
        entry("POST", "ServiceRequest", referral("urn:uuid:6d7f0b1a-0000-4000-8000-000000000001")),
    )
    response = await client.post(
        "/fhir",
        content=xml_format.dumps(body),
        headers={"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"},
    )
    assert response.status_code == 200, response.text
    answer = xml_format.loads(response.content)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "201 Created"]
    assert await total(client, "ServiceRequest", **{"patient.identifier": "9990000018"}) == 1
