"""Search: ``GET [base]/[type]?...``, ``POST [base]/[type]/_search`` and the paging links.

The query is parsed by :mod:`adapter.search.query` and answered by the store; this module renders
the ``searchset`` Bundle (https://hl7.org/fhir/R4/bundle.html#searchset): matches, then what
``_include``/``_revinclude`` brought (``search.mode`` ``include``), then, under lenient handling,
an OperationOutcome entry (``search.mode`` ``outcome``) naming the parameters that were ignored.
A result set of more than one page is saved by the store; ``next``/``previous`` links point at it
(``[base]?_getpages=ID&_getpagesoffset=N&_count=C``), so paging stays stable while data changes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Request, Response

from adapter.api.context import base_url, check_type, services, strict_handling
from adapter.api.negotiation import read_body, render, response_format
from adapter.errors import InputError, UnsupportedMediaType
from adapter.search.query import MAX_COUNT, SearchQuery, parse_search
from adapter.store import Resource, SearchResult

__all__ = ["get_pages", "search_type", "search_type_post", "searchset"]

_FORM = "application/x-www-form-urlencoded"
# https://hl7.org/fhir/R4/search.html#elements: a subset is marked so that nobody takes it for the whole.
_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def _subset(resource: Resource, elements: tuple[str, ...] | None) -> Resource:
    """``_elements``: the listed top-level elements, plus what every resource must keep."""
    if elements is None:
        return resource
    keep = {"resourceType", "id", "meta", *elements}
    subset = {key: value for key, value in resource.items() if key in keep or key.lstrip("_") in keep}
    meta = dict(subset.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), _SUBSETTED]
    subset["meta"] = meta
    return subset


def _outcome_entry(query: SearchQuery) -> dict[str, Any] | None:
    issues = [
        {"severity": "warning", "code": "not-supported", "diagnostics": f"ignored: {text}"} for text in query.ignored
    ] + [{"severity": "information", "code": "informational", "diagnostics": text} for text in query.warnings]
    if not issues:
        return None
    return {"resource": {"resourceType": "OperationOutcome", "issue": issues}, "search": {"mode": "outcome"}}


def _page_link(base: str, result: SearchResult, offset: int, fmt: str | None) -> str:
    parameters = {"_getpages": result.search_id, "_getpagesoffset": offset, "_count": result.query.count}
    if fmt is not None:
        parameters["_format"] = fmt
    return f"{base}?{urlencode(parameters)}"


def searchset(request: Request, result: SearchResult, self_url: str) -> Resource:
    """The ``searchset`` Bundle of one page of ``result``."""
    base = base_url(request)
    query = result.query
    links = [{"relation": "self", "url": self_url}]
    if result.search_id is not None:
        fmt = request.query_params.get("_format")
        count = query.count
        links.append({"relation": "first", "url": _page_link(base, result, 0, fmt)})
        if result.offset > 0:
            links.append({"relation": "previous", "url": _page_link(base, result, max(0, result.offset - count), fmt)})
        if result.offset + count < result.total:
            links.append({"relation": "next", "url": _page_link(base, result, result.offset + count, fmt)})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
            "resource": _subset(resource, query.elements),
            "search": {"mode": mode},
        }
        for mode, resources in (("match", result.resources), ("include", result.included))
        for resource in resources
    ]
    outcome = _outcome_entry(query)
    if outcome is not None:
        entries.append(outcome)
    bundle: Resource = {"resourceType": "Bundle", "type": "searchset", "total": result.total, "link": links}
    if entries:
        bundle["entry"] = entries
    return bundle


async def run_search(request: Request, type: str, pairs: list[tuple[str, str]]) -> SearchResult:
    """Parse and run a search of ``type`` with the request's handling preference."""
    query = parse_search(type, pairs, strict=strict_handling(request))
    return await services(request).store.search(query)


async def search_type(request: Request, type: str) -> Response:
    """See: https://hl7.org/fhir/R4/http.html#search"""
    fmt = response_format(request)
    check_type(type)
    result = await run_search(request, type, request.query_params.multi_items())
    return render(searchset(request, result, str(request.url)), fmt, 200)


async def search_type_post(request: Request, type: str) -> Response:
    """``POST [type]/_search`` with the parameters in a form body (and the URL), https://hl7.org/fhir/R4/http.html#search."""
    fmt = response_format(request)
    check_type(type)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != _FORM:
        raise UnsupportedMediaType(f"POST _search takes {_FORM}, not {content_type or 'no Content-Type'}")
    body = await read_body(request, services(request).max_body_bytes)
    try:
        form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise InputError("the form body is not UTF-8") from exc
    pairs = request.query_params.multi_items() + form
    result = await run_search(request, type, pairs)
    self_url = f"{base_url(request)}/{type}?{urlencode(pairs)}"
    return render(searchset(request, result, self_url), fmt, 200)


async def get_pages(request: Request) -> Response:
    """A page of a saved result set, the target of ``next``/``previous`` links."""
    fmt = response_format(request)
    params = request.query_params
    search_id = params.get("_getpages")
    if search_id is None:
        raise InputError("a search at the base needs a resource type: use [base]/[type]?...", expression="_getpages")
    offset, count = params.get("_getpagesoffset", "0"), params.get("_count", "20")
    if not offset.isdecimal():
        raise InputError(f"_getpagesoffset {offset!r} is not a whole number", expression="_getpagesoffset")
    if not count.isdecimal():
        raise InputError(f"_count {count!r} is not a whole number", expression="_count")
    result = await services(request).store.search_page(search_id, int(offset), min(int(count), MAX_COUNT))
    return render(searchset(request, result, str(request.url)), fmt, 200)
