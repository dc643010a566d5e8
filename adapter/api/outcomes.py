"""Errors of the REST API, and the one place where every error becomes an OperationOutcome.

The HTTP-only errors (UnknownResourceType 404, NotAcceptable 406, UnsupportedMediaType 415) stand in
the adapter's one tree (:mod:`adapter.errors`) and are re-exported here.

:func:`install` registers the exception handlers that render every error of every route as an
OperationOutcome in the negotiated format: the adapter's own errors (a malformed parameter is an
InputError, 400; 422 is kept for resources that fail validation, https://hl7.org/fhir/R4/http.html#update),
Starlette's 404/405 and any unexpected exception (500, with no internal details). A
:class:`~adapter.errors.MessageRejected` (``$process-message``) brings its own issues and headers.
See https://hl7.org/fhir/R4/operationoutcome.html and https://hl7.org/fhir/R4/http.html#2.21.0.4.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from adapter.api.negotiation import error_format, render
from adapter.errors import (
    AdapterError,
    MessageRejected,
    NotAcceptable,
    UnknownResourceType,
    UnsupportedMediaType,
    ValidationFailed,
)

__all__ = ["NotAcceptable", "UnknownResourceType", "UnsupportedMediaType", "install", "outcome"]


# Issue codes for HTTP errors raised by the framework itself (https://hl7.org/fhir/R4/valueset-issue-type.html).
_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
}


def outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


def _subject(request: Request) -> str | None:
    """The resource type the request's URL names (``/fhir/Patient/1`` -> ``Patient``), if any."""
    parts = request.url.path.split("/")
    for part in parts[2:3]:
        if part[:1].isupper() and part.isalpha():
            return part
    return None


def _respond(
    request: Request, status: int, issues: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> Response:
    """The OperationOutcome response. An issue raised about the request as a whole (a resource that
    is not there, a version conflict, a format we cannot write) gets the resource type of the URL
    as its FHIRPath expression, so every issue points at something."""
    subject = _subject(request)
    if subject is not None:
        issues = [issue if issue.get("expression") else {**issue, "expression": [subject]} for issue in issues]
    return render(outcome(issues), error_format(request), status, headers)


async def _adapter_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdapterError)
    if isinstance(exc, MessageRejected):
        return _respond(request, exc.status, exc.issues, exc.headers)
    issues = exc.issues if isinstance(exc, ValidationFailed) else [exc.issue()]
    return _respond(request, exc.status, issues)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path; Starlette names only the first route's."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] is Match.PARTIAL:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    issue = {"severity": "error", "code": _ISSUE_CODES.get(exc.status_code, "exception"), "diagnostics": exc.detail}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # A 405 names the methods the resource supports (RFC 9110 section 15.5.6).
        headers["Allow"] = _allowed_methods(request)
    return _respond(request, exc.status_code, [issue], headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # No exception text leaves the server: it may hold internals. The server logs the exception.
    issue = {"severity": "fatal", "code": "exception", "diagnostics": "An unexpected error occurred on the server"}
    return _respond(request, 500, [issue])


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as an OperationOutcome (the one place errors are rendered)."""
    app.add_exception_handler(AdapterError, _adapter_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
