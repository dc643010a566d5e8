"""Each RESTful interaction: status codes, headers and bodies (https://hl7.org/fhir/R4/http.html)."""

from __future__ import annotations

from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from adapter.fhir import json_format, xml_format
from adapter.validation.structure import StructuralValidator
from tests.api.conftest import FHIR_JSON, FHIR_XML, patient

pytestmark = pytest.mark.anyio


def as_json(resource: dict[str, Any]) -> bytes:
    return json_format.dumps(resource)


async def create(client: httpx.AsyncClient, resource: dict[str, Any]) -> httpx.Response:
    response = await client.post(
        f"/fhir/{resource['resourceType']}", content=as_json(resource), headers={"Content-Type": FHIR_JSON}
    )
    assert response.status_code == 201, response.text
    return response


def errors(resource: dict[str, Any]) -> list[str]:
    return [issue.diagnostics for issue in StructuralValidator().validate(resource) if issue.is_error]


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in resource.items() if key not in ("id", "meta")}


async def test_create_answers_201_with_location_etag_and_last_modified(client: httpx.AsyncClient) -> None:
    response = await create(client, patient(id="ignored-by-create"))
    body = response.json()
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert body["id"] != "ignored-by-create"
    assert body["meta"]["versionId"] == "1"
    assert response.headers["location"] == f"http://test/fhir/Patient/{body['id']}/_history/1"
    assert response.headers["etag"] == 'W/"1"'
    last_modified = parsedate_to_datetime(response.headers["last-modified"])
    last_updated = datetime.fromisoformat(body["meta"]["lastUpdated"])
    assert last_modified == last_updated.replace(microsecond=0)
    assert without_meta(body) == without_meta(patient())


