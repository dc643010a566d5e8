"""The server's CapabilityStatement, built from the routing table so the two cannot drift apart.

See https://hl7.org/fhir/R4/capabilitystatement.html and https://hl7.org/fhir/R4/http.html#capabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from adapter.fhir import model
from adapter.fhir.model import value_set_codes

if TYPE_CHECKING:
    from adapter.api.interactions import Route

__all__ = ["capability_statement", "resource_types"]

# Interactions that CapabilityStatement.rest.interaction may list
# (http://hl7.org/fhir/ValueSet/system-restful-interaction); "capabilities" is the statement itself.
_SYSTEM_INTERACTIONS = ("transaction", "batch", "search-system", "history-system")


@cache
def resource_types() -> frozenset[str]:
    """The R4 resource types the API serves.

    The official 4.0.1 package defines ``SubscriptionStatus`` as well, but it is not an R4 resource
    type (it is absent from http://hl7.org/fhir/ValueSet/resource-types, and a CapabilityStatement
    may not name it), so the compiled model's types are limited to the codes of that ValueSet.
    """
    codes = value_set_codes("http://hl7.org/fhir/ValueSet/resource-types") or {}
    return model.resource_types() & frozenset().union(*codes.values())


def _software_version() -> str:
    try:
        return version("sp-fhir-adapter")
    except PackageNotFoundError:
        return "unknown"


def capability_statement(routes: Iterable[Route], base_url: str) -> dict[str, Any]:
    """A CapabilityStatement (kind ``instance``) that declares exactly the interactions of ``routes``.

    Every R4 resource type supports every type- and instance-level interaction in the table.
    """
    routes = list(routes)
    per_type = [route.interaction for route in routes if route.level != "system"]
    system = [route.interaction for route in routes if route.interaction in _SYSTEM_INTERACTIONS]
    resource = [
        {
            "type": type,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{type}",
            "interaction": [{"code": code} for code in per_type],
            "versioning": "versioned-update",
            "readHistory": "vread" in per_type,
            "updateCreate": "update" in per_type,
        }
        for type in sorted(resource_types())
    ]
    rest: dict[str, Any] = {"mode": "server", "resource": resource}
    if system:
        rest["interaction"] = [{"code": code} for code in system]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        # The statement describes this running instance, as it is now.
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": "instance",
        "software": {"name": "sp-fhir-adapter", "version": _software_version()},
        "implementation": {"description": "Social prescribing FHIR R4 adapter", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "xml"],
        "rest": [rest],
    }
