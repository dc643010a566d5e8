"""``POST [base]/$process-message``: referrals sent as BaRS messages (NHS Booking and Referral Standard).

See https://hl7.org/fhir/R4/messageheader-operation-process-message.html, https://hl7.org/fhir/R4/messaging.html
and BaRS 1.4.0 (https://digital.nhs.uk/developer/api-catalogue/booking-and-referral-fhir);
``docs/process-message.md`` documents the endpoint for senders. Always synchronous, as BaRS is: the
answer to the POST is the response.

**The message** is a Bundle of type ``message`` (FHIR JSON or XML) whose first entry is a MessageHeader.
What it may carry is data, not code: our MessageDefinition
(``conformance/MessageDefinition-sp-referral-request.json``) gives the event we take (``eventCoding``)
and, as the BaRS MessageDefinitions do, one ``focus`` item per resource type the message may carry,
with its profile and how many of it (min, max). The whole Bundle is then validated against the
profiles, the definition's profiles checked as though the message declared them. Codes of retired
code systems are first replaced as ``conformance/ConceptMap-sp-nhs-number-verification-status.json``
says (the BaRS examples still send the retired NHS number verification status).

**Routing**, on ``MessageHeader.eventCoding`` (``https://fhir.nhs.uk/CodeSystem/message-events-bars``),
``MessageHeader.reason`` (``https://fhir.nhs.uk/CodeSystem/message-reason-bars``) and the status of the
focus ServiceRequest (BaRS "Update" and "Cancel" workflows)::

    servicerequest-request  new     active                     create the referral, its Task and a planned Encounter
    servicerequest-request  update  active                     replace the stored referral (found by identifier)
    servicerequest-request  update  revoked, entered-in-error  cancel it: its status, the Task's and the Encounter's
    servicerequest-request  new     any other                  422 business-rule
    any other event, reason, or status of an update            422 not-supported

A new referral must not be stored yet (else 409); an update or cancel needs the stored referral to
exist (else 404) and to be ``active`` (else 422).

**Writes.** Everything one message changes is one :meth:`~adapter.store.base.ResourceStore.transaction`:
all or nothing. ``urn:uuid:`` fullUrls, and the references to them, become the ``Type/id`` the store
gives each entry. An entry with a business identifier (NHS number, ODS code, SDS id: its first
identifier with a system and a value) is a conditional create on it (``If-None-Exist``), so the same
patient or practice arriving in many referrals is stored once, and never overwritten by a message.
Entries without one are stored as sent, a copy per message (nothing says two of them are the same).
The referral itself gets a deterministic id, uuid5 of its identifier as the mappings make it
(:mod:`adapter.mapping.ids`), so that two messages creating the same referral cannot both succeed.

**Idempotency** (https://hl7.org/fhir/R4/messaging.html#reliable; BaRS: a message processed already is
answered 409 ``duplicate`` and must not be retried). The same transaction creates two records under
ids derived from the message's two keys, uuid5 in namespaces of their own:

- ``MessageHeader/{uuid5(Bundle.id)}``: the header of the message as received (focus, sender and
  receiver pointing at what was stored). It is the natural record of a processed message, and keeps
  ``source.endpoint``, where BaRS replies go.
- ``AuditEvent/{uuid5(X-Request-Id)}``: the receipt of the HTTP request (type ``rest``, subtype
  ``operation``), its ``X-Request-Id`` and ``X-Correlation-Id`` as entity details, and every resource
  the message wrote as an entity.

A create with a fixed id that is taken fails with :class:`~adapter.errors.Conflict` and rolls the
whole transaction back, on every store (SQLite serialises writers; PostgreSQL locks the id), so of
two identical messages sent together exactly one is processed; the other is answered 409
``duplicate``. Both ids are also read before any work, so a retry is answered 409 at once, even a
retry of a cancel that would otherwise fail the "only while active" rule. Only processed messages
are recorded: a rejected message can be corrected and sent again. The received Bundle itself is not
stored: the store rewrites the references of everything in a transaction, so it would be neither
the message as sent nor a resolvable Bundle.

**Errors** leave as :class:`~adapter.errors.MessageRejected`, rendered by :mod:`adapter.api.outcomes`
like every error: each issue carries its BaRS error code (``details.coding`` from
``https://fhir.nhs.uk/CodeSystem/http-error-codes``: REC_BAD_REQUEST, REC_NOT_FOUND, REC_CONFLICT,
REC_UNPROCESSABLE_ENTITY, REC_SERVER_ERROR ...) and a FHIRPath ``expression``; ``X-Request-Id`` and
``X-Correlation-Id`` are echoed on every answer.

**The answer** (HTTP 200) is a message Bundle (new id, timestamp) whose MessageHeader keeps the
request's event and reason (as the BaRS synchronous responses do), swaps source and destination,
has ``response.identifier`` = the request's ``Bundle.id`` and ``response.code`` = ``ok``, and focuses
the referral's Task; its entries are the Task, the planned Encounter and every resource stored.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import Request, Response

from adapter import software_version
from adapter.api.context import base_url, services
from adapter.api.negotiation import read_resource, render, response_format
from adapter.errors import AdapterError, Conflict, Gone, MessageRejected, NotFound, ValidationFailed, VersionConflict
from adapter.fhir import json_format
from adapter.mapping.ids import deterministic_id, identity
from adapter.search.query import escape, parse_search
from adapter.store import Operation, OperationResult, Resource, ResourceStore
from adapter.validation import Validator

__all__ = ["MessageDefinition", "message_definition", "process_message"]

_log = logging.getLogger("adapter.api")

_DEFINITION_FILE = "MessageDefinition-sp-referral-request.json"
_CONCEPT_MAP_FILE = "ConceptMap-sp-nhs-number-verification-status.json"

_REASONS = "https://fhir.nhs.uk/CodeSystem/message-reason-bars"
_HTTP_ERROR_CODES = "https://fhir.nhs.uk/CodeSystem/http-error-codes"
# BaRS receiver error codes by HTTP status; other 4xx are REC_BAD_REQUEST, other 5xx REC_SERVER_ERROR.
_ERROR_CODES = {
    400: "REC_BAD_REQUEST",
    401: "REC_UNAUTHORIZED",
    403: "REC_FORBIDDEN",
    404: "REC_NOT_FOUND",
    406: "REC_NOT_ACCEPTABLE",
    408: "REC_TIMEOUT",
    409: "REC_CONFLICT",
    422: "REC_UNPROCESSABLE_ENTITY",
    500: "REC_SERVER_ERROR",
    501: "REC_NOT_IMPLEMENTED",
    503: "REC_SERVICE_UNAVAILABLE",
}
_ECHOED = ("X-Request-Id", "X-Correlation-Id")
_CANCELLING = ("revoked", "entered-in-error")
# Task statuses after which a Task is not cancelled (https://hl7.org/fhir/R4/valueset-task-status.html).
_TASK_FINISHED = ("cancelled", "completed", "entered-in-error", "failed", "rejected")

_REFERRAL_STATUS = "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-ReferralStatus"
_BUSINESS_STATUS = "https://sp-fhir-adapter.org/fhir/CodeSystem/SP-ReferralBusinessStatus"
_UKCORE_ENCOUNTER = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Encounter"

# Namespaces of the deterministic ids (style rule 5): one per key, so that keys cannot collide.
_MESSAGE_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "https://sp-fhir-adapter.org/fhir/$process-message#Bundle.id")
_REQUEST_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "https://sp-fhir-adapter.org/fhir/$process-message#X-Request-Id")


# --------------------------------------------------------------------------------------------
# The MessageDefinition and the input ConceptMap (conformance/)
# --------------------------------------------------------------------------------------------


def _conformance_dir() -> Path:
    """Where the conformance resources are: in the repository, or under ``adapter/_data`` in a wheel."""
    installed = Path(__file__).resolve().parents[1] / "_data" / "conformance"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "conformance"


@dataclass(frozen=True, slots=True)
class Allowed:
    """One ``MessageDefinition.focus``: a resource type the message may carry, its profile, how many."""

    type: str
    profile: str | None
    min: int
    max: int | None


@dataclass(frozen=True, slots=True)
class MessageDefinition:
    """What the code reads from a MessageDefinition (https://hl7.org/fhir/R4/messagedefinition.html)."""

    url: str
    event: tuple[str, str]
    allowed: dict[str, Allowed]


@cache
def message_definition() -> MessageDefinition:
    """Our MessageDefinition for referral requests, ``conformance/MessageDefinition-sp-referral-request.json``."""
    data = json_format.loads((_conformance_dir() / _DEFINITION_FILE).read_bytes())
    event = data["eventCoding"]
    allowed = {
        focus["code"]: Allowed(
            focus["code"],
            focus.get("profile"),
            int(focus.get("min", 0)),
            None if focus.get("max", "*") == "*" else int(focus["max"]),
        )
        for focus in data.get("focus") or ()
    }
    return MessageDefinition(data["url"], (event["system"], event["code"]), allowed)


@cache
def _code_map() -> dict[tuple[str, str], dict[str, str]]:
    """(system, code) -> the Coding that replaces it on input, from the equivalences of the ConceptMap."""
    data = json_format.loads((_conformance_dir() / _CONCEPT_MAP_FILE).read_bytes())
    found: dict[tuple[str, str], dict[str, str]] = {}
    for group in data.get("group") or ():
        for element in group.get("element") or ():
            for target in element.get("target") or ():
                if target.get("equivalence") in ("equal", "equivalent"):
                    coding = {"system": group["target"], "code": target["code"]}
                    if "display" in target:
                        coding["display"] = target["display"]
                    found[(group["source"], element["code"])] = coding
    return found


def _mapped_codes(value: Any) -> Any:
    """``value`` with every Coding that the input ConceptMap maps replaced by its target."""
    if isinstance(value, list):
        return [_mapped_codes(item) for item in value]
    if not isinstance(value, dict):
        return value
    copy = {key: _mapped_codes(item) for key, item in value.items()}
    system, code = value.get("system"), value.get("code")
    if isinstance(system, str) and isinstance(code, str) and (system, code) in _code_map():
        copy.pop("display", None)
        copy.update(_code_map()[(system, code)])
    return copy


# --------------------------------------------------------------------------------------------
# Errors, with the BaRS error codes
# --------------------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one: for optional parts of a resource."""
    return value if isinstance(value, dict) else {}


def _reject(status: int, code: str, diagnostics: str, expression: str) -> MessageRejected:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics, "expression": [expression]}
    return MessageRejected(diagnostics, status=status, issues=[issue])


