"""Content negotiation: which format a request body is in, and which format a response is written in.

Bodies are FHIR JSON or XML, told by ``Content-Type`` (anything else: 415). Responses follow the
``_format`` parameter when present, else ``Accept`` (q-values honoured; nothing we can write: 406);
JSON is the default. Error responses are negotiated the same way, falling back to JSON when the
request asked for something we cannot write. See https://hl7.org/fhir/R4/http.html#mime-type.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from fastapi import Request, Response

from adapter.errors import InputError, InputTooLargeError, NotAcceptable, UnsupportedMediaType
from adapter.fhir import json_format, xml_format

__all__ = [
    "Format",
    "NotAcceptable",
    "UnsupportedMediaType",
    "error_format",
    "read_body",
    "read_resource",
    "render",
    "response_format",
]

Format = Literal["json", "xml"]


_MEDIA_TYPES: dict[str, Format] = {
    "application/fhir+json": "json",
    "application/json": "json",
    "application/fhir+xml": "xml",
    "application/xml": "xml",
}
# _format also takes the short names and text/xml (https://hl7.org/fhir/R4/http.html#mime-type).
_FORMAT_PARAMETER: dict[str, Format] = {**_MEDIA_TYPES, "json": "json", "xml": "xml", "text/xml": "xml"}
# Wildcards in Accept; anything else we write as JSON by default.
_WILDCARDS: dict[str, Format] = {"*/*": "json", "application/*": "json"}

_CONTENT_TYPES: dict[Format, str] = {
    "json": "application/fhir+json; charset=utf-8",
    "xml": "application/fhir+xml; charset=utf-8",
}


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


# Clients send the same few Accept values on every request: each is parsed once.
@lru_cache(maxsize=256)
def _from_accept(accept: str) -> Format | None:
    """The best format for an Accept header (RFC 9110 section 12.5.1), or None if none is acceptable."""
    best: tuple[float, int, Format] | None = None
    for position, item in enumerate(accept.split(",")):
        media_type, *parameters = (part.strip() for part in item.split(";"))
        media_type = media_type.lower()
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        fmt = _MEDIA_TYPES.get(media_type) or _WILDCARDS.get(media_type)
        if fmt is None or quality <= 0:
            continue
        # Higher quality wins; on a tie, the one listed first.
        if best is None or (quality, -position) > (best[0], best[1]):
            best = (quality, -position, fmt)
    return None if best is None else best[2]


def response_format(request: Request) -> Format:
    """The format of the response to ``request``; :class:`NotAcceptable` when we can write none asked for."""
    # Most requests have no query string: then there is no _format to parse one for.
    parameter = request.query_params.get("_format") if request.scope.get("query_string") else None
    if parameter is not None:
        # An unencoded '+' in a query string arrives as a space ('application/fhir+json').
        fmt = _FORMAT_PARAMETER.get(_media_type(parameter.replace(" ", "+")))
        if fmt is None:
            raise NotAcceptable(f"_format {parameter!r} is not supported; use json or xml", expression="_format")
        return fmt
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return "json"
    fmt = _from_accept(accept)
    if fmt is None:
        raise NotAcceptable(f"none of the formats in Accept ({accept}) is supported; use FHIR JSON or XML")
    return fmt


def error_format(request: Request) -> Format:
    """The format for an error response: as negotiated, or JSON when negotiation itself fails."""
    try:
        return response_format(request)
    except NotAcceptable:
        return "json"


async def read_body(request: Request, max_bytes: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdecimal() and int(length) > max_bytes:
        raise InputTooLargeError(f"request body larger than {max_bytes:,} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise InputTooLargeError(f"request body larger than {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_resource(request: Request, max_bytes: int) -> dict[str, Any]:
    """The resource in the request body, parsed from FHIR JSON or XML as its Content-Type says."""
    content_type = request.headers.get("content-type")
    fmt = _MEDIA_TYPES.get(_media_type(content_type or ""))
    if fmt is None:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not supported; use application/fhir+json or application/fhir+xml"
        )
    body = await read_body(request, max_bytes)
    if not body.strip():
        raise InputError("the request has no body; a resource is required")
    resource = json_format.loads(body) if fmt == "json" else xml_format.loads(body)
    if not isinstance(resource, dict):
        raise InputError("the request body is not a resource (a JSON object)")
    return resource


def render(
    resource: dict[str, Any] | None, fmt: Format, status: int, headers: dict[str, str] | None = None
) -> Response:
    """A response with ``resource`` written in ``fmt``, or with no body when ``resource`` is None."""
    if resource is None:
        return Response(status_code=status, headers=headers)
    body = json_format.dumps(resource) if fmt == "json" else xml_format.dumps(resource)
    return Response(body, status_code=status, headers=headers, media_type=_CONTENT_TYPES[fmt])
