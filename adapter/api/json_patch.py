"""JSON Patch (RFC 6902) for ``PATCH [type]/[id]`` (https://hl7.org/fhir/R4/http.html#patch), on the
``jsonpatch`` library.

A patch that cannot be read is a bad request (400); one that cannot be applied to the resource (a
path that is not there, a failed ``test``) is unprocessable (422); so is one that changes the
resource's type or id. Errors name the patched element as FHIRPath (``/name/0/family`` is
``Patient.name[0].family``).
"""

from __future__ import annotations

from typing import Any

import jsonpatch
import jsonpointer

from adapter.errors import InputError, ParseError, ValidationFailed
from adapter.fhir import json_format

__all__ = ["JSON_PATCH", "apply", "parse"]

JSON_PATCH = "application/json-patch+json"

_OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})


def _fhirpath(type: str, pointer: str) -> str:
    """A JSON Pointer into a resource as a FHIRPath expression."""
    path = type
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        path += f"[{token}]" if token.isdecimal() else f".{token}"
    return path


def parse(body: bytes) -> list[dict[str, Any]]:
    """The operations of a JSON Patch document; :class:`InputError` when it is not one."""
    try:
        document = json_format.loads(body)
    except ParseError as exc:
        raise InputError(f"the JSON Patch is not JSON: {exc.message}", expression="patch") from exc
    if not isinstance(document, list):
        raise InputError("a JSON Patch is a JSON array of operations", expression="patch")
    for n, operation in enumerate(document):
        if (
            not isinstance(operation, dict)
            or operation.get("op") not in _OPS
            or not isinstance(operation.get("path"), str)
        ):
            raise InputError(
                f"operation {n} of the JSON Patch needs an op ({', '.join(sorted(_OPS))}) and a path",
                expression=f"patch[{n}]",
            )
    return document


def _fail(type: str, message: str, pointer: str | None) -> ValidationFailed:
    issue: dict[str, Any] = {"severity": "error", "code": "processing", "diagnostics": message}
    issue["expression"] = [_fhirpath(type, pointer or "")]
    return ValidationFailed(message, [issue])


def apply(resource: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """``resource`` patched (a new object); :class:`ValidationFailed` (422) when the patch does not apply."""
    type = resource["resourceType"]
    patched = resource
    for operation in operations:
        try:
            patched = jsonpatch.JsonPatch([operation]).apply(patched)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise _fail(type, f"the patch's test failed: {exc}", operation["path"]) from exc
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise _fail(type, f"the patch does not apply: {exc}", operation["path"]) from exc
        except TypeError as exc:  # a path through a primitive value
            raise _fail(type, f"the patch does not apply: {exc}", operation["path"]) from exc
    if not isinstance(patched, dict) or patched.get("resourceType") != type or patched.get("id") != resource["id"]:
        raise _fail(type, "a patch may not change the resource's type or id", "/id")
    return patched