def _duplicate(what: str, expression: str) -> MessageRejected:
    return _reject(409, "duplicate", f"the message has already been processed ({what}); do not retry it", expression)


def _with_error_codes(exc: AdapterError, headers: dict[str, str]) -> MessageRejected:
    """``exc`` as BaRS answers it: every issue with its error code and an expression (the message as a
    whole when the error names no part of it), and the headers to echo."""
    issues = exc.issues if isinstance(exc, MessageRejected | ValidationFailed) else [exc.issue()]
    error_code = _ERROR_CODES.get(exc.status) or ("REC_SERVER_ERROR" if exc.status >= 500 else "REC_BAD_REQUEST")
    details = {"coding": [{"system": _HTTP_ERROR_CODES, "code": error_code}]}
    answered = [
        {
            "severity": issue["severity"],
            "code": issue["code"],
            "details": details,
            **{key: value for key, value in issue.items() if key not in ("severity", "code", "details")},
            "expression": issue.get("expression") or ["Bundle"],
        }
        for issue in issues
    ]
    return MessageRejected(exc.message, status=exc.status, issues=answered, headers=headers)


# --------------------------------------------------------------------------------------------
# Reading, routing and checking the message
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    bundle: Resource
    header: Resource
    reason: str
    request_id: str
    correlation_id: str | None

    @property
    def id(self) -> str:
        return str(self.bundle["id"])

    def entry(self, index: int) -> Resource:
        resource: Resource = self.bundle["entry"][index]["resource"]
        return resource

    def full_url(self, index: int) -> str:
        """The entry's fullUrl; one of its own when it has none (nothing in the message can refer to it)."""
        full_url = self.bundle["entry"][index].get("fullUrl")
        if isinstance(full_url, str) and full_url:
            return full_url
        return f"urn:uuid:{uuid.uuid5(_MESSAGE_IDS, f'{self.id}#{index}')}"


