"""The server's CapabilityStatement, built from the routing table so the two cannot drift apart.

See https://hl7.org/fhir/R4/capabilitystatement.html and https://hl7.org/fhir/R4/http.html#capabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from adapter import software_version
from adapter.fhir import model
from adapter.fhir.model import value_set_codes
from adapter.search.parameters import parameters_for

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


@cache
def _search_params(type: str) -> tuple[dict[str, str], ...]:
    return tuple(
        {"name": param.code, "definition": param.url, "type": param.type}
        for param in sorted(parameters_for(type).values(), key=lambda p: p.code)
        if param.supported
    )


@cache
def _includes(type: str) -> tuple[list[str], list[str]]:
    """``_include`` values of ``type``, and ``_revinclude`` values that point at it."""
    includes = [f"{type}:{p['name']}" for p in _search_params(type) if p["type"] == "reference"]
    revincludes = [
        f"{other}:{param.code}"
        for other in sorted(resource_types())
        for param in sorted(parameters_for(other).values(), key=lambda p: p.code)
        if param.type == "reference" and param.supported and (not param.targets or type in param.targets)
    ]
    return includes, revincludes


@cache
def _supported_profiles() -> dict[str, list[str]]:
    """Resource type -> the profiles of the bundled packages (ours and UK Core) for it, which
    ``$validate`` and profile enforcement of writes check against."""
    from adapter.validation.bundled import bundled_packages

    found: dict[str, list[str]] = {}
    for definition in bundled_packages().structure_definitions():
        if definition.get("kind") == "resource" and definition.get("derivation") == "constraint":
            found.setdefault(definition["type"], []).append(definition["url"])
    return {type: sorted(urls) for type, urls in found.items()}


#: What ``$process-message`` takes (``conformance/MessageDefinition-sp-referral-request.json``).
_REFERRAL_MESSAGE_DEFINITION = "https://sp-fhir-adapter.org/fhir/MessageDefinition/sp-referral-request"

# System-level operations and their definitions: the R4 one, or ours in conformance/.
_SYSTEM_OPERATIONS = {
    "process-message": "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
    "ingest": "https://sp-fhir-adapter.org/fhir/OperationDefinition/ingest",
}


def capability_statement(routes: Iterable[Route], base_url: str) -> dict[str, Any]:
    """A CapabilityStatement (kind ``instance``) that declares exactly the interactions of ``routes``.

    Every R4 resource type supports every type- and instance-level interaction in the table, with
    the search parameters of :mod:`adapter.search.parameters` that the store supports, and the
    profiles of the bundled packages as supported profiles.
    """
    routes = list(routes)
    per_type = list(
        dict.fromkeys(
            route.interaction for route in routes if route.level != "system" and not route.interaction.startswith("$")
        )
    )
    operations = sorted(
        {route.interaction[1:] for route in routes if route.interaction.startswith("$") and route.level != "system"}
    )
    system_operations = sorted(
        {route.interaction[1:] for route in routes if route.interaction.startswith("$") and route.level == "system"}
    )
    system = list(
        dict.fromkeys(
            code for route in routes for code in (route.interaction, *route.also) if code in _SYSTEM_INTERACTIONS
        )
    )
    searching = "search-type" in per_type
    resource = []
    for type in sorted(resource_types()):
        entry: dict[str, Any] = {
            "type": type,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{type}",
            "interaction": [{"code": code} for code in per_type],
            **({"supportedProfile": _supported_profiles()[type]} if type in _supported_profiles() else {}),
            "versioning": "versioned-update",
            "readHistory": "vread" in per_type,
            "updateCreate": "update" in per_type,
            "conditionalCreate": "create" in per_type,
            "conditionalUpdate": "update" in per_type,
        }
        if searching:
            includes, revincludes = _includes(type)
            if includes:
                entry["searchInclude"] = includes
            if revincludes:
                entry["searchRevInclude"] = revincludes
            entry["searchParam"] = list(_search_params(type))
        if operations:
            entry["operation"] = [
                {"name": name, "definition": f"http://hl7.org/fhir/OperationDefinition/Resource-{name}"}
                for name in operations
            ]
        resource.append(entry)
    rest: dict[str, Any] = {"mode": "server", "resource": resource}
    if system:
        rest["interaction"] = [{"code": code} for code in system]
    if system_operations:
        rest["operation"] = [
            {
                "name": name,
                "definition": _SYSTEM_OPERATIONS.get(name, f"http://hl7.org/fhir/OperationDefinition/{name}"),
            }
            for name in system_operations
        ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        # The statement describes this running instance, as it is now.
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": "instance",
        "software": {"name": "sp-fhir-adapter", "version": software_version()},
        "implementation": {"description": "Social prescribing FHIR R4 adapter", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "xml"],
        "rest": [rest],
        # The messages $process-message receives (https://hl7.org/fhir/R4/capabilitystatement-definitions.html#CapabilityStatement.messaging).
        **(
            {"messaging": [{"supportedMessage": [{"mode": "receiver", "definition": _REFERRAL_MESSAGE_DEFINITION}]}]}
            if "process-message" in system_operations
            else {}
        ),
    }
