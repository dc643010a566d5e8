"""``POST [base]`` with a ``transaction`` or ``batch`` Bundle (https://hl7.org/fhir/R4/http.html#transaction).

A transaction is validated as a whole (issues point at ``Bundle.entry[3].resource.subject``) and its
writes go to the store as one :meth:`~adapter.store.base.ResourceStore.transaction`: all or
nothing, ``urn:uuid:`` fullUrls and the references to them rewritten to the ``Type/id`` each entry
ends up with, conditional creates (``ifNoneExist``) and updates (``PUT Type?criteria``) resolved
inside it. An error fails the whole transaction and names the entry. A batch runs each entry on
its own and reports each entry's outcome. ``GET`` entries run after the writes (for a
transaction: after it has committed, so a failing read is reported on its entry and does not undo
the writes). The response Bundle has one entry per request entry, in order, with ``response``
(status, location, etag, lastModified) and, under ``Prefer: return=representation``, the resource.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request, Response

from adapter.api.context import base_url, check_id, check_type, condition, prefer, services, validated
from adapter.api.negotiation import read_resource, render, response_format
from adapter.api.search import run_search, searchset
from adapter.errors import AdapterError, InputError, ValidationFailed
from adapter.store import Operation, OperationResult, Resource

__all__ = ["process_bundle"]

_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass(frozen=True, slots=True)
class _Request:
    """One entry's request: a write (``operation``) or a read (``url``)."""

    index: int
    operation: Operation | None = None
    url: str | None = None


def _entry_request(index: int, entry: Any) -> _Request:
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
        raise InputError(f"entry {index} has no request", expression=f"{where}.request")
    request = entry["request"]
    method, url = request.get("method"), request.get("url")
    if not isinstance(url, str) or not url:
        raise InputError(f"entry {index} has no request.url", expression=f"{where}.request.url")
    if method == "GET":
        return _Request(index, url=url)
    path, _, query = url.partition("?")
    parts = path.strip("/").split("/")
    type = parts[0]
    check_type(type)
    full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
    given = entry.get("resource")
    resource: Resource = given if isinstance(given, dict) else {}
    if method in ("POST", "PUT") and resource.get("resourceType") != type:
        raise InputError(f"entry {index}: a {method} to {type} needs a {type} resource", expression=f"{where}.resource")
    if method == "POST" and len(parts) == 1 and not query:
        if_none_exist = request.get("ifNoneExist")
        wanted = condition(type, if_none_exist, f"{where}.request.ifNoneExist") if if_none_exist else None
        return _Request(index, Operation.create(resource, if_none_exist=wanted, full_url=full_url))
    if method == "PUT" and len(parts) == 1 and query:
        wanted = condition(type, query, f"{where}.request.url")
        return _Request(
            index, Operation.update(resource, if_match=request.get("ifMatch"), condition=wanted, full_url=full_url)
        )
    if method == "PUT" and len(parts) == 2 and not query:
        check_id(parts[1], f"{where}.request.url")
        if resource.get("id", parts[1]) != parts[1]:
            raise InputError(
                f"entry {index}: the resource's id is not the one in request.url", expression=f"{where}.resource.id"
            )
        resource = {**resource, "id": parts[1]}
        return _Request(index, Operation.update(resource, if_match=request.get("ifMatch"), full_url=full_url))
    if method == "DELETE" and len(parts) == 2 and not query:
        check_id(parts[1], f"{where}.request.url")
        return _Request(index, Operation.delete(type, parts[1], if_match=request.get("ifMatch")))
    raise InputError(
        f"entry {index}: {method} {url} is not supported in a Bundle (POST Type, PUT Type/id, PUT Type?criteria,"
        " DELETE Type/id, GET)",
        expression=f"{where}.request",
    )


def _written_entry(base: str, result: OperationResult, representation: bool) -> dict[str, Any]:
    if result.resource is None:
        return {"response": {"status": _STATUS_TEXT[204], "etag": f'W/"{result.version_id}"'}}
    status = 201 if result.created and not result.matched else 200
    meta = result.resource["meta"]
    entry: dict[str, Any] = {
        "fullUrl": f"{base}/{result.type}/{result.id}",
        "response": {
            "status": _STATUS_TEXT[status],
            "location": f"{result.type}/{result.id}/_history/{result.version_id}",
            "etag": f'W/"{result.version_id}"',
            "lastModified": meta["lastUpdated"],
        },
    }
    if representation:
        entry["resource"] = result.resource
    return entry