def _header(bundle: Any) -> Resource:
    """The MessageHeader of a message Bundle (https://hl7.org/fhir/R4/messaging.html#content)."""
    kind = bundle.get("resourceType")
    if kind != "Bundle":
        where = kind if isinstance(kind, str) and kind.isalpha() else "resourceType"
        raise _reject(400, "invalid", f"$process-message takes a Bundle of type message, not a {kind}", where)
    if bundle.get("type") != "message":
        raise _reject(400, "invalid", f"the Bundle is of type {bundle.get('type')!r}, not message", "Bundle.type")
    if not isinstance(bundle.get("id"), str) or not bundle["id"]:
        raise _reject(400, "required", "a message needs a Bundle.id: it identifies the message", "Bundle.id")
    entries = bundle.get("entry")
    first = entries[0] if isinstance(entries, list) and entries else None
    resource = first.get("resource") if isinstance(first, dict) else None
    if not isinstance(resource, dict) or resource.get("resourceType") != "MessageHeader":
        raise _reject(
            400, "structure", "the first entry of a message must be its MessageHeader", "Bundle.entry[0].resource"
        )
    return resource


def _reason(header: Resource, definition: MessageDefinition) -> str:
    """The route: ``new`` or ``update`` of the definition's event; 422 for any other."""
    where = "Bundle.entry[0].resource"
    event = header.get("eventCoding")
    if event is None and header.get("eventUri") is None:
        raise _reject(400, "required", "the MessageHeader has no event", f"{where}.eventCoding")
    system, code = definition.event
    if not isinstance(event, dict) or (event.get("system"), event.get("code")) != definition.event:
        got = f"{event.get('system')}#{event.get('code')}" if isinstance(event, dict) else header.get("eventUri")
        raise _reject(
            422, "not-supported", f"event {got} is not processed here; send {system}#{code}", f"{where}.eventCoding"
        )
    reason = header.get("reason")
    codings = reason.get("coding") if isinstance(reason, dict) else None
    if not isinstance(codings, list) or not codings:
        raise _reject(400, "required", f"the MessageHeader has no reason from {_REASONS}", f"{where}.reason")
    for coding in codings:
        if isinstance(coding, dict) and coding.get("system") == _REASONS and coding.get("code") in ("new", "update"):
            return str(coding["code"])
    got = ", ".join(f"{c.get('system')}#{c.get('code')}" for c in codings if isinstance(c, dict))
    raise _reject(
        422,
        "not-supported",
        f"reason {got} is not processed here: send {_REASONS} new for a new referral, or update to change it"
        " or to cancel it (ServiceRequest.status revoked)",
        f"{where}.reason",
    )


