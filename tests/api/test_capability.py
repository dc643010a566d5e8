"""The CapabilityStatement declares exactly what the routing table serves (style rule 4)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Route

from adapter.api.interactions import BASE, ROUTES
from adapter.fhir import xml_format
from adapter.fhir.model import value_set_codes
from adapter.validation.structure import StructuralValidator
from tests.api.conftest import FHIR_XML

pytestmark = pytest.mark.anyio


def resource_types_value_set() -> frozenset[str]:
    codes = value_set_codes("http://hl7.org/fhir/ValueSet/resource-types")
    assert codes is not None
    return frozenset().union(*codes.values())


async def statement(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def test_the_statement_is_a_valid_r4_server_statement_in_json_and_xml(client: httpx.AsyncClient) -> None:
    body = await statement(client)
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    assert body["kind"] == "instance"
    assert body["format"] == ["json", "xml"]
    assert body["implementation"]["url"] == "http://test/fhir"
    assert [rest["mode"] for rest in body["rest"]] == ["server"]
    assert [issue.diagnostics for issue in StructuralValidator().validate(body) if issue.is_error] == []

    as_xml = await client.get("/fhir/metadata", headers={"Accept": FHIR_XML})
    assert as_xml.headers["content-type"].startswith(FHIR_XML)
    parsed = xml_format.loads(as_xml.content)
    assert {key: value for key, value in parsed.items() if key != "date"} == {
        key: value for key, value in body.items() if key != "date"
    }


async def test_every_r4_resource_type_is_listed_once(client: httpx.AsyncClient) -> None:
    listed = [resource["type"] for resource in (await statement(client))["rest"][0]["resource"]]
    assert len(listed) == len(set(listed))
    # The R4 resource types: the codes of the ValueSet that CapabilityStatement.rest.resource.type binds to.
    assert set(listed) == set(resource_types_value_set()) - {"Resource", "DomainResource"}
    assert "Patient" in listed and "Bundle" in listed


async def test_the_interactions_are_exactly_those_of_the_routing_table(client: httpx.AsyncClient) -> None:
    rest = (await statement(client))["rest"][0]
    per_type = {
        route.interaction
        for route in ROUTES
        if route.level in ("type", "instance") and not route.interaction.startswith("$")
    }
    assert per_type == {
        "read",
        "vread",
        "create",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "search-type",
    }
    for resource in rest["resource"]:
        assert sorted(item["code"] for item in resource["interaction"]) == sorted(per_type), resource["type"]
        assert [op["name"] for op in resource["operation"]] == ["validate"]
    system = {
        code
        for route in ROUTES
        if route.level == "system" and not route.interaction.startswith("$")
        for code in (route.interaction, *route.also)
    } - {"capabilities"}
    assert {item["code"] for item in rest["interaction"]} == system == {"history-system", "transaction", "batch"}
    operations = {route.interaction[1:] for route in ROUTES if route.level == "system" and route.interaction[0] == "$"}
    assert {item["name"] for item in rest["operation"]} == operations
    assert "ingest" in operations
    ingest = next(item for item in rest["operation"] if item["name"] == "ingest")
    assert ingest["definition"] == "https://sp-fhir-adapter.org/fhir/OperationDefinition/ingest"
    statement_messaging = (await statement(client))["messaging"]
    assert statement_messaging == [
        {
            "supportedMessage": [
                {
                    "mode": "receiver",
                    "definition": "https://sp-fhir-adapter.org/fhir/MessageDefinition/sp-referral-request",
                }
            ]
        }
    ]


async def test_search_parameters_are_declared_per_type_from_the_r4_definitions(client: httpx.AsyncClient) -> None:
    resources = {resource["type"]: resource for resource in (await statement(client))["rest"][0]["resource"]}
    patient = {param["name"]: param for param in resources["Patient"]["searchParam"]}
    assert patient["identifier"] == {
        "name": "identifier",
        "definition": "http://hl7.org/fhir/SearchParameter/Patient-identifier",
        "type": "token",
    }
    assert {"_id", "_lastUpdated", "name", "birthdate", "general-practitioner"} <= set(patient)
    service_request = {param["name"] for param in resources["ServiceRequest"]["searchParam"]}
    assert {"patient", "subject", "authored", "status", "identifier", "requester"} <= service_request
    # Composite parameters are not supported, so not declared.
    observation = {param["name"]: param["type"] for param in resources["Observation"]["searchParam"]}
    assert "code-value-quantity" not in observation and observation["value-quantity"] == "quantity"
    assert "ServiceRequest:patient" in resources["ServiceRequest"]["searchInclude"]
    assert "Task:focus" in resources["ServiceRequest"]["searchRevInclude"]
    assert resources["Patient"]["conditionalCreate"] is True and resources["Patient"]["conditionalUpdate"] is True
    # The profiles $validate and write enforcement know: ours and UK Core's.
    assert {
        "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Patient",
        "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient",
    } <= set(resources["Patient"]["supportedProfile"])
    assert "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Goal" in resources["Goal"]["supportedProfile"]


async def test_every_route_of_the_table_is_served_by_the_app(app: FastAPI) -> None:
    served = {
        (method, route.path, route.endpoint.handler)  # type: ignore[attr-defined]
        for route in app.router.routes
        if isinstance(route, Route) and hasattr(route.endpoint, "handler")
        for method in route.methods or ()
        # Starlette adds HEAD to every GET route; the table's own HEAD route comes first.
        if not (method == "HEAD" and "GET" in (route.methods or ()))
    }
    assert served == {(route.method, BASE + route.path, route.handler) for route in ROUTES}