def _error_entry(exc: AdapterError) -> dict[str, Any]:
    issues = exc.issues if isinstance(exc, ValidationFailed) else [exc.issue()]
    status = f"{exc.status} {HTTPStatus(exc.status).phrase}"
    return {"response": {"status": status, "outcome": {"resourceType": "OperationOutcome", "issue": issues}}}


async def _read_entry(request: Request, url: str) -> dict[str, Any]:
    """A GET entry: read, vread or search (https://hl7.org/fhir/R4/http.html#transaction)."""
    store = services(request).store
    path, _, query = url.partition("?")
    parts = path.strip("/").split("/")
    check_type(parts[0])
    if len(parts) == 1:
        result = await run_search(request, parts[0], parse_qsl(query, keep_blank_values=True))
        bundle = searchset(request, result, f"{base_url(request)}/{url}")
        return {"resource": bundle, "response": {"status": _STATUS_TEXT[200]}}
    if len(parts) == 2:
        check_id(parts[1])
        resource = await store.read(parts[0], parts[1])
    elif len(parts) == 4 and parts[2] == "_history":
        check_id(parts[1])
        resource = await store.vread(parts[0], parts[1], parts[3])
    else:
        raise InputError(f"GET {url} is not a read, vread or search")
    version = resource["meta"]["versionId"]
    return {
        "fullUrl": f"{base_url(request)}/{parts[0]}/{parts[1]}",
        "resource": resource,
        "response": {
            "status": _STATUS_TEXT[200],
            "etag": f'W/"{version}"',
            "lastModified": resource["meta"]["lastUpdated"],
        },
    }


async def _reads(request: Request, requests: list[_Request], entries: list[dict[str, Any] | None]) -> None:
    for item in requests:
        if item.url is not None:
            try:
                entries[item.index] = await _read_entry(request, item.url)
            except AdapterError as exc:
                entries[item.index] = _error_entry(exc)


async def _transaction(request: Request, bundle: Resource) -> Resource:
    found = services(request)
    validated(found.validator, bundle)
    raw_entries = bundle.get("entry") or []
    requests = [_entry_request(index, entry) for index, entry in enumerate(raw_entries)]
    # https://hl7.org/fhir/R4/http.html#trules: deletes, then creates, then updates, then reads.
    order = {"delete": 0, "create": 1, "update": 2}
    writes = sorted((r for r in requests if r.operation is not None), key=lambda r: order[r.operation.method])  # type: ignore[union-attr]
    try:
        results = await found.store.transaction([r.operation for r in writes])  # type: ignore[misc]
    except AdapterError as exc:
        if exc.operation is not None:
            where = f"Bundle.entry[{writes[exc.operation].index}]"
            exc.expression = f"{where}.resource.{exc.expression}" if exc.expression else f"{where}.request"
        raise
    entries: list[dict[str, Any] | None] = [None] * len(requests)
    representation = prefer(request, "return") == "representation"
    base = base_url(request)
    for item, result in zip(writes, results, strict=True):
        entries[item.index] = _written_entry(base, result, representation)
    await _reads(request, requests, entries)
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


async def _batch(request: Request, bundle: Resource) -> Resource:
    found = services(request)
    raw_entries = bundle.get("entry") or []
    entries: list[dict[str, Any] | None] = [None] * len(raw_entries)
    representation = prefer(request, "return") == "representation"
    base = base_url(request)
    requests: list[_Request] = []
    for index, entry in enumerate(raw_entries):
        try:
            item = _entry_request(index, entry)
            requests.append(item)
            if item.operation is None:
                continue
            if item.operation.resource is not None:
                validated(found.validator, item.operation.resource)
            result = (await found.store.transaction([item.operation]))[0]
            entries[index] = _written_entry(base, result, representation)
        except AdapterError as exc:
            entries[index] = _error_entry(exc)
    await _reads(request, requests, entries)
    return {"resourceType": "Bundle", "type": "batch-response", "entry": entries}


async def process_bundle(request: Request) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#transaction"""
    fmt = response_format(request)
    bundle = await read_resource(request, services(request).max_body_bytes)
    if bundle.get("resourceType") != "Bundle":
        raise InputError("POST to the base takes a transaction or batch Bundle", expression="resourceType")
    kind = bundle.get("type")
    if kind == "transaction":
        response = await _transaction(request, bundle)
    elif kind == "batch":
        response = await _batch(request, bundle)
    else:
        raise InputError(
            f"POST to the base takes a transaction or batch Bundle, not {kind!r}", expression="Bundle.type"
        )
    return render(response, fmt, 200)