def _echoed(request: Request) -> dict[str, str]:
    return {name: request.headers[name] for name in _ECHOED if name in request.headers}


def _request_id(request: Request) -> str:
    value = request.headers.get("x-request-id", "").strip()
    if not value:
        raise _reject(
            400, "required", "the X-Request-Id header is required: a unique id, kept on retries", "X-Request-Id"
        )
    return value


def _key(namespace: uuid.UUID, name: str) -> str:
    return str(uuid.uuid5(namespace, name))


async def _not_processed(store: ResourceStore, message: _Message) -> None:
    """409 ``duplicate`` when the request or the message has been processed already."""
    records = (
        ("AuditEvent", _key(_REQUEST_IDS, message.request_id), f"X-Request-Id {message.request_id}", "X-Request-Id"),
        ("MessageHeader", _key(_MESSAGE_IDS, message.id), f"Bundle.id {message.id}", "Bundle.id"),
    )
    for type, id, what, expression in records:
        try:
            await store.read(type, id)
        except NotFound:
            continue
        except Gone:  # deleted, but its id is taken all the same
            pass
        raise _duplicate(what, expression)


def _claiming(resource: Resource, profile: str | None) -> Resource:
    """``resource``, declaring ``profile`` in ``meta.profile`` as well as its own."""
    meta = _dict(resource.get("meta"))
    declared = meta.get("profile", [])
    if profile is None or not isinstance(declared, list) or profile in declared:
        return resource
    return {**resource, "meta": {**meta, "profile": [*declared, profile]}}


def _definition_issues(bundle: Resource, definition: MessageDefinition) -> list[dict[str, Any]]:
    """Where the message breaks the definition's list of resource types and their counts."""
    issues: list[dict[str, Any]] = []

    def issue(code: str, diagnostics: str, expression: str) -> None:
        issues.append({"severity": "error", "code": code, "diagnostics": diagnostics, "expression": [expression]})

    found: dict[str, list[int]] = {}
    for index, entry in enumerate(bundle.get("entry") or ()):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        type = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(type, str):
            issue("required", f"entry {index} has no resource", f"Bundle.entry[{index}]")
        elif type == "Bundle" or type not in definition.allowed:
            listed = ", ".join(name for name in definition.allowed if name != "Bundle")
            issue(
                "not-supported", f"{definition.url} does not list {type} (it lists {listed})", f"Bundle.entry[{index}]"
            )
        else:
            found.setdefault(type, []).append(index)
    for allowed in definition.allowed.values():
        indexes = found.get(allowed.type, [])
        if allowed.type != "Bundle" and len(indexes) < allowed.min:
            issue("required", f"{definition.url} requires {allowed.min} {allowed.type} entry", "Bundle.entry")
        for index in indexes[allowed.max :] if allowed.max is not None else ():
            issue("structure", f"{definition.url} allows {allowed.max} {allowed.type} entry", f"Bundle.entry[{index}]")
    return issues


