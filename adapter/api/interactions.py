"""One small handler per FHIR RESTful interaction, and the one routing table that registers them.

:data:`ROUTES` is what the API serves and what the CapabilityStatement (:mod:`adapter.api.capability`)
declares; ``tests/api/test_capability.py`` keeps the two in step. Handlers check the URL, call the
store (injected by :func:`adapter.api.app.create_app`) and render; parsing lives in
:mod:`adapter.api.negotiation`, storage behind the ``ResourceStore`` seam, and errors are raised for
:mod:`adapter.api.outcomes` to render. See https://hl7.org/fhir/R4/http.html.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fastapi import Request, Response

from adapter.api import json_patch
from adapter.api.bundles import process_bundle
from adapter.api.capability import capability_statement
from adapter.api.context import (
    BASE,
    Services,
    base_url,
    check_id,
    check_type,
    condition,
    incoming,
    services,
    validated,
    version_headers,
    written,
)
from adapter.api.ingest import ingest
from adapter.api.json_patch import JSON_PATCH
from adapter.api.negotiation import read_body, render, response_format
from adapter.api.operations import validate_instance, validate_stored, validate_type
from adapter.api.process_message import process_message
from adapter.api.search import get_pages, search_type, search_type_post
from adapter.errors import InputError, UnsupportedMediaType, VersionConflict
from adapter.store import HistoryEntry, NotFound, Operation, Resource

__all__ = ["BASE", "ROUTES", "Route", "Services"]

# Reads and re-applies of a PATCH without If-Match that keeps meeting concurrent changes.
_PATCH_ATTEMPTS = 5

# --------------------------------------------------------------------------------------------
# Handlers, one per interaction
# --------------------------------------------------------------------------------------------


async def read(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#read"""
    fmt = response_format(request)
    check_type(type)
    check_id(id)
    resource = await services(request).store.read(type, id)
    return render(resource, fmt, 200, version_headers(resource))


async def head(request: Request, type: str, id: str) -> Response:
    """``HEAD``: the headers a read would answer with (ETag, Last-Modified, length), no body
    (RFC 9110 section 9.3.2; https://hl7.org/fhir/R4/http.html#read)."""
    answer = await read(request, type, id)
    return Response(status_code=answer.status_code, headers=dict(answer.headers))


