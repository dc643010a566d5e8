"""Operations: ``$validate`` (https://hl7.org/fhir/R4/resource-operation-validate.html).

``POST [type]/$validate`` and ``POST [type]/[id]/$validate`` take the resource as the body or as the
``resource`` parameter of a Parameters body, with optional ``profile`` and ``mode`` (create, update,
delete) parameters (also accepted in the URL); ``GET [type]/[id]/$validate`` validates the stored
resource. The answer is 200 with an OperationOutcome of every issue, valid or not (the operation
worked); 4xx only when the request itself is wrong. Profiles come from the bundled packages (our
profiles and UK Core) through :class:`~adapter.validation.profiles.ProfileValidator`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from adapter.api.context import check_id, check_type, services
from adapter.api.negotiation import read_resource, render, response_format
from adapter.errors import InputError
from adapter.store import Resource
from adapter.validation.base import operation_outcome

__all__ = ["validate_instance", "validate_stored", "validate_type"]

_MODES = ("create", "update", "delete")


def _parameters(body: Resource) -> tuple[Resource | None, list[str], str | None]:
    """(resource, profiles, mode) from a Parameters body."""
    resource: Resource | None = None
    profiles: list[str] = []
    mode: str | None = None
    for parameter in body.get("parameter") or ():
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name == "resource" and isinstance(parameter.get("resource"), dict):
            resource = parameter["resource"]
        elif name == "profile" and isinstance(parameter.get("valueUri") or parameter.get("valueCanonical"), str):
            profiles.append(parameter.get("valueUri") or parameter["valueCanonical"])
        elif name == "mode" and isinstance(parameter.get("valueCode"), str):
            mode = parameter["valueCode"]
    return resource, profiles, mode


async def _validate(request: Request, type: str, id: str | None, resource: Resource | None) -> Response:
    fmt = response_format(request)
    profiles = request.query_params.getlist("profile")
    mode = request.query_params.get("mode")
    if resource is not None and resource.get("resourceType") == "Parameters":
        resource, more, body_mode = _parameters(resource)
        profiles += more
        mode = body_mode or mode
    if mode is not None and mode not in _MODES:
        raise InputError(f"mode {mode!r} is not one of {', '.join(_MODES)}", expression="mode")
    found = services(request)
    if mode == "delete":
        if id is None:
            raise InputError("mode=delete needs a resource id: [type]/[id]/$validate", expression="mode")
        await found.store.read(type, id)  # 404/410 when there is nothing to delete
        return render(operation_outcome([]), fmt, 200)
    if resource is None:
        if id is None:
            raise InputError("$validate needs a resource: the body, or the resource parameter", expression="resource")
        resource = await found.store.read(type, id)
    if resource.get("resourceType") != type:
        raise InputError(
            f"the resource is a {resource.get('resourceType')!r}, not a {type}", expression="resource.resourceType"
        )
    if id is not None and mode == "update" and resource.get("id") != id:
        raise InputError(f"for mode=update the resource's id must be {id!r}", expression="resource.id")
    issues = found.profile_validator.validate(resource, profiles)
    return render(operation_outcome(issues), fmt, 200)


async def _body(request: Request) -> dict[str, Any]:
    return await read_resource(request, services(request).max_body_bytes)


async def validate_type(request: Request, type: str) -> Response:
    """``POST [type]/$validate``"""
    response_format(request)
    check_type(type)
    return await _validate(request, type, None, await _body(request))


async def validate_instance(request: Request, type: str, id: str) -> Response:
    """``POST [type]/[id]/$validate``: the body's resource, or the stored one for an empty body."""
    response_format(request)
    check_type(type)
    check_id(id)
    has_body = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    return await _validate(request, type, id, await _body(request) if has_body else None)


async def validate_stored(request: Request, type: str, id: str) -> Response:
    """``GET [type]/[id]/$validate``: the stored resource."""
    response_format(request)
    check_type(type)
    check_id(id)
    return await _validate(request, type, id, None)