def _check(validator: Validator, bundle: Resource, definition: MessageDefinition) -> None:
    """400 with every issue unless the message meets the definition and the profiles (its own and the
    definition's, checked as though the message declared them)."""
    claimed = _claiming(bundle, definition.allowed["Bundle"].profile if "Bundle" in definition.allowed else None)
    entries = []
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") in definition.allowed:
            entry = {**entry, "resource": _claiming(resource, definition.allowed[resource["resourceType"]].profile)}
        entries.append(entry)
    if entries:
        claimed = {**claimed, "entry": entries}
    issues = _definition_issues(bundle, definition) + [issue.to_fhir() for issue in validator.validate(claimed)]
    if any(issue["severity"] in ("error", "fatal") for issue in issues):
        rank = {"fatal": 0, "error": 0, "warning": 1, "information": 2}
        issues.sort(key=lambda issue: rank.get(issue["severity"], 3))
        raise MessageRejected(f"the message does not meet {definition.url}", status=400, issues=issues)


def _focus(message: _Message) -> int:
    """The index of the entry the MessageHeader focuses: the referral ServiceRequest."""
    focus = message.header.get("focus")
    first = focus[0] if isinstance(focus, list) and len(focus) == 1 else None
    reference = first.get("reference") if isinstance(first, dict) else None
    for index, entry in enumerate(message.bundle["entry"]):
        resource = entry["resource"]
        if reference is not None and entry.get("fullUrl") == reference and resource["resourceType"] == "ServiceRequest":
            return index
    raise _reject(
        400,
        "invalid",
        "the MessageHeader must focus on the ServiceRequest entry, by its fullUrl",
        "Bundle.entry[0].resource.focus",
    )


def _token(resource: Resource) -> tuple[int, str] | None:
    """(index, ``system|value`` as a search token) of the resource's first identifier with both."""
    identifiers = resource.get("identifier")
    for index, identifier in enumerate(identifiers if isinstance(identifiers, list) else ()):
        system = identifier.get("system") if isinstance(identifier, dict) else None
        value = identifier.get("value") if isinstance(identifier, dict) else None
        if isinstance(system, str) and system and isinstance(value, str) and value:
            return index, f"{escape(system)}|{escape(value)}"
    return None


def _referral_id(referral: Resource) -> str:
    """The referral's id: the one the mappings give it (:mod:`adapter.mapping.ids`), so a referral
    that arrives as a message and in a platform's export is one ServiceRequest."""
    found = _token(referral)
    assert found is not None  # checked before: a referral needs an identifier
    identifier = referral["identifier"][found[0]]
    return deterministic_id("ServiceRequest", identity(identifier["system"], identifier["value"]))


# --------------------------------------------------------------------------------------------
# What a message writes
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Writes:
    """The store operations of one message, each with the part of the message it comes from
    (a FHIRPath, to name it in errors)."""

    operations: list[Operation] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    #: Tasks of the referral that the message leaves as they are (an update), for the answer.
    unchanged: list[Resource] = field(default_factory=list)

    def add(self, operation: Operation, source: str) -> None:
        self.operations.append(operation)
        self.sources.append(source)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _business_status(code: str) -> dict[str, Any]:
    display = {"received": "Received", "cancelled": "Cancelled"}[code]
    return {"coding": [{"system": _BUSINESS_STATUS, "code": code, "display": display}]}


def _task(referral: Resource, referral_url: str, status: str, business_status: str) -> Resource:
    """The Task that tracks the referral (profile SP-ReferralStatus)."""
    now = _now()
    task: Resource = {
        "resourceType": "Task",
        "meta": {"profile": [_REFERRAL_STATUS]},
        "identifier": referral.get("identifier"),
        "status": status,
        "businessStatus": _business_status(business_status),
        "intent": "order",
        "focus": {"reference": referral_url},
        "for": referral.get("subject"),
        "authoredOn": now,
        "lastModified": now,
        "requester": referral.get("requester"),
        "owner": (referral.get("performer") or [None])[0],
    }
    return {key: value for key, value in task.items() if value is not None}


