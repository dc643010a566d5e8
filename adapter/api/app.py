"""The FastAPI app factory: the FHIR R4 REST API over an injected store and validator.

See https://hl7.org/fhir/R4/http.html. Routes come from the one table in
:mod:`adapter.api.interactions`; errors are rendered by :mod:`adapter.api.outcomes`.

Per request, two costs are avoided (CPU time, measured in-process): FastAPI's native OpenTelemetry
is off, whose check for configured providers ran on every request (about 3 µs; the server offers no
tracing), and :class:`_Dispatch` finds a request's route among the few with its method and number of
segments instead of trying every route's regex in turn (a read's route was the 18th tried: about
10 µs, a quarter of a read).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from starlette._utils import get_route_path  # the path Route.matches matches, so the same here
from starlette.convertors import StringConvertor
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound, Route
from starlette.types import Receive, Scope, Send

from adapter.api import outcomes
from adapter.api.interactions import BASE, ROUTES, Services
from adapter.mapping.run import MappingPool
from adapter.store import ResourceStore
from adapter.validation import Validator
from adapter.validation.base import Issue
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator
from adapter.validation.structure import StructuralValidator

__all__ = ["create_app"]

_log = logging.getLogger("adapter.api")


def _endpoint(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint calling ``handler(request, **path parameters)``."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, **request.path_params)

    endpoint.handler = handler  # type: ignore[attr-defined]
    return endpoint


class _Dispatch(BaseRoute):
    """The router's first route: the route Starlette's in-order scan would pick for a request,
    found among the routes that serve its method with as many ``/`` in their path (a parameter
    matches one non-empty segment, so no other route can match), each tried with its own regex, in
    table order. Only full matches are answered here; anything else (404, 405 with its ``Allow``,
    a redirect for a trailing slash) is left to the scan of the routes that follow, as before."""

    def __init__(self, routes: list[Route]) -> None:
        self._candidates: dict[tuple[str, int], list[Route]] = {}
        for route in routes:
            if not all(isinstance(c, StringConvertor) for c in route.param_convertors.values()):
                raise ValueError(f"{route.path}: only plain {{name}} parameters (one segment each) are dispatched")
            for method in route.methods or ():
                self._candidates.setdefault((method, route.path.count("/")), []).append(route)
        self._routes = {route.endpoint: route for route in routes}

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            path = get_route_path(scope)
            for route in self._candidates.get((scope["method"], path.count("/")), ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    return match, child_scope
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._routes[scope["endpoint"]].handle(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)  # the routes themselves build their URLs


class _WarnOnProfiles:
    """Writes checked structurally; what the declared profiles say is logged, not enforced."""

    def __init__(self, structural: Validator, profiles: Validator) -> None:
        self.structural = structural
        self.profiles = profiles

    def validate(self, resource: Any, profiles: Sequence[str] = ()) -> list[Issue]:
        issues = self.structural.validate(resource, profiles)
        if not any(issue.is_error for issue in issues):
            for issue in self.profiles.validate(resource, profiles):
                if issue.is_error:
                    _log.warning(
                        "profile issue accepted (SPFHIR_PROFILES=warn): %s at %s", issue.diagnostics, issue.expression
                    )
        return issues


def create_app(
    store: ResourceStore,
    *,
    validator: Validator | None = None,
    profile_validator: Validator | None = None,
    profiles: Literal["enforce", "warn", "off"] = "enforce",
    default_profiles: dict[str, list[str]] | None = None,
    max_body_bytes: int = 10_000_000,
    ingest_processes: int = 1,
    mapping_pool: MappingPool | None = None,
) -> FastAPI:
    """The API under ``/fhir``.

    Writes are checked by ``validator`` when given; otherwise as ``profiles`` says: ``enforce`` (the
    default) rejects a resource that breaks R4 or a profile it declares in ``meta.profile`` (422),
    ``warn`` rejects only R4 errors and logs profile errors, ``off`` checks R4 only;
    ``default_profiles`` (type -> profile URLs) apply to resources that declare none.
    ``profile_validator`` (default: the bundled packages, our profiles and UK Core) serves
    ``$validate`` and ``$ingest``. The caller owns ``store`` and closes it.

    Large ``$ingest`` requests are mapped in ``ingest_processes`` worker processes, started on the
    first and stopped when the app shuts down (or, where its lifespan does not run, when the
    interpreter exits), or in ``mapping_pool`` when given (its owner closes it). The workers load
    the bundled profiles themselves, so with a ``profile_validator`` given and no ``mapping_pool``,
    every request is mapped in this process.
    """
    structural = StructuralValidator()
    owned: MappingPool | None = None
    if profile_validator is None:
        profile_validator = ProfileValidator(bundled_packages(), structural=structural, defaults=default_profiles)
        if mapping_pool is None and ingest_processes > 0:
            # Below the server's priority: each write is handed between the server's threads (event
            # loop, store writer), and each handoff waits for a core that a busy process of equal
            # priority holds: on 2 cores that halved the ingest rate; at nice 10, 10% less (#5).
            mapping_pool = owned = MappingPool(ingest_processes, default_profiles, nice=10)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned is not None:
                owned.close()

    app = FastAPI(
        title="sp-fhir-adapter FHIR R4 API",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    if validator is None:
        if profiles == "enforce":
            validator = profile_validator
        elif profiles == "warn":
            validator = _WarnOnProfiles(structural, profile_validator)
        else:
            validator = structural
    app.state.services = Services(store, validator, max_body_bytes, profile_validator, mapping_pool)
    # Plain Starlette routes: the handlers read what they need from the request themselves,
    # so FastAPI's per-request parameter machinery would only cost time (about 0.1 ms).
    routes = [
        Route(BASE + route.path, _endpoint(route.handler), methods=[route.method], name=route.interaction)
        for route in ROUTES
    ]
    app.router.routes += [_Dispatch(routes), *routes]
    outcomes.install(app)
    return app
