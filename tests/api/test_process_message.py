"""``POST /fhir/$process-message``: BaRS referral messages (issue #5), over an in-memory SQLite store.

The messages are built from ``profiles/examples/Bundle-sp-referral-message-1.json`` (synthetic data:
NHS numbers 9990000018 and 9990000026). The BaRS 1.4.0 request examples are in
``tests/data/bars-1.4.0/process_message``.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapter.api import create_app
from adapter.api.process_message import message_definition
from adapter.fhir import json_format, xml_format
from adapter.mapping.ids import deterministic_id, identity
from adapter.search.query import parse_search
from adapter.store import OperationResult, Resource, ResourceStore, SQLiteStore
from adapter.validation.bundled import bundled_packages, profiles_dir
from adapter.validation.profiles import ProfileValidator
from adapter.validation.structure import StructuralValidator
from tests.api.conftest import FHIR_JSON, FHIR_XML, outcome_issues, patient

# PostgreSQL fixtures, imported so that pytest finds them (the "as" form marks a re-export).
from tests.store.conftest import postgres_dsn as postgres_dsn
from tests.store.conftest import postgres_server as postgres_server

pytestmark = pytest.mark.anyio

HTTP_ERROR_CODES = "https://fhir.nhs.uk/CodeSystem/http-error-codes"
EVENTS = "https://fhir.nhs.uk/CodeSystem/message-events-bars"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
REFERRAL_SYSTEM = "https://example.org/millbrook-medical-practice/referral-id"
EXAMPLE: Resource = json_format.loads((profiles_dir() / "examples" / "Bundle-sp-referral-message-1.json").read_bytes())
BARS_EXAMPLES = Path(__file__).parent.parent / "data" / "bars-1.4.0" / "process_message"


@pytest.fixture(scope="module")
def profile_validator() -> ProfileValidator:
    return ProfileValidator(bundled_packages())


@pytest.fixture
def app(store: SQLiteStore, profile_validator: ProfileValidator) -> FastAPI:
    # The BaRS examples are up to 35 kB.
    return create_app(store, profile_validator=profile_validator, max_body_bytes=200_000)


def resource_of(bundle: Resource, type: str) -> Resource:
    found: Resource = next(entry["resource"] for entry in bundle["entry"] if entry["resource"]["resourceType"] == type)
    return found


def message(
    *,
    reason: str = "new",
    status: str = "active",
    referral: str = "REF-2024-0001",
    nhs_number: str = "9990000018",
    note: str | None = None,
) -> Resource:
    """A referral message: the example with a new Bundle.id and the given reason, referral status,
    referral id and NHS number."""
    bundle = copy.deepcopy(EXAMPLE)
    bundle["id"] = str(uuid.uuid4())
    resource_of(bundle, "MessageHeader")["reason"]["coding"][0]["code"] = reason
    service_request = resource_of(bundle, "ServiceRequest")
    service_request["status"] = status
    service_request["identifier"][0]["value"] = referral
    if note is not None:
        service_request["note"] = [{"text": note}]
    resource_of(bundle, "Patient")["identifier"][0]["value"] = nhs_number
    return bundle


async def post(
    client: httpx.AsyncClient,
    body: Resource,
    *,
    request_id: str | None = None,
    correlation_id: str = "correlation-1",
    xml: bool = False,
) -> httpx.Response:
    headers = {
        "Content-Type": FHIR_XML if xml else FHIR_JSON,
        "Accept": FHIR_XML if xml else FHIR_JSON,
        "X-Request-Id": request_id or str(uuid.uuid4()),
        "X-Correlation-Id": correlation_id,
    }
    content = xml_format.dumps(body) if xml else json_format.dumps(body)
    return await client.post("/fhir/$process-message", content=content, headers=headers)


async def stored(store: SQLiteStore, type: str, *pairs: tuple[str, str]) -> list[Resource]:
    result = await store.search(parse_search(type, [*pairs, ("_count", "100")]))
    return result.resources


COUNTED = (
    "ServiceRequest",
    "Task",
    "Encounter",
    "Patient",
    "Consent",
    "Organization",
    "Practitioner",
    "HealthcareService",
    "AuditEvent",
    "MessageHeader",
)


async def counts(store: SQLiteStore) -> dict[str, int]:
    """How many resources of each type a message may write are stored."""
    return {type: len(await stored(store, type)) for type in COUNTED}


def bars_issues(response: httpx.Response, status: int, error_code: str) -> list[dict[str, Any]]:
    """The issues of a BaRS error answer: each with the error code and an expression; ids echoed."""
    issues = outcome_issues(response, status)
    for issue in issues:
        assert issue["details"] == {"coding": [{"system": HTTP_ERROR_CODES, "code": error_code}]}, issue
        assert issue["expression"], issue
    assert response.headers["X-Correlation-Id"] == "correlation-1"
    assert response.headers["X-Request-Id"]
    return issues


def errors(issues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [issue for issue in issues if issue["severity"] in ("error", "fatal")]


def answer_of(response: httpx.Response) -> Resource:
    assert response.status_code == 200, response.text
    body: Resource = response.json()
    return body


# --------------------------------------------------------------------------------------------
# A new referral
# --------------------------------------------------------------------------------------------


async def test_a_new_referral_stores_the_referral_its_task_a_planned_encounter_and_the_message(
    client: httpx.AsyncClient, store: SQLiteStore, profile_validator: ProfileValidator
) -> None:
    answer_of(await post(client, message()))

    [referral] = await stored(store, "ServiceRequest", ("identifier", f"{REFERRAL_SYSTEM}|REF-2024-0001"))
    [patient] = await stored(store, "Patient", ("identifier", f"{NHS}|9990000018"))
    assert referral["status"] == "active"
    assert referral["subject"]["reference"] == f"Patient/{patient['id']}"
    # The id the mappings give this referral: the same referral from an export is the same resource.
    assert referral["id"] == deterministic_id("ServiceRequest", identity(REFERRAL_SYSTEM, "REF-2024-0001"))
    [task] = await stored(store, "Task", ("focus", f"ServiceRequest/{referral['id']}"))
    assert (task["status"], task["intent"]) == ("requested", "order")
    assert task["for"]["reference"] == f"Patient/{patient['id']}"
    assert task["identifier"] == referral["identifier"]
    assert task["businessStatus"]["coding"][0]["code"] == "received"
    [encounter] = await stored(store, "Encounter", ("based-on", f"ServiceRequest/{referral['id']}"))
    assert encounter["status"] == "planned" and encounter["class"]["code"] == "AMB"
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    [consent] = await stored(store, "Consent")
    assert referral["supportingInfo"] == [{"reference": f"Consent/{consent['id']}"}]
    assert await counts(store) == {
        "ServiceRequest": 1,
        "Task": 1,
        "Encounter": 1,
        "Patient": 1,
        "Consent": 1,
        "Organization": 3,
        "Practitioner": 1,
        "HealthcareService": 1,
        "AuditEvent": 1,
        "MessageHeader": 1,
    }
    # What the adapter writes meets the profiles it claims (SP-ReferralStatus, UK Core Encounter).
    for resource in (task, encounter):
        assert errors([issue.to_fhir() for issue in profile_validator.validate(resource)]) == []


async def test_the_records_of_a_processed_message_are_valid_and_point_at_what_was_stored(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    body = message()
    answer_of(await post(client, body, request_id="request-1"))
    [referral] = await stored(store, "ServiceRequest")
    [header] = await stored(store, "MessageHeader")
    assert header["focus"] == [{"reference": f"ServiceRequest/{referral['id']}"}]
    assert header["source"]["endpoint"] == "https://fhir.nhs.uk/Id/ods-organization-code|A12345"
    [audit] = await stored(store, "AuditEvent")
    assert audit["entity"][0]["what"] == {"reference": f"MessageHeader/{header['id']}"}
    assert audit["entity"][0]["detail"] == [
        {"type": "X-Request-Id", "valueString": "request-1"},
        {"type": "X-Correlation-Id", "valueString": "correlation-1"},
    ]
    written = {entity["what"]["reference"] for entity in audit["entity"][1:]}
    assert f"ServiceRequest/{referral['id']}" in written and len(written) == 10
    assert all(not reference.startswith("urn:uuid:") for reference in written)
    for record in (header, audit):
        assert errors([issue.to_fhir() for issue in StructuralValidator().validate(record)]) == []


async def test_the_answer_is_a_response_message_that_focuses_the_task(client: httpx.AsyncClient) -> None:
    body = message()
    response = await post(client, body, request_id="request-7", correlation_id="correlation-1")
    answer = answer_of(response)
    assert response.headers["X-Request-Id"] == "request-7"
    assert response.headers["X-Correlation-Id"] == "correlation-1"
    assert answer["resourceType"] == "Bundle" and answer["type"] == "message"
    assert answer["id"] != body["id"] and answer["timestamp"]
    header = answer["entry"][0]["resource"]
    request_header = resource_of(body, "MessageHeader")
    assert header["resourceType"] == "MessageHeader"
    assert header["response"] == {"identifier": body["id"], "code": "ok"}
    assert header["eventCoding"] == {"system": EVENTS, "code": "servicerequest-request"}
    # Source and destination swapped.
    assert header["destination"][0]["endpoint"] == request_header["source"]["endpoint"]
    assert header["source"]["endpoint"] == request_header["destination"][0]["endpoint"]
    types = [entry["resource"]["resourceType"] for entry in answer["entry"]]
    assert types[:4] == ["MessageHeader", "Task", "Encounter", "ServiceRequest"]
    task = answer["entry"][1]["resource"]
    assert header["focus"] == [{"reference": f"Task/{task['id']}"}]
    assert answer["entry"][1]["fullUrl"] == f"http://test/fhir/Task/{task['id']}"
    assert answer["entry"][2]["resource"]["status"] == "planned"
    assert errors([issue.to_fhir() for issue in StructuralValidator().validate(answer)]) == []


async def test_the_same_patient_and_practice_in_two_referrals_are_stored_once(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    answer_of(await post(client, message(referral="REF-1")))
    answer_of(await post(client, message(referral="REF-2")))
    answer_of(await post(client, message(referral="REF-3", nhs_number="9990000026")))
    found = await counts(store)
    assert (found["ServiceRequest"], found["Task"], found["Encounter"]) == (3, 3, 3)
    assert found["Patient"] == 2
    assert (
        len(await stored(store, "Organization", ("identifier", "https://fhir.nhs.uk/Id/ods-organization-code|A12345")))
        == 1
    )
    assert found["Practitioner"] == 1
    # Entries without a business identifier are kept as each message sent them.
    assert (found["Consent"], found["HealthcareService"]) == (3, 3)


async def test_a_new_referral_whose_identifier_is_taken_is_a_conflict(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    answer_of(await post(client, message()))
    issues = bars_issues(await post(client, message()), 409, "REC_CONFLICT")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [
        ("conflict", ["Bundle.entry[1].resource.identifier"])
    ]
    assert "reason update" in issues[0]["diagnostics"]
    assert (await counts(store))["ServiceRequest"] == 1


async def test_a_message_using_the_retired_nhs_number_verification_codes_is_accepted_and_mapped(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    body = message()
    coding = resource_of(body, "Patient")["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]
    coding.update(
        {
            "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatus",
            "code": "number-present-and-verified",
        }
    )
    answer_of(await post(client, body))
    [stored_patient] = await stored(store, "Patient")
    assert stored_patient["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"] == [
        {
            "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland",
            "code": "01",
            "display": "Number present and verified",
        }
    ]


async def test_an_xml_message_is_processed_and_answered_in_xml(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    body = message()
    response = await post(client, body, xml=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_XML)
    answer = xml_format.loads(response.content)
    assert answer["entry"][0]["resource"]["response"] == {"identifier": body["id"], "code": "ok"}
    assert len(await stored(store, "ServiceRequest")) == 1


# --------------------------------------------------------------------------------------------
# Update and cancel
# --------------------------------------------------------------------------------------------


async def test_an_update_replaces_the_stored_referral(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    answer_of(await post(client, message()))
    [before] = await stored(store, "ServiceRequest")
    answer = answer_of(await post(client, message(reason="update", note="Now also wants help with debt.")))
    [after] = await stored(store, "ServiceRequest")
    assert after["id"] == before["id"]
    assert after["meta"]["versionId"] == "2"
    assert after["note"] == [{"text": "Now also wants help with debt."}]
    [task] = await stored(store, "Task")
    assert task["status"] == "requested" and task["meta"]["versionId"] == "1"
    assert answer["entry"][0]["resource"]["focus"] == [{"reference": f"Task/{task['id']}"}]
    found = await counts(store)
    assert (found["Task"], found["Encounter"], found["Patient"], found["MessageHeader"]) == (1, 1, 1, 2)


async def test_an_update_with_the_referral_revoked_cancels_it_while_it_is_active(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    answer_of(await post(client, message()))
    answer = answer_of(await post(client, message(reason="update", status="revoked", note="ignored")))
    [referral] = await stored(store, "ServiceRequest")
    assert referral["status"] == "revoked"
    assert "ignored" not in str(referral.get("note"))  # a cancel changes the status only
    [task] = await stored(store, "Task")
    assert task["status"] == "cancelled"
    assert task["businessStatus"]["coding"][0]["code"] == "cancelled"
    [encounter] = await stored(store, "Encounter")
    assert encounter["status"] == "cancelled"
    assert answer["entry"][0]["resource"]["focus"] == [{"reference": f"Task/{task['id']}"}]
    assert answer["entry"][1]["resource"]["status"] == "cancelled"


@pytest.mark.parametrize("status", ["revoked", "active"])
async def test_a_referral_that_is_not_active_cannot_be_updated_or_cancelled(
    client: httpx.AsyncClient, store: SQLiteStore, status: str
) -> None:
    answer_of(await post(client, message()))
    answer_of(await post(client, message(reason="update", status="entered-in-error")))
    before = await counts(store)
    issues = bars_issues(await post(client, message(reason="update", status=status)), 422, "REC_UNPROCESSABLE_ENTITY")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [
        ("business-rule", ["Bundle.entry[1].resource.status"])
    ]
    assert "entered-in-error" in issues[0]["diagnostics"]
    assert await counts(store) == before
    [referral] = await stored(store, "ServiceRequest")
    assert referral["meta"]["versionId"] == "2"


async def test_an_update_with_another_status_is_not_supported(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    answer_of(await post(client, message()))
    issues = bars_issues(
        await post(client, message(reason="update", status="on-hold")), 422, "REC_UNPROCESSABLE_ENTITY"
    )
    assert [(issue["code"], issue["expression"]) for issue in issues] == [
        ("not-supported", ["Bundle.entry[1].resource.status"])
    ]


@pytest.mark.parametrize("status", ["active", "revoked"])
async def test_updating_or_cancelling_an_unknown_referral_is_not_found(
    client: httpx.AsyncClient, store: SQLiteStore, status: str
) -> None:
    issues = bars_issues(await post(client, message(reason="update", status=status)), 404, "REC_NOT_FOUND")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [
        ("not-found", ["Bundle.entry[1].resource.identifier"])
    ]
    assert set((await counts(store)).values()) == {0}


# --------------------------------------------------------------------------------------------
# Idempotency
# --------------------------------------------------------------------------------------------


async def test_the_same_request_id_again_is_a_duplicate_and_stores_nothing(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    body = message()
    answer_of(await post(client, body, request_id="request-1"))
    before = await counts(store)
    # A retry: the same request, and the same request id with another message.
    for again in (body, message(referral="REF-9")):
        issues = bars_issues(await post(client, again, request_id="request-1"), 409, "REC_CONFLICT")
        assert [(issue["code"], issue["expression"]) for issue in issues] == [("duplicate", ["X-Request-Id"])]
    assert await counts(store) == before


async def test_the_same_message_with_another_request_id_is_a_duplicate(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    body = message()
    answer_of(await post(client, body, request_id="request-1"))
    before = await counts(store)
    issues = bars_issues(await post(client, body, request_id="request-2"), 409, "REC_CONFLICT")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [("duplicate", ["Bundle.id"])]
    assert await counts(store) == before


async def test_a_retried_cancel_is_a_duplicate_not_a_rule_violation(client: httpx.AsyncClient) -> None:
    answer_of(await post(client, message()))
    cancel = message(reason="update", status="revoked")
    answer_of(await post(client, cancel, request_id="cancel-1"))
    issues = bars_issues(await post(client, cancel, request_id="cancel-1"), 409, "REC_CONFLICT")
    assert issues[0]["code"] == "duplicate"


class _Together:
    """A store that holds each transaction until two have arrived: both messages are past every
    check (the reads of the processed-message records included) before either writes, so only the
    store can tell."""

    def __init__(self, inner: ResourceStore) -> None:
        self.inner = inner
        self.arrived = asyncio.Barrier(2)

    async def transaction(self, operations: Any) -> list[OperationResult]:
        await asyncio.wait_for(self.arrived.wait(), timeout=10)
        return await self.inner.transaction(operations)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(params=["sqlite", "postgres"])
async def together(
    request: pytest.FixtureRequest, profile_validator: ProfileValidator
) -> AsyncIterator[tuple[httpx.AsyncClient, ResourceStore]]:
    """A client over a held store: SQLite, which serialises writers, and PostgreSQL, which locks
    the fixed ids (a real server the tests start, ``tests/store/pg_server.py``)."""
    if request.param == "sqlite":
        inner: ResourceStore = SQLiteStore(":memory:")
    else:
        from adapter.store.postgres import PostgresStore

        inner = PostgresStore(request.getfixturevalue("postgres_dsn"))
    app = create_app(_Together(inner), profile_validator=profile_validator)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, inner
    finally:
        await inner.close()


@pytest.mark.parametrize("same_request_id", [True, False])
async def test_of_two_identical_messages_sent_together_exactly_one_is_processed(
    together: tuple[httpx.AsyncClient, ResourceStore], same_request_id: bool
) -> None:
    client, store = together
    body = message()
    first, second = await asyncio.gather(
        post(client, body, request_id="request-1"),
        post(client, body, request_id="request-1" if same_request_id else "request-2"),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    rejected = first if first.status_code == 409 else second
    [issue] = bars_issues(rejected, 409, "REC_CONFLICT")
    assert (issue["code"], issue["expression"]) == ("duplicate", ["X-Request-Id" if same_request_id else "Bundle.id"])
    found = await counts(store)
    assert (found["ServiceRequest"], found["Task"], found["Encounter"], found["Patient"]) == (1, 1, 1, 1)
    assert (found["AuditEvent"], found["MessageHeader"], found["Consent"]) == (1, 1, 1)


async def test_two_different_messages_creating_one_referral_together_create_it_once(
    together: tuple[httpx.AsyncClient, ResourceStore],
) -> None:
    client, store = together
    first, second = await asyncio.gather(post(client, message()), post(client, message()))
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    rejected = first if first.status_code == 409 else second
    [issue] = bars_issues(rejected, 409, "REC_CONFLICT")
    assert (issue["code"], issue["expression"]) == ("conflict", ["Bundle.entry[1].resource.identifier"])
    assert [len(await stored(store, type)) for type in ("ServiceRequest", "Task", "AuditEvent", "Consent")] == [
        1,
        1,
        1,
        1,
    ]


# --------------------------------------------------------------------------------------------
# All or nothing
# --------------------------------------------------------------------------------------------


async def test_an_entry_that_fails_in_the_store_leaves_nothing_stored_and_the_message_can_be_sent_again(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    # Two stored patients with the NHS number of the message: its conditional create matches both.
    created = [await client.post("/fhir/Patient", json=patient()) for _ in range(2)]
    assert [response.status_code for response in created] == [201, 201]
    body = message()
    issues = bars_issues(await post(client, body, request_id="request-1"), 409, "REC_CONFLICT")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [
        ("multiple-matches", ["Bundle.entry[2].resource.identifier[0]"])
    ]
    found = await counts(store)
    assert found.pop("Patient") == 2
    assert set(found.values()) == {0}
    # A rejected message is not recorded as processed: once the data is put right it goes through.
    assert (await client.delete(f"/fhir/Patient/{created[0].json()['id']}")).status_code == 204
    answer_of(await post(client, body, request_id="request-1"))
    assert len(await stored(store, "ServiceRequest")) == 1


# --------------------------------------------------------------------------------------------
# Messages that are not valid, or not for us
# --------------------------------------------------------------------------------------------


def without_consent(body: Resource) -> Resource:
    body["entry"] = [entry for entry in body["entry"] if entry["resource"]["resourceType"] != "Consent"]
    del resource_of(body, "ServiceRequest")["supportingInfo"]
    return body


def without_focus(body: Resource) -> Resource:
    del resource_of(body, "MessageHeader")["focus"]
    return body


def as_transaction(body: Resource) -> Resource:
    body["type"] = "transaction"
    return body


def header_second(body: Resource) -> Resource:
    body["entry"][0], body["entry"][1] = body["entry"][1], body["entry"][0]
    return body


def with_appointment(body: Resource) -> Resource:
    appointment = {"resourceType": "Appointment", "status": "proposed", "participant": [{"status": "needs-action"}]}
    body["entry"].append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": appointment})
    return body


def with_the_practice_twice(body: Resource) -> Resource:
    practice = next(entry for entry in body["entry"] if entry["resource"].get("name") == "Millbrook Medical Practice")
    body["entry"].append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": copy.deepcopy(practice["resource"])})
    return body


def without_referral_identifier_system(body: Resource) -> Resource:
    del resource_of(body, "ServiceRequest")["identifier"][0]["system"]
    return body


@pytest.mark.parametrize(
    ("change", "code", "expression"),
    [
        (without_consent, "required", "Bundle.entry"),
        (without_consent, "required", "Bundle.entry[1].resource.supportingInfo"),
        (without_focus, "required", "Bundle.entry[0].resource.focus"),
        (as_transaction, "invalid", "Bundle.type"),
        (header_second, "structure", "Bundle.entry[0].resource"),
        (with_appointment, "not-supported", "Bundle.entry[9]"),
        (without_referral_identifier_system, "required", "Bundle.entry[1].resource.identifier"),
        (with_the_practice_twice, "duplicate", "Bundle.entry[9].resource.identifier[0]"),
    ],
)
async def test_an_invalid_message_is_a_bad_request_that_names_what_is_wrong(
    client: httpx.AsyncClient, store: SQLiteStore, change: Any, code: str, expression: str
) -> None:
    issues = bars_issues(await post(client, change(message())), 400, "REC_BAD_REQUEST")
    assert (code, [expression]) in [(issue["code"], issue["expression"]) for issue in errors(issues)], issues
    assert set((await counts(store)).values()) == {0}


async def test_errors_are_answered_in_xml_when_asked(client: httpx.AsyncClient) -> None:
    response = await post(client, as_transaction(message()), xml=True)
    issues = outcome_issues(response, 400, FHIR_XML)
    assert (issues[0]["code"], issues[0]["expression"]) == ("invalid", ["Bundle.type"])
    assert issues[0]["details"]["coding"] == [{"system": HTTP_ERROR_CODES, "code": "REC_BAD_REQUEST"}]
    assert response.headers["X-Correlation-Id"] == "correlation-1"


async def test_a_resource_that_is_not_a_bundle_is_a_bad_request(client: httpx.AsyncClient) -> None:
    issues = bars_issues(await post(client, patient()), 400, "REC_BAD_REQUEST")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [("invalid", ["Patient"])]


async def test_a_request_without_x_request_id_is_a_bad_request(client: httpx.AsyncClient) -> None:
    headers = {"Content-Type": FHIR_JSON, "X-Correlation-Id": "correlation-1"}
    response = await client.post("/fhir/$process-message", content=json_format.dumps(message()), headers=headers)
    issues = outcome_issues(response, 400)
    assert [(issue["code"], issue["expression"]) for issue in issues] == [("required", ["X-Request-Id"])]
    assert issues[0]["details"]["coding"][0]["code"] == "REC_BAD_REQUEST"
    assert response.headers["X-Correlation-Id"] == "correlation-1"


async def test_a_body_that_is_not_fhir_is_a_bad_request_with_the_ids_echoed(client: httpx.AsyncClient) -> None:
    headers = {"Content-Type": FHIR_JSON, "X-Request-Id": "request-1", "X-Correlation-Id": "correlation-1"}
    response = await client.post("/fhir/$process-message", content=b"{not json", headers=headers)
    [issue] = bars_issues(response, 400, "REC_BAD_REQUEST")
    assert issue["code"] == "structure" and issue["expression"] == ["Bundle"]
    assert response.headers["X-Request-Id"] == "request-1"


async def test_an_answer_in_a_format_the_adapter_does_not_write_is_not_acceptable(client: httpx.AsyncClient) -> None:
    headers = {
        "Content-Type": FHIR_JSON,
        "Accept": "text/html",
        "X-Request-Id": "r",
        "X-Correlation-Id": "correlation-1",
    }
    response = await client.post("/fhir/$process-message", content=json_format.dumps(message()), headers=headers)
    [issue] = bars_issues(response, 406, "REC_NOT_ACCEPTABLE")
    assert issue["code"] == "not-supported"


async def test_the_capability_statement_declares_the_operation(client: httpx.AsyncClient) -> None:
    rest = (await client.get("/fhir/metadata")).json()["rest"][0]
    assert {
        "name": "process-message",
        "definition": "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
    } in rest["operation"]


def with_event(code: str) -> Any:
    def change(body: Resource) -> Resource:
        resource_of(body, "MessageHeader")["eventCoding"]["code"] = code
        return body

    return change


def with_reason(system: str, code: str) -> Any:
    def change(body: Resource) -> Resource:
        resource_of(body, "MessageHeader")["reason"]["coding"] = [{"system": system, "code": code}]
        return body

    return change


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        (with_event("booking-request"), "Bundle.entry[0].resource.eventCoding"),
        (with_event("servicerequest-response"), "Bundle.entry[0].resource.eventCoding"),
        (
            with_reason("https://fhir.nhs.uk/CodeSystem/message-reason-bars", "delete"),
            "Bundle.entry[0].resource.reason",
        ),
        (with_reason("https://example.org/reasons", "new"), "Bundle.entry[0].resource.reason"),
    ],
)
async def test_another_event_or_reason_is_unprocessable(
    client: httpx.AsyncClient, store: SQLiteStore, change: Any, expression: str
) -> None:
    issues = bars_issues(await post(client, change(message())), 422, "REC_UNPROCESSABLE_ENTITY")
    assert [(issue["code"], issue["expression"]) for issue in issues] == [("not-supported", [expression])]
    assert set((await counts(store)).values()) == {0}


class _FailingStore(SQLiteStore):
    """A store whose transactions fail unexpectedly (a bug, a lost disk)."""

    async def transaction(self, operations: Any) -> list[OperationResult]:
        raise RuntimeError("disk on fire: /var/lib/secret")


@pytest.fixture
async def failing_client(profile_validator: ProfileValidator) -> AsyncIterator[httpx.AsyncClient]:
    failing = _FailingStore(":memory:")
    app = create_app(failing, profile_validator=profile_validator)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client
    finally:
        await failing.close()


async def test_an_unexpected_error_is_a_server_error_without_internals(failing_client: httpx.AsyncClient) -> None:
    response = await post(failing_client, message(), request_id="request-1")
    [issue] = bars_issues(response, 500, "REC_SERVER_ERROR")
    assert issue["code"] == "exception" and "secret" not in response.text
    assert response.headers["X-Request-Id"] == "request-1"


# --------------------------------------------------------------------------------------------
# The MessageDefinition, and the BaRS examples
# --------------------------------------------------------------------------------------------


def test_the_rules_come_from_the_message_definition(profile_validator: ProfileValidator) -> None:
    path = Path(__file__).parents[2] / "conformance" / "MessageDefinition-sp-referral-request.json"
    resource = json_format.loads(path.read_bytes())
    assert errors([issue.to_fhir() for issue in profile_validator.validate(resource)]) == []
    definition = message_definition()
    assert definition.url == resource["url"] == "https://sp-fhir-adapter.org/fhir/MessageDefinition/sp-referral-request"
    assert definition.event == (EVENTS, "servicerequest-request")
    required = {type: (allowed.min, allowed.max) for type, allowed in definition.allowed.items() if allowed.min}
    assert required == {
        "Bundle": (1, 1),
        "MessageHeader": (1, 1),
        "ServiceRequest": (1, 1),
        "Patient": (1, 1),
        "Consent": (1, 1),
    }
    assert definition.allowed["ServiceRequest"].profile == (
        "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Referral"
    )


async def test_the_example_referral_message_is_accepted(client: httpx.AsyncClient) -> None:
    answer_of(await post(client, copy.deepcopy(EXAMPLE)))


# Each BaRS 1.4.0 request example and what it gets (docs/process-message.md, "The BaRS examples").
BARS_OUTCOMES = {
    "POST-body.json": (422, "REC_UNPROCESSABLE_ENTITY", "not-supported", "Bundle.entry[0].resource.eventCoding"),
    "request-Booking-POST.json": (
        422,
        "REC_UNPROCESSABLE_ENTITY",
        "not-supported",
        "Bundle.entry[0].resource.eventCoding",
    ),
    "request-ValidationRequest-POST.json": (400, "REC_BAD_REQUEST", "required", "Bundle.entry[1].resource.identifier"),
    "request-ValidationResponse-POST.json": (
        422,
        "REC_UNPROCESSABLE_ENTITY",
        "not-supported",
        "Bundle.entry[0].resource.eventCoding",
    ),
}


def test_every_bars_example_has_a_documented_outcome() -> None:
    assert {path.name for path in BARS_EXAMPLES.glob("*.json")} == set(BARS_OUTCOMES)
    documented = (Path(__file__).parents[2] / "docs" / "process-message.md").read_text()
    for name in (
        "POST-body.json",
        "Booking (POST).json",
        "ValidationRequest (POST) .json",
        "ValidationResponse (POST) .json",
    ):
        assert name in documented


@pytest.mark.parametrize("name", sorted(BARS_OUTCOMES))
async def test_the_bars_examples_get_their_documented_outcome(
    client: httpx.AsyncClient, store: SQLiteStore, name: str
) -> None:
    status, error_code, code, expression = BARS_OUTCOMES[name]
    body = json_format.loads((BARS_EXAMPLES / name).read_bytes())
    issues = bars_issues(await post(client, body), status, error_code)
    assert (code, [expression]) in [(issue["code"], issue["expression"]) for issue in errors(issues)], issues
    assert set((await counts(store)).values()) == {0}


async def test_the_bars_validation_request_is_rejected_for_what_a_referral_lacks(client: httpx.AsyncClient) -> None:
    body = json_format.loads((BARS_EXAMPLES / "request-ValidationRequest-POST.json").read_bytes())
    issues = errors(bars_issues(await post(client, body), 400, "REC_BAD_REQUEST"))
    named = {issue["expression"][0] for issue in issues}
    assert {
        "Bundle.entry[1].resource.code",
        "Bundle.entry[1].resource.identifier",
        "Bundle.entry[1].resource.authoredOn",
        "Bundle.entry[1].resource.supportingInfo",
    } <= named
    # Its retired NHS number verification code is mapped on input, so it is not among the reasons.
    assert not any("NHSNumberVerificationStatus" in issue["diagnostics"] for issue in issues)
