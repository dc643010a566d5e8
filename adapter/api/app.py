"""The FastAPI app factory: the FHIR R4 REST API over an injected store and validator.

See https://hl7.org/fhir/R4/http.html. Routes come from the one table in
:mod:`adapter.api.interactions`; errors are rendered by :mod:`adapter.api.outcomes`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from starlette.routing import Route

from adapter.api import outcomes
from adapter.api.interactions import BASE, ROUTES, Services
from adapter.store import ResourceStore
from adapter.validation import Validator
from adapter.validation.structure import StructuralValidator

__all__ = ["create_app"]


def _endpoint(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint calling ``handler(request, **path parameters)``."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, **request.path_params)

    endpoint.handler = handler  # type: ignore[attr-defined]
    return endpoint


def create_app(
    store: ResourceStore,
    *,
    validator: Validator | None = None,
    max_body_bytes: int = 10_000_000,
) -> FastAPI:
    """The API under ``/fhir``; every write is checked by ``validator`` (default: structural R4).

    The caller owns ``store`` and closes it.
    """
    app = FastAPI(title="sp-fhir-adapter FHIR R4 API", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.services = Services(store, validator or StructuralValidator(), max_body_bytes)
    for route in ROUTES:
        # Plain Starlette routes: the handlers read what they need from the request themselves,
        # so FastAPI's per-request parameter machinery would only cost time (about 0.1 ms).
        app.router.routes.append(
            Route(BASE + route.path, _endpoint(route.handler), methods=[route.method], name=route.interaction)
        )
    outcomes.install(app)
    return app