def _planned_encounter(referral: Resource, referral_url: str) -> Resource:
    """The planned contact a BaRS receiver books for a referral (https://hl7.org/fhir/R4/encounter.html)."""
    encounter: Resource = {
        "resourceType": "Encounter",
        "meta": {"profile": [_UKCORE_ENCOUNTER]},
        "status": "planned",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "subject": referral.get("subject"),
        "basedOn": [{"reference": referral_url}],
    }
    return {key: value for key, value in encounter.items() if value is not None}


def _entries(message: _Message, focus: int, writes: _Writes) -> None:
    """Every entry but the header and the referral: a conditional create on its business identifier
    (https://hl7.org/fhir/R4/http.html#ccreate), else a create."""
    seen: dict[tuple[str, str], int] = {}
    for index in range(1, len(message.bundle["entry"])):
        if index == focus:
            continue
        resource = message.entry(index)
        type = resource["resourceType"]
        where = f"Bundle.entry[{index}].resource"
        token = _token(resource)
        if token is None:
            writes.add(Operation.create(resource, full_url=message.full_url(index)), where)
            continue
        if (type, token[1]) in seen:
            raise _reject(
                400,
                "duplicate",
                f"entries {seen[type, token[1]]} and {index} are the same {type} (identifier {token[1]}):"
                " send it once and refer to that entry",
                f"{where}.identifier[{token[0]}]",
            )
        seen[type, token[1]] = index
        condition = parse_search(type, [("identifier", token[1])], strict=True)
        writes.add(Operation.create(resource, if_none_exist=condition, full_url=message.full_url(index)), where)


async def _stored_referral(store: ResourceStore, token: str) -> list[Resource]:
    result = await store.search(parse_search("ServiceRequest", [("identifier", token), ("_count", "2")], strict=True))
    return result.resources


async def _new_referral(store: ResourceStore, message: _Message, focus: int, token: str, writes: _Writes) -> str:
    """``new``: the referral, under a deterministic id, with a Task and a planned Encounter."""
    referral, where, url = message.entry(focus), f"Bundle.entry[{focus}].resource", message.full_url(focus)
    stored = await _stored_referral(store, token)
    if stored:
        raise _exists(token, f"{where}.identifier", stored[0]["id"])
    if referral.get("status") != "active":
        raise _reject(
            422, "business-rule", f"a new referral must be active, not {referral.get('status')!r}", f"{where}.status"
        )
    writes.add(Operation.create(referral, id=_referral_id(referral), full_url=url), where)
    _entries(message, focus, writes)
    writes.add(
        Operation.create(_task(referral, url, "requested", "received"), full_url=f"urn:uuid:{uuid.uuid4()}"), where
    )
    encounter = _planned_encounter(referral, url)
    writes.add(Operation.create(encounter, full_url=f"urn:uuid:{uuid.uuid4()}"), where)
    return "referral created"


async def _update_referral(store: ResourceStore, message: _Message, focus: int, token: str, writes: _Writes) -> str:
    """``update``: replace the stored referral, or cancel it (status revoked or entered-in-error)."""
    referral, where, url = message.entry(focus), f"Bundle.entry[{focus}].resource", message.full_url(focus)
    stored = await _stored_referral(store, token)
    if not stored:
        raise _reject(
            404, "not-found", f"no referral has the identifier {token}; send it with reason new", f"{where}.identifier"
        )
    if len(stored) > 1:
        raise _reject(
            409, "multiple-matches", f"more than one referral has the identifier {token}", f"{where}.identifier"
        )
    current = stored[0]
    reference = f"ServiceRequest/{current['id']}"
    if current.get("status") != "active":
        raise _reject(
            422,
            "business-rule",
            f"the referral {reference} is {current.get('status')}: only an active referral can be updated or cancelled",
            f"{where}.status",
        )
    status = referral.get("status")
    if status not in ("active", *_CANCELLING):
        raise _reject(
            422,
            "not-supported",
            f"an update with ServiceRequest.status {status!r} is not processed: active updates the referral,"
            " revoked or entered-in-error cancels it",
            f"{where}.status",
        )
    version = current["meta"]["versionId"]
    cancel = status in _CANCELLING
    changed = {**current, "status": status} if cancel else {**referral, "id": current["id"]}
    writes.add(Operation.update(changed, if_match=version, full_url=url), where)
    _entries(message, focus, writes)
    tasks = (await store.search(parse_search("Task", [("focus", reference)], strict=True))).resources
    for task in tasks:
        if cancel and task.get("status") not in _TASK_FINISHED:
            cancelled = {
                **task,
                "status": "cancelled",
                "businessStatus": _business_status("cancelled"),
                "lastModified": _now(),
            }
            writes.add(Operation.update(cancelled, if_match=task["meta"]["versionId"]), where)
        else:
            writes.unchanged.append(task)
    if not tasks:
        task = _task(referral, url, "cancelled" if cancel else "requested", "cancelled" if cancel else "received")
        writes.add(Operation.create(task, full_url=f"urn:uuid:{uuid.uuid4()}"), where)
    if not cancel:
        return "referral updated"
    planned = parse_search("Encounter", [("based-on", reference), ("status", "planned")], strict=True)
    for encounter in (await store.search(planned)).resources:
        writes.add(
            Operation.update({**encounter, "status": "cancelled"}, if_match=encounter["meta"]["versionId"]), where
        )
    return "referral cancelled"


