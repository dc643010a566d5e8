"""``$validate`` over HTTP, and how writes treat the profiles a resource declares."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapter.api import create_app
from adapter.store import SQLiteStore
from tests.api.conftest import FHIR_JSON, outcome_issues

pytestmark = pytest.mark.anyio

UKCORE_PATIENT = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
STATUS = "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus"


def ukcore_patient(status_code: str = "01", **extra: Any) -> dict[str, Any]:
    identifier = {
        "extension": [
            {
                "url": STATUS,
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland",
                            "code": status_code,
                        }
                    ]
                },
            }
        ],
        "system": NHS,
        "value": "9990000018",
    }
    return {"resourceType": "Patient", "meta": {"profile": [UKCORE_PATIENT]}, "identifier": [identifier], **extra}


async def issues_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issues: list[dict[str, Any]] = body["issue"]
    return issues


def errors(issues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [issue for issue in issues if issue["severity"] in ("error", "fatal")]


async def test_validate_a_resource_body_against_its_declared_profile(client: httpx.AsyncClient) -> None:
    good = await issues_of(await client.post("/fhir/Patient/$validate", json=ukcore_patient()))
    assert errors(good) == []
    bad = await issues_of(await client.post("/fhir/Patient/$validate", json=ukcore_patient("99")))
    [error] = errors(bad)
    assert error["expression"] == ["Patient.identifier[0].extension[0].value.ofType(CodeableConcept)"]
    assert "UKCore-NHSNumberVerificationStatus" in error["diagnostics"] and "required" in error["diagnostics"]


async def test_validate_with_a_profile_parameter_and_parameters_body(client: httpx.AsyncClient) -> None:
    plain = {
        "resourceType": "Patient",
        "identifier": [{"system": NHS, "value": "9990000018"}, {"system": NHS, "value": "9990000026"}],
    }
    # Without a profile the two NHS numbers are fine; UK Core allows one.
    assert errors(await issues_of(await client.post("/fhir/Patient/$validate", json=plain))) == []
    by_query = await client.post("/fhir/Patient/$validate", params={"profile": UKCORE_PATIENT}, json=plain)
    [error] = errors(await issues_of(by_query))
    assert "nhsNumber" in error["diagnostics"] and "at most 1" in error["diagnostics"]
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": plain}, {"name": "profile", "valueUri": UKCORE_PATIENT}],
    }
    assert errors(await issues_of(await client.post("/fhir/Patient/$validate", json=parameters))) == errors(
        await issues_of(by_query)
    )
    [issue] = outcome_issues(await client.post("/fhir/Patient/$validate", json={"resourceType": "Observation"}), 400)
    assert issue["expression"] == ["resource.resourceType"]
    outcome_issues(await client.post("/fhir/Patient/$validate", params={"mode": "sideways"}, json=plain), 400)


async def test_validate_a_stored_resource_and_mode_delete(client: httpx.AsyncClient) -> None:
    created = await client.post("/fhir/Patient", json=ukcore_patient(), headers={"Content-Type": FHIR_JSON})
    assert created.status_code == 201
    pid = created.json()["id"]
    assert errors(await issues_of(await client.get(f"/fhir/Patient/{pid}/$validate"))) == []
    stored = await client.get(f"/fhir/Patient/{pid}/$validate", params={"profile": "https://nowhere.example/x"})
    assert any("nowhere" in issue["diagnostics"] for issue in errors(await issues_of(stored)))
    deletable = await client.post(f"/fhir/Patient/{pid}/$validate", params={"mode": "delete"})
    assert errors(await issues_of(deletable)) == []
    outcome_issues(await client.post("/fhir/Patient/nobody/$validate", params={"mode": "delete"}), 404)


@pytest.mark.parametrize(("mode", "status"), [("enforce", 422), ("warn", 201), ("off", 201)])
async def test_writes_and_declared_profiles(mode: Any, status: int) -> None:
    store = SQLiteStore(":memory:")
    app: FastAPI = create_app(store, profiles=mode)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(
                "/fhir/Patient", json=ukcore_patient("99"), headers={"Content-Type": FHIR_JSON}
            )
            assert response.status_code == status, response.text
            # R4 errors are rejected whatever the mode.
            broken = await client.post(
                "/fhir/Patient", json=ukcore_patient(gender="x"), headers={"Content-Type": FHIR_JSON}
            )
            assert broken.status_code == 422
    finally:
        await store.close()
