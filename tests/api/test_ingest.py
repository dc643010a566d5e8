"""``POST /fhir/$ingest?mapping=NAME``: map, validate and store source records, one transaction each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter.mapping.ids import deterministic_id, identity
from adapter.search.query import parse_search
from adapter.store import Conflict, SQLiteStore
from tests.api.conftest import FHIR_JSON, patient

pytestmark = pytest.mark.anyio

CASES = Path(__file__).resolve().parents[2] / "mappings" / "sp-referral" / "cases"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


async def _ingest(client: httpx.AsyncClient, body: bytes, media: str = "text/csv", **params: str) -> httpx.Response:
    return await client.post(
        "/fhir/$ingest", params={"mapping": "sp-referral", **params}, content=body, headers={"Content-Type": media}
    )


async def _count(store: SQLiteStore, type: str, **criteria: str) -> int:
    result = await store.search(parse_search(type, [*criteria.items(), ("_count", "100")]))
    return result.total


async def test_ingest_stores_every_resource_of_a_record(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    response = await _ingest(client, (CASES / "basic" / "input.csv").read_bytes())
    assert response.status_code == 200, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "1 records, 1 stored, 0 rejected; 8 resources created" in outcome["issue"][0]["diagnostics"]
    patient_id = deterministic_id("Patient", identity(NHS, "9990000018"))
    stored = await store.read("Patient", patient_id)
    assert stored["name"][0]["family"] == "Carmody"
    referral = (await store.search(parse_search("ServiceRequest", [("subject", f"Patient/{patient_id}")]))).resources
    assert len(referral) == 1
    assert referral[0]["requester"]["reference"].startswith("PractitionerRole/")
    task = (await store.search(parse_search("Task", [("focus", f"ServiceRequest/{referral[0]['id']}")]))).resources
    assert len(task) == 1 and task[0]["for"]["reference"] == f"Patient/{patient_id}"
    provenance = (await store.search(parse_search("Provenance", [("target", f"Patient/{patient_id}")]))).resources
    assert len(provenance) == 1


async def test_ingesting_the_same_records_again_changes_nothing(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    body = (CASES / "awkward" / "input.csv").read_bytes()
    first = await _ingest(client, body)
    history = await store.history()
    second = await _ingest(client, body)
    assert first.status_code == second.status_code == 200
    assert "0 resources created" in second.json()["issue"][0]["diagnostics"]
    assert len(await store.history()) == len(history)
    # A person referred twice is one Patient; a duplicated row is one referral.
    assert await _count(store, "Patient", identifier=f"{NHS}|9990000026") == 1
    assert await _count(store, "ServiceRequest") == 3


async def test_rejected_records_are_listed_with_their_field(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    response = await _ingest(client, (CASES / "awkward" / "input.csv").read_bytes())
    issues = response.json()["issue"]
    errors = {issue["expression"][0]: issue["diagnostics"] for issue in issues if issue["severity"] == "error"}
    assert set(errors) == {"record[5].nhs_number", "record[6].birth_date", "record[7].reasons"}
    assert "Modulus 11" in errors["record[5].nhs_number"]
    unused = [issue for issue in issues if issue["expression"] == ["record.Shoe size"]]
    assert unused and "not used" in unused[0]["diagnostics"]
    assert await _count(store, "Patient", identifier=f"{NHS}|9990000042") == 0


async def test_a_record_the_store_refuses_leaves_nothing_of_it(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    # Two patients already share the NHS number: the conditional create of the record's Patient
    # matches both (412), so none of that record may be stored, and the other records still are.
    for _ in range(2):
        await client.post("/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON})
    rows = (CASES / "basic" / "input.csv").read_text().splitlines()
    other = rows[1].replace("REF-0001", "REF-0009").replace("999 000 0018", "9990000026")
    response = await _ingest(client, "\n".join([rows[0], rows[1], other]).encode())
    errors = [issue for issue in response.json()["issue"] if issue["severity"] == "error"]
    assert [issue["expression"] for issue in errors] == [["record[1]"]]
    assert "not stored" in errors[0]["diagnostics"]
    assert (
        await _count(store, "ServiceRequest", identifier="https://sp-fhir-adapter.org/fhir/Id/referral-id|REF-0001")
        == 0
    )
    assert await _count(store, "Consent") == 1
    assert (
        await _count(store, "ServiceRequest", identifier="https://sp-fhir-adapter.org/fhir/Id/referral-id|REF-0009")
        == 1
    )


async def test_records_are_stored_one_by_one_when_the_shared_commit_is_refused(
    client: httpx.AsyncClient, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(groups: Any) -> Any:
        raise Conflict("the store is locked by another writer")

    monkeypatch.setattr(store, "transactions", refused)
    rows = (CASES / "basic" / "input.csv").read_text().splitlines()
    other = rows[1].replace("REF-0001", "REF-0009").replace("999 000 0018", "9990000026")
    response = await _ingest(client, "\n".join([rows[0], rows[1], other]).encode())
    assert response.status_code == 200, response.text
    assert "2 records, 2 stored, 0 rejected" in response.json()["issue"][0]["diagnostics"]
    assert await _count(store, "ServiceRequest") == 2
    assert await _count(store, "Patient", identifier=f"{NHS}|9990000026") == 1


async def test_xml_and_json_sources(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    xml = await _ingest(client, (CASES / "xml" / "input.xml").read_bytes(), "application/xml")
    json = await _ingest(client, (CASES / "json" / "input.json").read_bytes(), "application/json")
    assert xml.status_code == json.status_code == 200
    assert await _count(store, "ServiceRequest") == 2


@pytest.mark.parametrize(
    ("params", "body", "expression"),
    [
        ({"mapping": "no-such-mapping"}, b"a,b\n", "mapping"),
        ({"mapping": "message-back-to-gp"}, b"{}", "mapping"),
        ({"format": "yaml"}, b"a,b\n", "format"),
        ({}, b"  ", "record"),
    ],
)
async def test_bad_requests_are_400_with_an_expression(
    client: httpx.AsyncClient, params: dict[str, str], body: bytes, expression: str
) -> None:
    response = await _ingest(client, body, **params)
    assert response.status_code == 400, response.text
    issue = response.json()["issue"][0]
    assert issue["expression"] == [expression]


async def test_a_csv_that_names_no_field_is_400(client: httpx.AsyncClient) -> None:
    response = await _ingest(client, b"colour,size\nblue,6\n")
    assert response.status_code == 400
    assert "header" in response.json()["issue"][0]["expression"][0]


async def test_a_gp_connect_record_is_ingested_as_r4(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    record = CASES.parent.parent / "gpconnect-structured" / "cases" / "full" / "input.json"
    response = await client.post(
        "/fhir/$ingest",
        params={"mapping": "gpconnect-structured"},
        content=record.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert not [issue for issue in response.json()["issue"] if issue["severity"] == "error"]
    patient_id = deterministic_id("Patient", identity(NHS, "9990000018"))
    conditions = (await store.search(parse_search("Condition", [("subject", f"Patient/{patient_id}")]))).resources
    assert len(conditions) == 2
    assert {c["clinicalStatus"]["coding"][0]["code"] for c in conditions} == {"active", "resolved"}


async def test_the_provenance_targets_what_was_stored_even_when_it_matched(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    created = await client.post(
        "/fhir/Patient",
        json=patient(identifier=[{"system": NHS, "value": "9990000018"}]),
        headers={"Content-Type": FHIR_JSON},
    )
    existing = created.json()["id"]
    await _ingest(client, (CASES / "basic" / "input.csv").read_bytes())
    [provenance] = (await store.search(parse_search("Provenance", []))).resources
    targets = {target["reference"] for target in provenance["target"]}
    assert f"Patient/{existing}" in targets
    for reference in targets:
        type, id = reference.split("/")
        await store.read(type, id)  # every target exists


async def test_a_source_unreadable_half_way_stores_nothing(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    # More records than are mapped and stored at a time before the broken line.
    rows = [
        f'{{"assessment_id": "A{n}", "nhs_number": "9990000018", "tool": "PAM", "date": "17/01/2024", "total": "2"}}'
        for n in range(100)
    ]
    response = await client.post(
        "/fhir/$ingest",
        params={"mapping": "sp-outcomes"},
        content="\n".join([*rows, '{"assessment_id": "broken']).encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["expression"] == ["record[101]"]
    assert await _count(store, "Observation") == 0
    good = await client.post(
        "/fhir/$ingest",
        params={"mapping": "sp-outcomes"},
        content="\n".join(rows).encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert good.status_code == 200 and await _count(store, "Observation") == 100


async def test_rejections_beyond_the_listed_ones_are_counted(
    client: httpx.AsyncClient, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setattr(sys.modules["adapter.mapping.run"], "MAX_REJECTIONS", 2)
    rows = (CASES / "awkward" / "input.csv").read_bytes()  # 3 bad rows
    issues = (await _ingest(client, rows)).json()["issue"]
    errors = [issue["diagnostics"] for issue in issues if issue["severity"] == "error"]
    assert len(errors) == 3 and errors[-1] == "1 more rejected records are not listed"