def _exists(token: str, expression: str, id: str) -> MessageRejected:
    return _reject(
        409,
        "conflict",
        f"a referral with the identifier {token} exists already (ServiceRequest/{id}): send reason update to change it",
        expression,
    )


def _audit_event(message: _Message, header_url: str, written: list[str], outcome: str) -> Resource:
    """The record of the request (https://hl7.org/fhir/R4/auditevent.html), with its BaRS ids."""
    details = [{"type": "X-Request-Id", "valueString": message.request_id}]
    if message.correlation_id is not None:
        details.append({"type": "X-Correlation-Id", "valueString": message.correlation_id})
    source = _dict(message.header.get("source"))
    sender = message.header.get("sender")
    named = source.get("name") or source.get("endpoint") or "unknown sender"
    who = sender if isinstance(sender, dict) else {"display": str(named)}
    return {
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "operation", "display": "operation"}],
        "action": "E",
        "recorded": _now(),
        "outcome": "0",
        "outcomeDesc": f"$process-message: {outcome}",
        "agent": [{"who": who, "requestor": True}],
        "source": {"observer": {"display": "sp-fhir-adapter"}},
        "entity": [
            {"what": {"reference": header_url}, "detail": details},
            *({"what": {"reference": reference}} for reference in written),
        ],
    }


# --------------------------------------------------------------------------------------------
# Committing, and the answer
# --------------------------------------------------------------------------------------------


def _explain(exc: AdapterError, message: _Message, writes: _Writes) -> AdapterError:
    """A store error of the message's transaction, said in terms of the message."""
    index = exc.operation
    if index is None:
        return exc
    operation, source = writes.operations[index], writes.sources[index]
    if index == 0 and isinstance(exc, Conflict):
        return _duplicate(f"X-Request-Id {message.request_id}", "X-Request-Id")
    if index == 1 and isinstance(exc, Conflict):
        return _duplicate(f"Bundle.id {message.id}", "Bundle.id")
    if isinstance(exc, VersionConflict) and operation.method == "create" and operation.resource is not None:
        token = _token(operation.resource)
        return _reject(
            409,
            "multiple-matches",
            f"more than one stored {operation.type} has the identifier {token[1] if token else ''}:"
            " the message cannot say which one it means",
            f"{source}.identifier[{token[0] if token else 0}]",
        )
    if isinstance(exc, VersionConflict):
        return _reject(
            409, "conflict", f"{operation.type}/{operation.id} changed while the message was processed", source
        )
    if isinstance(exc, Conflict) and operation.type == "ServiceRequest" and operation.method == "create":
        assert operation.resource is not None and operation.id is not None
        token = _token(operation.resource)
        return _exists(token[1] if token else "", f"{source}.identifier", operation.id)
    exc.expression = f"{source}.{exc.expression}" if exc.expression else source
    return exc


