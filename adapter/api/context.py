"""What every handler of the REST API shares: the injected services, the service base URL, URL
checks, version headers, reading the request's resource and answering a write.

Every request needs some of these, so what repeats between requests is computed once: the base URL
per (scheme, server, root path, Host), and the HTTP-date of each second for ``Last-Modified``.

See https://hl7.org/fhir/R4/http.html.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request, Response
from starlette.datastructures import URL

from adapter.api.capability import resource_types
from adapter.api.negotiation import Format, read_resource, render
from adapter.errors import InputError, UnknownResourceType, ValidationFailed
from adapter.mapping.run import MappingPool
from adapter.search.query import SearchQuery, parse_search, parse_token_condition
from adapter.store import Resource, ResourceStore
from adapter.validation import Validator

__all__ = [
    "BASE",
    "Services",
    "base_url",
    "check_id",
    "check_type",
    "condition",
    "incoming",
    "prefer",
    "services",
    "strict_handling",
    "validated",
    "version_headers",
    "written",
]

#: Where the FHIR API is mounted; the service base URL is the server's address plus this.
BASE = "/fhir"

# https://hl7.org/fhir/R4/datatypes.html#id
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# meta.lastUpdated as the stores write it: UTC with milliseconds (its HTTP-date is looked up by the second).
_STORE_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", re.ASCII)


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use, injected by the app factory (style rule 2)."""

    store: ResourceStore
    #: Checks every write: structural, or with the declared profiles (``SPFHIR_PROFILES``).
    validator: Validator
    max_body_bytes: int
    #: Structural validation plus profiles, for ``$validate`` and ``$ingest``.
    profile_validator: Validator
    #: Worker processes that map large ``$ingest`` requests while this process stores (None: none).
    mapping_pool: MappingPool | None = None


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def base_url(request: Request) -> str:
    """The service base URL: the request's base URL (``request.base_url``) plus :data:`BASE`."""
    scope = request.scope
    server = scope.get("server")
    return _base_url(
        scope.get("scheme", "http"),
        None if server is None else tuple(server),  # ASGI allows any iterable: a list is no cache key
        scope.get("app_root_path", scope.get("root_path", "")),
        request.headers.get("host"),
    )


# Bounded: Host is the client's to choose.
@lru_cache(maxsize=64)
def _base_url(scheme: str, server: tuple[str, int | None] | None, root_path: str, host: str | None) -> str:
    """What ``Request.base_url`` makes of these parts of the scope (the only parts it reads), plus BASE."""
    headers = [] if host is None else [(b"host", host.encode("latin-1"))]
    path = root_path if root_path.endswith("/") else root_path + "/"
    scope = {"scheme": scheme, "server": server, "path": path, "query_string": b"", "headers": headers}
    return str(URL(scope=scope)).rstrip("/") + BASE


def check_type(type: str) -> None:
    if type not in resource_types():
        raise UnknownResourceType(f"{type!r} is not an R4 resource type")


def check_id(id: str, what: str = "id") -> None:
    if not _ID.fullmatch(id):
        raise InputError(f"{id!r} is not a valid {what} (1-64 of A-Z a-z 0-9 - .)", expression=what)


def version_headers(resource: Resource, base: str | None = None) -> dict[str, str]:
    """ETag, Last-Modified and, for writes (given the service ``base``), Location
    (https://hl7.org/fhir/R4/http.html#create)."""
    meta = resource["meta"]
    headers = {"ETag": f'W/"{meta["versionId"]}"', "Last-Modified": _http_date(meta["lastUpdated"])}
    if base is not None:
        headers["Location"] = f"{base}/{resource['resourceType']}/{resource['id']}/_history/{meta['versionId']}"
    return headers


def _http_date(instant: str) -> str:
    """An instant as an HTTP-date (RFC 9110 section 5.6.7), which has whole seconds."""
    if _STORE_INSTANT.fullmatch(instant):
        return _http_date_of_second(instant[:19])
    return format_datetime(datetime.fromisoformat(instant), usegmt=True)


@lru_cache(maxsize=16)
def _http_date_of_second(second: str) -> str:
    return format_datetime(datetime.fromisoformat(second + "Z"), usegmt=True)


def validated(validator: Validator, resource: Resource) -> Resource:
    """``resource`` if it is structurally valid; else :class:`ValidationFailed` (422) with the issues."""
    issues = validator.validate(resource)
    if any(issue.is_error for issue in issues):
        type = resource.get("resourceType")
        raise ValidationFailed(f"the {type} is not valid", [issue.to_fhir() for issue in issues])
    return resource


async def incoming(request: Request, type: str) -> Resource:
    """The request's resource: parsed, of the URL's type, and structurally valid (else 422)."""
    found = services(request)
    resource = await read_resource(request, found.max_body_bytes)
    if resource.get("resourceType") != type:
        raise InputError(
            f"the body's resourceType {resource.get('resourceType')!r} is not the URL's {type!r}",
            expression="resourceType",
        )
    return validated(found.validator, resource)


def prefer(request: Request, name: str) -> str | None:
    """The value of one preference of the ``Prefer`` header (RFC 7240), lower case, or None."""
    header = request.headers.get("prefer")
    if header is None:
        return None
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"').lower()
    return None


def strict_handling(request: Request) -> bool:
    """``Prefer: handling=strict`` (https://hl7.org/fhir/R4/search.html#errors); lenient by default."""
    return prefer(request, "handling") == "strict"


def written(request: Request, stored: Resource, status: int, fmt: Format) -> Response:
    """The answer to a create or update, in the ``fmt`` the handler negotiated first and as
    ``Prefer: return=`` asks (https://hl7.org/fhir/R4/http.html#ops)."""
    headers = version_headers(stored, base_url(request))
    wanted = prefer(request, "return")
    body: dict[str, Any] | None = stored
    if wanted == "minimal":
        body = None
    elif wanted == "operationoutcome":
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": "All OK"}],
        }
    return render(body, fmt, status, headers)


def condition(type: str, text: str, where: str) -> SearchQuery:
    """The search in ``If-None-Exist`` or a conditional URL; strict, since an ignored parameter
    would widen the match (https://hl7.org/fhir/R4/http.html#ccreate). Plain token criteria
    (business identifiers, what ``$ingest`` writes for every resource) take the short way
    (:func:`adapter.search.query.parse_token_condition`) to the query :func:`full_condition` makes."""
    return parse_token_condition(type, text) or full_condition(type, text, where)


def full_condition(type: str, text: str, where: str) -> SearchQuery:
    """:func:`condition` by the query-string and search parsers, whatever the criteria."""
    query_text = text.split("?", 1)[1] if "?" in text else text
    pairs = [(name, value) for name, value in parse_qsl(query_text, keep_blank_values=True) if name != "_format"]
    if not pairs:
        raise InputError(f"{where} has no search criteria", expression=where)
    try:
        return parse_search(type, pairs, strict=True)
    except InputError as exc:
        raise InputError(f"{where}: {exc.message}", expression=where) from exc
