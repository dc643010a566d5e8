"""What the handlers share: the service base URL and the version headers, computed once per repeat."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any

import pytest
from starlette.requests import Request

from adapter.api.context import BASE, base_url, version_headers


def request(host: str | None, server: Any = ("10.0.0.1", 8000), scheme: str = "http", root_path: str = "") -> Request:
    headers = [(b"accept", b"*/*")] + ([] if host is None else [(b"host", host.encode("latin-1"))])
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": scheme,
        "server": server,
        "root_path": root_path,
        "path": root_path + "/fhir/Patient/1",
        "query_string": b"_format=json",
        "headers": headers,
    }
    return Request(scope)


@pytest.mark.parametrize(
    "made",
    [
        request("example.org"),
        request("example.org:8443", scheme="https"),
        request("example.org:443", scheme="https"),
        request(None),
        request(None, server=("::1", 80)),
        request(None, server=None),
        request(None, server=["10.0.0.2", 8080]),  # ASGI allows any iterable
        request("bad host header with spaces"),
        request("example.org", root_path="/api/v1"),
        request("example.org", root_path="/api/"),
        request("[::1]:8000"),
    ],
)
def test_the_base_url_is_the_request_base_url_under_base(made: Request) -> None:
    expected = str(made.base_url).rstrip("/") + BASE
    assert base_url(made) == expected
    assert base_url(made) == expected  # the second time from the cache


@pytest.mark.parametrize(
    "last_updated",
    [
        "2026-01-02T03:04:05.678Z",
        "2026-01-02T03:04:05.999Z",
        "2026-01-02T03:04:06.000Z",
        "1999-12-31T23:59:59.000Z",
        "2026-01-02T03:04:05Z",
        "2026-01-02T03:04:05.678+00:00",
        "2026-01-02T03:04:05.123456Z",
    ],
)
def test_last_modified_is_the_http_date_of_last_updated(last_updated: str) -> None:
    resource = {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3", "lastUpdated": last_updated}}
    expected = format_datetime(datetime.fromisoformat(last_updated), usegmt=True)
    assert version_headers(resource) == {"ETag": 'W/"3"', "Last-Modified": expected}
    assert version_headers(resource, "http://x/fhir") == {
        "ETag": 'W/"3"',
        "Last-Modified": expected,
        "Location": "http://x/fhir/Patient/p1/_history/3",
    }