def _answer(request: Request, message: _Message, writes: _Writes, results: list[OperationResult]) -> Resource:
    """The response message (https://hl7.org/fhir/R4/messaging.html#response)."""
    base = base_url(request)
    mapping = {
        operation.full_url: f"{result.type}/{result.id}"
        for operation, result in zip(writes.operations, results, strict=True)
        if operation.full_url
    }

    def resolved(reference: Any) -> Any:
        if isinstance(reference, dict) and reference.get("reference") in mapping:
            return {**reference, "reference": mapping[reference["reference"]]}
        return reference

    order = {"Task": 0, "Encounter": 1, "ServiceRequest": 2}
    stored = sorted(
        [result.resource for result in results[2:] if result.resource is not None] + writes.unchanged,
        key=lambda resource: order.get(resource["resourceType"], 3),
    )
    task = next(resource for resource in stored if resource["resourceType"] == "Task")
    header = message.header
    destinations = header.get("destination")
    to = _dict(destinations[0] if isinstance(destinations, list) and destinations else None)
    came_from = _dict(header.get("source"))
    answer: Resource = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": header["eventCoding"],
        "destination": [
            {
                key: value
                for key, value in (
                    ("name", came_from.get("name")),
                    ("endpoint", came_from.get("endpoint")),
                    ("receiver", resolved(header.get("sender"))),
                )
                if value is not None
            }
        ],
        "sender": resolved(to.get("receiver")),
        "source": {
            key: value
            for key, value in (
                ("name", to.get("name")),
                ("software", "sp-fhir-adapter"),
                ("version", software_version()),
                ("endpoint", to.get("endpoint") or f"{base}/$process-message"),
            )
            if value is not None
        },
        "reason": header.get("reason"),
        "response": {"identifier": message.id, "code": "ok"},
        "focus": [{"reference": f"Task/{task['id']}"}],
    }
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": _now(),
        "entry": [
            {"fullUrl": f"urn:uuid:{answer['id']}", "resource": {k: v for k, v in answer.items() if v is not None}},
            *({"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r} for r in stored),
        ],
    }


def _recorded(message: _Message, body: _Writes, outcome: str) -> _Writes:
    """``body`` after the two records of a processed message, under the ids of its keys (module
    docstring, Idempotency). They come first: a duplicate fails on them before anything else is planned."""
    header_url = message.full_url(0)
    written = [operation.full_url or f"{operation.type}/{operation.id}" for operation in body.operations]
    audit = _audit_event(message, header_url, written, outcome)
    writes = _Writes(unchanged=body.unchanged)
    writes.add(Operation.create(audit, id=_key(_REQUEST_IDS, message.request_id)), "X-Request-Id")
    header = Operation.create(message.header, id=_key(_MESSAGE_IDS, message.id), full_url=header_url)
    writes.add(header, "Bundle.entry[0].resource")
    for operation, source in zip(body.operations, body.sources, strict=True):
        writes.add(operation, source)
    return writes


async def _process(request: Request, headers: dict[str, str]) -> Resource:
    found = services(request)
    definition = message_definition()
    request_id = _request_id(request)
    bundle = _mapped_codes(await read_resource(request, found.max_body_bytes))
    header = _header(bundle)
    reason = _reason(header, definition)
    message = _Message(bundle, header, reason, request_id, headers.get("X-Correlation-Id"))
    await _not_processed(found.store, message)
    _check(found.profile_validator, bundle, definition)
    focus = _focus(message)
    token = _token(message.entry(focus))
    if token is None:
        raise _reject(
            400,
            "required",
            "the referral needs an identifier with a system and a value",
            f"Bundle.entry[{focus}].resource.identifier",
        )
    body = _Writes()
    route = _new_referral if message.reason == "new" else _update_referral
    outcome = await route(found.store, message, focus, token[1], body)
    writes = _recorded(message, body, outcome)
    try:
        results = await found.store.transaction(writes.operations)
    except AdapterError as exc:
        raise _explain(exc, message, writes) from exc
    return _answer(request, message, writes, results)


async def process_message(request: Request) -> Response:
    """``POST [base]/$process-message`` (https://hl7.org/fhir/R4/messageheader-operation-process-message.html)."""
    headers = _echoed(request)
    try:
        fmt = response_format(request)
        answer = await _process(request, headers)
    except AdapterError as exc:
        raise _with_error_codes(exc, headers) from exc
    except Exception as exc:
        # Logged here, as the server logs those that reach outcomes.py; the answer holds no internals.
        _log.exception("$process-message failed")
        unexpected = AdapterError("An unexpected error occurred on the server")
        raise _with_error_codes(unexpected, headers) from exc
    return render(answer, fmt, 200, headers)
