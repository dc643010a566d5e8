"""The FastAPI app factory: the FHIR R4 REST API over an injected store and validator.

See https://hl7.org/fhir/R4/http.html. Routes come from the one table in
:mod:`adapter.api.interactions`; errors are rendered by :mod:`adapter.api.outcomes`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from starlette.routing import Route

from adapter.api import outcomes
from adapter.api.interactions import BASE, ROUTES, Services
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
) -> FastAPI:
    """The API under ``/fhir``.

    Writes are checked by ``validator`` when given; otherwise as ``profiles`` says: ``enforce`` (the
    default) rejects a resource that breaks R4 or a profile it declares in ``meta.profile`` (422),
    ``warn`` rejects only R4 errors and logs profile errors, ``off`` checks R4 only;
    ``default_profiles`` (type -> profile URLs) apply to resources that declare none.
    ``profile_validator`` (default: the bundled packages, our profiles and UK Core) serves
    ``$validate``. The caller owns ``store`` and closes it.
    """
    app = FastAPI(title="sp-fhir-adapter FHIR R4 API", openapi_url=None, docs_url=None, redoc_url=None)
    structural = StructuralValidator()
    if profile_validator is None:
        profile_validator = ProfileValidator(bundled_packages(), structural=structural, defaults=default_profiles)
    if validator is None:
        if profiles == "enforce":
            validator = profile_validator
        elif profiles == "warn":
            validator = _WarnOnProfiles(structural, profile_validator)
        else:
            validator = structural
    app.state.services = Services(store, validator, max_body_bytes, profile_validator)
    for route in ROUTES:
        # Plain Starlette routes: the handlers read what they need from the request themselves,
        # so FastAPI's per-request parameter machinery would only cost time (about 0.1 ms).
        app.router.routes.append(
            Route(BASE + route.path, _endpoint(route.handler), methods=[route.method], name=route.interaction)
        )
    outcomes.install(app)
    return app