async def vread(request: Request, type: str, id: str, vid: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#vread"""
    fmt = response_format(request)
    check_type(type)
    check_id(id)
    check_id(vid, "versionId")
    resource = await services(request).store.vread(type, id, vid)
    return render(resource, fmt, 200, version_headers(resource))


async def create(request: Request, type: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#create (an id in the body is ignored) and, with
    ``If-None-Exist``, https://hl7.org/fhir/R4/http.html#ccreate (200 with the existing resource)."""
    fmt = response_format(request)
    check_type(type)
    resource = await incoming(request, type)
    store = services(request).store
    if_none_exist = request.headers.get("if-none-exist")
    if if_none_exist is None:
        return written(request, await store.create(resource), 201, fmt)
    wanted = condition(type, if_none_exist, "If-None-Exist")
    result = (await store.transaction([Operation.create(resource, if_none_exist=wanted)]))[0]
    assert result.resource is not None
    return written(request, result.resource, 200 if result.matched else 201, fmt)


async def update(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#update (create-on-update with the client's id: 201)."""
    fmt = response_format(request)
    check_type(type)
    check_id(id)
    resource = await incoming(request, type)
    if resource.get("id") != id:
        raise InputError(f"the body's id {resource.get('id')!r} is not the URL's id {id!r}", expression="id")
    stored, created = await services(request).store.update(resource, request.headers.get("if-match"))
    return written(request, stored, 201 if created else 200, fmt)


async def update_conditional(request: Request, type: str) -> Response:
    """``PUT [type]?criteria``: https://hl7.org/fhir/R4/http.html#cond-update (none: create, one:
    update it, several: 412)."""
    fmt = response_format(request)
    check_type(type)
    wanted = condition(type, request.url.query, "url")
    resource = await incoming(request, type)
    if_match = request.headers.get("if-match")
    operation = Operation.update(resource, if_match=if_match, condition=wanted)
    result = (await services(request).store.transaction([operation]))[0]
    assert result.resource is not None
    return written(request, result.resource, 201 if result.created else 200, fmt)


async def patch(request: Request, type: str, id: str) -> Response:
    """JSON Patch (RFC 6902), https://hl7.org/fhir/R4/http.html#patch.

    The patched resource is validated like any update. Without ``If-Match`` the patch applies to
    the version it was read from: a concurrent change makes it read and apply again (a few times),
    so no other writer's change is lost.
    """
    fmt = response_format(request)
    check_type(type)
    check_id(id)
    found = services(request)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != JSON_PATCH:
        raise UnsupportedMediaType(f"PATCH takes {JSON_PATCH}, not {content_type or 'no Content-Type'}")
    operations = json_patch.parse(await read_body(request, found.max_body_bytes))
    if_match = request.headers.get("if-match")
    for attempt in range(_PATCH_ATTEMPTS):
        current = await found.store.read(type, id)
        patched = json_patch.apply(current, operations)
        validated(found.validator, patched)
        try:
            stored, _ = await found.store.update(patched, if_match or current["meta"]["versionId"])
        except VersionConflict:
            if if_match is not None or attempt == _PATCH_ATTEMPTS - 1:
                raise
            continue
        return written(request, stored, 200, fmt)
    raise AssertionError("unreachable")


async def delete(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#delete"""
    response_format(request)
    check_type(type)
    check_id(id)
    await services(request).store.delete(type, id, request.headers.get("if-match"))
    return Response(status_code=204)


# https://hl7.org/fhir/R4/http.html#history: _count and _since.
def _history_parameters(request: Request) -> tuple[int | None, datetime | None]:
    """``_count`` (a whole number) and ``_since`` (an instant) of a history request."""
    count = request.query_params.get("_count")
    if count is not None and not count.isdecimal():
        raise InputError(f"_count {count!r} is not a whole number", expression="_count")
    return (None if count is None else int(count)), _instant(request.query_params.get("_since"))


async def history_instance(request: Request, type: str, id: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#history"""
    fmt = response_format(request)
    check_type(type)
    check_id(id)
    store = services(request).store
    count, since = _history_parameters(request)
    entries = await store.history(type, id, since, count)
    if not entries and not await store.history(type, id, count=1):
        raise NotFound(f"{type}/{id} is not known")
    return render(_history_bundle(request, entries), fmt, 200)


async def history_type(request: Request, type: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#history"""
    fmt = response_format(request)
    check_type(type)
    count, since = _history_parameters(request)
    entries = await services(request).store.history(type, None, since, count)
    return render(_history_bundle(request, entries), fmt, 200)


async def history_system(request: Request) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#history"""
    fmt = response_format(request)
    count, since = _history_parameters(request)
    entries = await services(request).store.history(None, None, since, count)
    return render(_history_bundle(request, entries), fmt, 200)


async def capabilities(request: Request) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#capabilities"""
    fmt = response_format(request)
    return render(capability_statement(ROUTES, base_url(request)), fmt, 200)


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
    base = base_url(request)
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
    http://hl7.org/fhir/restful-interaction (or ``$name`` for an operation), the level it works at,
    and its handler."""

    method: str
    path: str
    interaction: str
    level: Level
    handler: Callable[..., Awaitable[Response]]
    #: Further interaction codes the route serves (a Bundle POST is both transaction and batch).
    also: tuple[str, ...] = ()


# Order matters where paths overlap: literal segments (_history, metadata) before parameters.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/metadata", "capabilities", "system", capabilities),
    Route("GET", "/_history", "history-system", "system", history_system),
    # Paging links of a search ([base]?_getpages=...) are part of search-type.
    Route("GET", "", "search-type", "type", get_pages),
    Route("POST", "", "transaction", "system", process_bundle, also=("batch",)),
    Route("POST", "/$process-message", "$process-message", "system", process_message),
    Route("POST", "/$ingest", "$ingest", "system", ingest),
    Route("GET", "/{type}/_history", "history-type", "type", history_type),
    Route("POST", "/{type}/$validate", "$validate", "type", validate_type),
    Route("POST", "/{type}/{id}/$validate", "$validate", "instance", validate_instance),
    Route("GET", "/{type}/{id}/$validate", "$validate", "instance", validate_stored),
    Route("POST", "/{type}/_search", "search-type", "type", search_type_post),
    Route("GET", "/{type}", "search-type", "type", search_type),
    Route("POST", "/{type}", "create", "type", create),
    Route("PUT", "/{type}", "update", "type", update_conditional),
    Route("GET", "/{type}/{id}/_history", "history-instance", "instance", history_instance),
    Route("GET", "/{type}/{id}/_history/{vid}", "vread", "instance", vread),
    # Before the GET read: a GET route answers HEAD too, with a body.
    Route("HEAD", "/{type}/{id}", "read", "instance", head),
    Route("GET", "/{type}/{id}", "read", "instance", read),
    Route("PUT", "/{type}/{id}", "update", "instance", update),
    Route("PATCH", "/{type}/{id}", "patch", "instance", patch),
    Route("DELETE", "/{type}/{id}", "delete", "instance", delete),
)
