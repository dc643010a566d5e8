"""Search over HTTP: the searchset Bundle, paging links, POST _search, handling, result parameters,
conditional create and update, JSON Patch and HEAD."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from adapter.fhir import xml_format
from tests.api.conftest import FHIR_JSON, FHIR_XML, outcome_issues, patient

pytestmark = pytest.mark.anyio

NHS = "https://fhir.nhs.uk/Id/nhs-number"
JSON_HEADERS = {"Content-Type": FHIR_JSON}


async def post(client: httpx.AsyncClient, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return await client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=JSON_HEADERS | headers)


async def made(client: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = await post(client, resource)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def referral(patient_id: str, authored: str = "2026-11-01") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored,
    }


def nhs_patient(number: str, family: str = "Testpatient") -> dict[str, Any]:
    return patient(identifier=[{"system": NHS, "value": number}], name=[{"family": family}])


async def searchset(client: httpx.AsyncClient, url: str, **params: str) -> dict[str, Any]:
    response = await client.get(url, params=params or None)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def matches(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


async def test_search_by_nhs_number_chain_returns_a_searchset(client: httpx.AsyncClient) -> None:
    person = await made(client, nhs_patient("9990000018"))
    other = await made(client, nhs_patient("9990000026"))
    mine = [await made(client, referral(person["id"])) for _ in range(2)]
    await made(client, referral(other["id"]))
    bundle = await searchset(client, "/fhir/ServiceRequest", **{"patient.identifier": f"{NHS}|9990000018"})
    assert bundle["total"] == 2
    assert sorted(matches(bundle)) == sorted(r["id"] for r in mine)
    assert bundle["link"][0]["relation"] == "self" and "patient.identifier" in bundle["link"][0]["url"]
    assert bundle["entry"][0]["fullUrl"] == f"http://test/fhir/ServiceRequest/{bundle['entry'][0]['resource']['id']}"

    as_xml = await client.get(
        "/fhir/ServiceRequest", params={"subject:Patient.identifier": "9990000018"}, headers={"Accept": FHIR_XML}
    )
    assert as_xml.headers["content-type"].startswith(FHIR_XML)
    assert sorted(matches(xml_format.loads(as_xml.content))) == sorted(r["id"] for r in mine)


async def test_following_next_links_visits_every_match_once(client: httpx.AsyncClient) -> None:
    created = [await made(client, patient(birthDate=f"19{n:02d}-01-01")) for n in range(7)]
    seen: list[str] = []
    page = await searchset(client, "/fhir/Patient", _count="3", _sort="birthdate")
    assert page["total"] == 7
    relations = {link["relation"] for link in page["link"]}
    assert relations == {"self", "first", "next"}
    while True:
        seen += matches(page)
        nexts = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nexts:
            break
        assert nexts[0].startswith("http://test/fhir?_getpages=")
        await made(client, patient(birthDate="1900-01-01"))  # data changes between pages
        page = await searchset(client, nexts[0].removeprefix("http://test"))
        assert "previous" in {link["relation"] for link in page["link"]}
    assert seen == [p["id"] for p in created]
    expired = await client.get("/fhir", params={"_getpages": "nope", "_getpagesoffset": "3"})
    outcome_issues(expired, 410)


async def test_post_search_takes_a_form_body(client: httpx.AsyncClient) -> None:
    person = await made(client, nhs_patient("9990000018", "Ward"))
    await made(client, nhs_patient("9990000026", "Smith"))
    response = await client.post(
        "/fhir/Patient/_search",
        content=b"family=wa&identifier=9990000018",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert matches(response.json()) == [person["id"]]
    refused = await client.post("/fhir/Patient/_search", json={"family": "wa"})
    outcome_issues(refused, 415)


async def test_unknown_parameters_are_errors_when_strict_and_reported_when_lenient(client: httpx.AsyncClient) -> None:
    await made(client, patient())
    strict = await client.get("/fhir/Patient", params={"nickname": "x"}, headers={"Prefer": "handling=strict"})
    [issue] = outcome_issues(strict, 400)
    assert issue["expression"] == ["nickname"] and "nickname" in issue["diagnostics"]
    lenient = await searchset(client, "/fhir/Patient", nickname="x")
    assert lenient["total"] == 1  # ignored, so not a filter
    [outcome] = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome["resource"]["resourceType"] == "OperationOutcome"
    assert "nickname" in outcome["resource"]["issue"][0]["diagnostics"]


async def test_elements_summary_count_include_and_revinclude(client: httpx.AsyncClient) -> None:
    person = await made(client, nhs_patient("9990000018"))
    request = await made(client, referral(person["id"]))
    subset = await searchset(client, "/fhir/Patient", _elements="gender")
    resource = subset["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "gender"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in resource[
        "meta"
    ]["tag"]
    counted = await searchset(client, "/fhir/ServiceRequest", _summary="count")
    assert counted["total"] == 1 and "entry" not in counted
    included = await searchset(client, "/fhir/ServiceRequest", _include="ServiceRequest:patient")
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in included["entry"]] == [
        (request["id"], "match"),
        (person["id"], "include"),
    ]
    reverse = await searchset(client, "/fhir/Patient", _id=person["id"], _revinclude="ServiceRequest:subject")
    assert [e["search"]["mode"] for e in reverse["entry"]] == ["match", "include"]


async def test_bad_search_input_gets_a_clear_outcome_and_changes_nothing(client: httpx.AsyncClient) -> None:
    await made(client, nhs_patient("9990000018", "Ward"))
    for value in ("' OR 1=1 --", "%", "_", "x'); DROP TABLE resources; --"):
        assert (await searchset(client, "/fhir/Patient", family=value))["total"] == 0
    big = await searchset(client, "/fhir/Patient", _count="10000000")
    assert big["total"] == 1
    [outcome] = [e["resource"] for e in big["entry"] if e["search"]["mode"] == "outcome"]
    assert "10000000" in outcome["issue"][0]["diagnostics"]
    [issue] = outcome_issues(await client.get("/fhir/Patient", params={"birthdate": "soon"}), 400)
    assert issue["expression"] == ["birthdate"]
    outcome_issues(await client.get("/fhir/Patient", params={"_count": "lots"}), 400)
    outcome_issues(await client.get("/fhir/Spaceship", params={"name": "x"}), 404)
    assert (await searchset(client, "/fhir/Patient"))["total"] == 1


async def test_conditional_create_returns_the_existing_resource(client: httpx.AsyncClient) -> None:
    condition = f"identifier={NHS}|9990000018"
    first = await post(client, nhs_patient("9990000018"), **{"If-None-Exist": condition})
    second = await post(client, nhs_patient("9990000018", "Other"), **{"If-None-Exist": condition})
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"] and second.json()["name"] == first.json()["name"]
    await made(client, nhs_patient("9990000026"))
    several = await post(client, nhs_patient("9990000034"), **{"If-None-Exist": f"identifier={NHS}|"})
    outcome_issues(several, 412)
    [issue] = outcome_issues(await post(client, nhs_patient("9990000034"), **{"If-None-Exist": "nickname=x"}), 400)
    assert issue["expression"] == ["If-None-Exist"]
    assert (await searchset(client, "/fhir/Patient"))["total"] == 2


async def test_conditional_update_creates_then_updates_the_match(client: httpx.AsyncClient) -> None:
    url = f"/fhir/Patient?identifier={NHS}|9990000018"
    created = await client.put(url, json=nhs_patient("9990000018", "First"), headers=JSON_HEADERS)
    updated = await client.put(url, json=nhs_patient("9990000018", "Second"), headers=JSON_HEADERS)
    assert (created.status_code, updated.status_code) == (201, 200)
    assert updated.json()["id"] == created.json()["id"] and updated.json()["meta"]["versionId"] == "2"
    outcome_issues(await client.put("/fhir/Patient", json=nhs_patient("9990000018"), headers=JSON_HEADERS), 400)


async def test_json_patch(client: httpx.AsyncClient) -> None:
    person = await made(client, patient())
    url = f"/fhir/Patient/{person['id']}"
    headers = {"Content-Type": "application/json-patch+json"}
    ops = [
        {"op": "test", "path": "/gender", "value": "unknown"},
        {"op": "replace", "path": "/gender", "value": "female"},
    ]
    patched = await client.patch(url, json=ops, headers=headers)
    assert patched.status_code == 200 and patched.json()["gender"] == "female"
    assert patched.json()["meta"]["versionId"] == "2" and patched.headers["etag"] == 'W/"2"'
    [issue] = outcome_issues(await client.patch(url, json=ops, headers=headers), 422)  # the test op fails now
    assert issue["expression"] == ["Patient.gender"]
    invalid = [{"op": "replace", "path": "/gender", "value": "sometimes"}]
    issues = outcome_issues(await client.patch(url, json=invalid, headers=headers), 422)
    assert any("Patient.gender" in i.get("expression", []) for i in issues)
    missing = [{"op": "replace", "path": "/name/5/family", "value": "x"}]
    [issue] = outcome_issues(await client.patch(url, json=missing, headers=headers), 422)
    assert issue["expression"] == ["Patient.name[5].family"]
    outcome_issues(await client.patch(url, json={"op": "add"}, headers=headers), 400)
    outcome_issues(await client.patch(url, json=[{"path": "/x"}], headers=headers), 400)
    outcome_issues(await client.patch(url, json=ops, headers=JSON_HEADERS), 415)
    stale = await client.patch(url, json=[{"op": "remove", "path": "/gender"}], headers=headers | {"If-Match": 'W/"1"'})
    outcome_issues(stale, 412)
    outcome_issues(await client.patch("/fhir/Patient/nobody", json=ops, headers=headers), 404)
    assert (await client.get(url)).json()["meta"]["versionId"] == "2"  # nothing after the good patch changed it


async def test_head_answers_the_read_headers_without_a_body(client: httpx.AsyncClient) -> None:
    person = await made(client, patient())
    read = await client.get(f"/fhir/Patient/{person['id']}")
    head = await client.head(f"/fhir/Patient/{person['id']}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == read.headers["etag"] == 'W/"1"'
    assert head.headers["content-length"] == str(len(read.content))
    assert (await client.head("/fhir/Patient/nobody")).status_code == 404
