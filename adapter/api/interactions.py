"""One small handler per FHIR RESTful interaction, and the one routing table that registers them.

:data:`ROUTES` is what the API serves and what the CapabilityStatement (:mod:`adapter.api.capability`)
declares; ``tests/api/test_capability.py`` keeps the two in step. Handlers check the URL, call the
store (injected by :func:`adapter.api.app.create_app`) and render; parsing lives in
:mod:`adapter.api.negotiation`, storage behind the ``ResourceStore`` seam, and errors are raised for
:mod:`adapter.api.outcomes` to render. See https://hl7.org/fhir/R4/http.html.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response

from adapter.api.capability import capability_statement, resource_types
from adapter.api.negotiation import read_resource, render, response_format
from adapter.api.outcomes import UnknownResourceType
from adapter.errors import InputError, ValidationFailed
from adapter.store import HistoryEntry, NotFound, Resource, ResourceStore
from adapter.validation import Validator

__all__ = ["BASE", "ROUTES", "Route", "Services"]

#: Where the FHIR API is mounted; the service base URL is the server's address plus this.
BASE = "/fhir"

# https://hl7.org/fhir/R4/datatypes.html#id
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use, injected by the app factory (style rule 2)."""

    store: ResourceStore
    validator: Validator
    max_body_bytes: int


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + BASE


def _check_type(type: str) -> None:
    if type not in resource_types():
        raise UnknownResourceType(f"{type!r} is not an R4 resource type")


def _check_id(id: str, what: str = "id") -> None:
    if not _ID.fullmatch(id):
        raise InputError(f"{id!r} is not a valid {what} (1-64 of A-Z a-z 0-9 - .)", expression=what)


def _version_headers(base: str, resource: Resource, location: bool = False) -> dict[str, str]:
    """ETag, Last-Modified and, for writes, Location (https://hl7.org/fhir/R4/http.html#create)."""
    meta = resource["meta"]
    last_updated = datetime.fromisoformat(meta["lastUpdated"])
    headers = {"ETag": f'W/"{meta["versionId"]}"', "Last-Modified": format_datetime(last_updated, usegmt=True)}
    if location:
        headers["Location"] = f"{base}/{resource['resourceType']}/{resource['id']}/_history/{meta['versionId']}"
    return headers


async def _incoming(request: Request, type: str) -> Resource:
    """The request's resource: parsed, of the URL's type, and structurally valid (else 422)."""
    services = _services(request)
    resource = await read_resource(request, services.max_body_bytes)
    if resource.get("resourceType") != type:
        raise InputError(
            f"the body's resourceType {resource.get('resourceType')!r} is not the URL's {type!r}",
            expression="resourceType",
        )
    issues = services.validator.validate(resource)
    if any(issue.is_error for issue in issues):
        raise ValidationFailed(f"the {type} is not valid", [issue.to_fhir() for issue in issues])
    return resource


def _written(request: Request, stored: Resource, status: int) -> Response:
    """The answer to a create or update, as ``Prefer: return=`` asks (https://hl7.org/fhir/R4/http.html#ops)."""
    fmt = response_format(request)
    headers = _version_headers(_base(request), stored, location=True)
    prefer = request.headers.get("prefer", "").replace(" ", "").lower()
    body: dict[str, Any] | None = stored
    if "return=minimal" in prefer:
        body = None
    elif "return=operationoutcome" in prefer:
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": "All OK"}],
        }
    return render(body, fmt, status, headers)


# --------------------------------------------------------------------------------------------
# Handlers, one per interaction
# --------------------------------------------------------------------------------------------