async def test_read_returns_the_stored_resource_with_its_version_headers(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    response = await client.get(f"/fhir/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["etag"] == 'W/"1"'
    assert "last-modified" in response.headers


async def test_a_decimal_keeps_its_written_form_through_create_and_read(client: httpx.AsyncClient) -> None:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Wellbeing score"},
        "valueQuantity": {"value": json_format.loads("0.40"), "unit": "score"},
    }
    created = await create(client, observation)
    assert b'"value":0.40' in created.content
    read = await client.get(f"/fhir/Observation/{created.json()['id']}")
    assert b'"value":0.40' in read.content


async def test_update_makes_a_new_version_and_vread_keeps_the_old_one(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    changed = {**created, "gender": "female"}
    response = await client.put(
        f"/fhir/Patient/{created['id']}", content=as_json(changed), headers={"Content-Type": FHIR_JSON}
    )
    assert response.status_code == 200
    assert response.json()["meta"]["versionId"] == "2"
    assert response.json()["gender"] == "female"
    assert response.headers["etag"] == 'W/"2"'
    assert response.headers["location"].endswith(f"/Patient/{created['id']}/_history/2")

    first = await client.get(f"/fhir/Patient/{created['id']}/_history/1")
    assert first.status_code == 200
    assert first.json()["gender"] == "unknown"
    assert first.headers["etag"] == 'W/"1"'
    assert (await client.get(f"/fhir/Patient/{created['id']}")).json()["gender"] == "female"


async def test_update_with_a_new_client_id_creates_the_resource(client: httpx.AsyncClient) -> None:
    response = await client.put(
        "/fhir/Patient/sp-9990000018", content=as_json(patient(id="sp-9990000018")), headers={"Content-Type": FHIR_JSON}
    )
    assert response.status_code == 201
    assert response.json()["id"] == "sp-9990000018"
    assert response.headers["location"] == "http://test/fhir/Patient/sp-9990000018/_history/1"
    assert (await client.get("/fhir/Patient/sp-9990000018")).status_code == 200


async def test_update_with_the_current_if_match_succeeds(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    response = await client.put(
        f"/fhir/Patient/{created['id']}",
        content=as_json({**created, "active": True}),
        headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"1"'},
    )
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"'


async def test_delete_answers_204_and_then_read_is_gone(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    response = await client.delete(f"/fhir/Patient/{created['id']}")
    assert response.status_code == 204
    assert response.content == b""
    read = await client.get(f"/fhir/Patient/{created['id']}")
    assert read.status_code == 410
    assert read.json()["issue"][0]["code"] == "deleted"
    # The version before the delete can still be read.
    assert (await client.get(f"/fhir/Patient/{created['id']}/_history/1")).status_code == 200


async def test_instance_history_lists_every_version_newest_first(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    url = f"/fhir/Patient/{created['id']}"
    await client.put(url, content=as_json({**created, "active": True}), headers={"Content-Type": FHIR_JSON})
    await client.delete(url)

    response = await client.get(f"{url}/_history")
    assert response.status_code == 200
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "history"
    assert bundle["total"] == 3
    entries = bundle["entry"]
    assert [entry["request"]["method"] for entry in entries] == ["DELETE", "PUT", "POST"]
    assert [entry["response"]["etag"] for entry in entries] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert [entry["response"]["status"][:3] for entry in entries] == ["204", "200", "201"]
    assert "resource" not in entries[0]
    assert entries[1]["resource"]["active"] is True
    assert entries[2]["resource"] == created
    assert all(entry["fullUrl"] == f"http://test{url}" for entry in entries)
    assert errors(bundle) == []


async def test_type_and_system_history(client: httpx.AsyncClient) -> None:
    first = (await create(client, patient())).json()
    practitioner = (await create(client, {"resourceType": "Practitioner", "name": [{"family": "Link"}]})).json()

    by_type = (await client.get("/fhir/Patient/_history")).json()
    assert [entry["resource"]["id"] for entry in by_type["entry"]] == [first["id"]]

    system = (await client.get("/fhir/_history")).json()
    assert [entry["resource"]["id"] for entry in system["entry"]] == [practitioner["id"], first["id"]]
    assert errors(system) == []

    limited = (await client.get("/fhir/_history", params={"_count": "1"})).json()
    assert [entry["resource"]["id"] for entry in limited["entry"]] == [practitioner["id"]]


async def test_history_since_keeps_later_versions_only(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    later = (await client.get("/fhir/_history", params={"_since": "2999-01-01T00:00:00Z"})).json()
    assert later["total"] == 0
    assert "entry" not in later
    earlier = (await client.get("/fhir/_history", params={"_since": "2000-01-01T00:00:00+00:00"})).json()
    assert [entry["resource"]["id"] for entry in earlier["entry"]] == [created["id"]]


async def test_history_of_an_empty_type_is_an_empty_bundle(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Observation/_history")
    assert response.status_code == 200
    assert response.json()["total"] == 0


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [("return=minimal", None), ("return=OperationOutcome", "OperationOutcome"), ("return=representation", "Patient")],
)
async def test_prefer_return_chooses_the_body_of_create_and_update(
    client: httpx.AsyncClient, prefer: str, expected: str | None
) -> None:
    headers = {"Content-Type": FHIR_JSON, "Prefer": prefer}
    created = await client.post("/fhir/Patient", content=as_json(patient()), headers=headers)
    updated = await client.put("/fhir/Patient/sp-prefer", content=as_json(patient(id="sp-prefer")), headers=headers)
    for response in (created, updated):
        assert response.status_code == 201
        assert response.headers["etag"] == 'W/"1"'
        assert "location" in response.headers
        if expected is None:
            assert response.content == b""
        else:
            assert response.json()["resourceType"] == expected


async def test_a_patient_posted_as_xml_reads_back_as_the_same_json(client: httpx.AsyncClient) -> None:
    source = patient(active=True)
    response = await client.post(
        "/fhir/Patient", content=xml_format.dumps(source), headers={"Content-Type": FHIR_XML, "Accept": FHIR_XML}
    )
    assert response.status_code == 201
    assert response.headers["content-type"].startswith(FHIR_XML)
    id = xml_format.loads(response.content)["id"]
    read = await client.get(f"/fhir/Patient/{id}", headers={"Accept": FHIR_JSON})
    assert read.headers["content-type"].startswith(FHIR_JSON)
    assert without_meta(read.json()) == source


@pytest.mark.parametrize("content_type", ["application/json", "application/fhir+json; charset=utf-8"])
async def test_json_bodies_under_either_json_media_type(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post("/fhir/Patient", content=as_json(patient()), headers={"Content-Type": content_type})
    assert response.status_code == 201


async def test_xml_body_as_application_xml(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/fhir/Patient", content=xml_format.dumps(patient()), headers={"Content-Type": "application/xml"}
    )
    assert response.status_code == 201
    assert response.json()["identifier"][0]["value"] == "9990000018"


@pytest.mark.parametrize(
    ("query", "accept", "media_type"),
    [
        ({}, None, FHIR_JSON),
        ({}, "*/*", FHIR_JSON),
        ({}, "application/xml", FHIR_XML),
        ({}, "text/html;q=0.9, application/fhir+xml;q=0.8, application/fhir+json;q=0.5", FHIR_XML),
        ({}, "application/fhir+json;q=0, application/*;q=0.1", FHIR_JSON),
        ({"_format": "xml"}, FHIR_JSON, FHIR_XML),
        ({"_format": "application/fhir+xml"}, None, FHIR_XML),
        ({"_format": "json"}, FHIR_XML, FHIR_JSON),
        ({"_format": "application/fhir+json"}, FHIR_XML, FHIR_JSON),
    ],
)
async def test_the_response_format_follows_format_then_accept(
    client: httpx.AsyncClient, query: dict[str, str], accept: str | None, media_type: str
) -> None:
    created = (await create(client, patient())).json()
    headers = {"Accept": accept} if accept else {}
    response = await client.get(f"/fhir/Patient/{created['id']}", params=query, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    codec = json_format if media_type == FHIR_JSON else xml_format
    assert codec.loads(response.content) == json_format.loads(as_json(created))


async def test_an_unencoded_plus_in_format_still_means_fhir_xml(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    response = await client.get(f"/fhir/Patient/{created['id']}?_format=application/fhir+xml")
    assert response.headers["content-type"].startswith(FHIR_XML)