async def read(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#read"""
    fmt = response_format(request)
    _check_type(type)
    _check_id(id)
    resource = await _services(request).store.read(type, id)
    return render(resource, fmt, 200, _version_headers(_base(request), resource))


async def vread(request: Request, type: str, id: str, vid: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#vread"""
    fmt = response_format(request)
    _check_type(type)
    _check_id(id)
    _check_id(vid, "versionId")
    resource = await _services(request).store.vread(type, id, vid)
    return render(resource, fmt, 200, _version_headers(_base(request), resource))


async def create(request: Request, type: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#create (an id in the body is ignored)."""
    response_format(request)
    _check_type(type)
    resource = await _incoming(request, type)
    stored = await _services(request).store.create(resource)
    return _written(request, stored, 201)


async def update(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#update (create-on-update with the client's id: 201)."""
    response_format(request)
    _check_type(type)
    _check_id(id)
    resource = await _incoming(request, type)
    if resource.get("id") != id:
        raise InputError(f"the body's id {resource.get('id')!r} is not the URL's id {id!r}", expression="id")
    stored, created = await _services(request).store.update(resource, request.headers.get("if-match"))
    return _written(request, stored, 201 if created else 200)


async def delete(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#delete"""
    response_format(request)
    _check_type(type)
    _check_id(id)
    await _services(request).store.delete(type, id, request.headers.get("if-match"))
    return Response(status_code=204)


# https://hl7.org/fhir/R4/http.html#history: _count and _since.
Count = Annotated[int | None, Query(alias="_count", ge=0)]
Since = Annotated[str | None, Query(alias="_since")]


async def history_instance(request: Request, type: str, id: str, count: Count = None, since: Since = None) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#history"""
    fmt = response_format(request)
    _check_type(type)
    _check_id(id)
    store = _services(request).store
    entries = await store.history(type, id, _instant(since), count)
    if not entries and not await store.history(type, id, count=1):
        raise NotFound(f"{type}/{id} is not known")
    return render(_history_bundle(request, entries), fmt, 200)


async def history_type(request: Request, type: str, count: Count = None, since: Since = None) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#history"""
    fmt = response_format(request)
    _check_type(type)
    entries = await _services(request).store.history(type, None, _instant(since), count)
    return render(_history_bundle(request, entries), fmt, 200)


async def history_system(request: Request, count: Count = None, since: Since = None) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#history"""
    fmt = response_format(request)
    entries = await _services(request).store.history(None, None, _instant(since), count)
    return render(_history_bundle(request, entries), fmt, 200)


async def capabilities(request: Request) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#capabilities"""
    fmt = response_format(request)
    return render(capability_statement(ROUTES, _base(request)), fmt, 200)


def _instant(since: str | None) -> datetime | None:
    """``_since``, an instant with a time zone (https://hl7.org/fhir/R4/datatypes.html#instant)."""
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since.replace(" ", "+"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in since:
        raise InputError(f"_since {since!r} is not an instant such as 2026-11-23T12:00:00Z", expression="_since")
    return moment


def _history_entry(base: str, entry: HistoryEntry) -> dict[str, Any]:
    """One version as a history entry with request and response (https://hl7.org/fhir/R4/bundle.html#history).

    The store does not record which interaction made a version, so the request is inferred: a
    delete from the deleted flag, a create (POST) for version 1, an update (PUT) for later ones.
    """
    url = f"{entry.type}/{entry.id}"
    response = {"etag": f'W/"{entry.version_id}"', "lastModified": entry.last_updated}
    item: dict[str, Any] = {"fullUrl": f"{base}/{url}"}
    if entry.deleted:
        item["request"] = {"method": "DELETE", "url": url}
        item["response"] = {"status": "204 No Content", **response}
    elif entry.version_id == "1":
        item["resource"] = entry.resource
        item["request"] = {"method": "POST", "url": entry.type}
        item["response"] = {"status": "201 Created", **response}
    else:
        item["resource"] = entry.resource
        item["request"] = {"method": "PUT", "url": url}
        item["response"] = {"status": "200 OK", **response}
    return item


def _history_bundle(request: Request, entries: list[HistoryEntry]) -> Resource:
    base = _base(request)
    bundle: Resource = {
        "resourceType": "Bundle",
        "type": "history",
        "total": len(entries),
        "link": [{"relation": "self", "url": str(request.url)}],
    }
    if entries:
        bundle["entry"] = [_history_entry(base, entry) for entry in entries]
    return bundle


# --------------------------------------------------------------------------------------------
# The routing table
# --------------------------------------------------------------------------------------------

Level = Literal["system", "type", "instance"]


@dataclass(frozen=True, slots=True)
class Route:
    """One interaction: HTTP method and path (under :data:`BASE`), its code in
    http://hl7.org/fhir/restful-interaction, the level it works at, and its handler."""

    method: str
    path: str
    interaction: str
    level: Level
    handler: Callable[..., Awaitable[Response]]


# Order matters where paths overlap: literal segments (_history, metadata) before parameters.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/metadata", "capabilities", "system", capabilities),
    Route("GET", "/_history", "history-system", "system", history_system),
    Route("GET", "/{type}/_history", "history-type", "type", history_type),
    Route("POST", "/{type}", "create", "type", create),
    Route("GET", "/{type}/{id}/_history", "history-instance", "instance", history_instance),
    Route("GET", "/{type}/{id}/_history/{vid}", "vread", "instance", vread),
    Route("GET", "/{type}/{id}", "read", "instance", read),
    Route("PUT", "/{type}/{id}", "update", "instance", update),
    Route("DELETE", "/{type}/{id}", "delete", "instance", delete),
)
