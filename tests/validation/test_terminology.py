"""Terminology: local expansions, and a terminology server asked with $validate-code (respx for the
server: there is no SNOMED CT terminology server to run locally), OAuth2 client credentials, caching."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import respx

from adapter.validation.packages import PackageSet
from adapter.validation.terminology import ChainedTerminology, LocalTerminology, RemoteTerminology

TX = "https://tx.example/fhir"
ECL = "https://fhir.hl7.org.uk/ValueSet/UKCore-ServiceRequestReasonCode"


def result(value: bool) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "result", "valueBoolean": value}]}


def test_local_expansions_from_the_vendored_ukcore_package() -> None:
    from adapter.validation.bundled import bundled_packages

    local = LocalTerminology(bundled_packages().resource)
    system = "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland"
    value_set = "https://fhir.hl7.org.uk/ValueSet/UKCore-NHSNumberVerificationStatus"
    assert local.contains(value_set, system, "01") is True
    assert local.contains(value_set, system, "99") is False
    assert local.contains(value_set, None, "02") is True  # a bare code
    assert local.contains(value_set, "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "NI") is True
    assert local.contains(value_set, "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "UNK") is False
    assert local.contains(ECL, "http://snomed.info/sct", "22298006") is None  # SNOMED ECL: not checked
    # R4 core ValueSets come from the compiled model.
    assert local.contains(
        "http://hl7.org/fhir/ValueSet/administrative-gender", "http://hl7.org/fhir/administrative-gender", "female"
    )


@respx.mock
def test_the_server_answers_what_the_local_expansion_cannot_and_is_asked_once() -> None:
    route = respx.get(f"{TX}/ValueSet/$validate-code").mock(return_value=httpx.Response(200, json=result(True)))
    chained = ChainedTerminology(LocalTerminology(PackageSet().resource), RemoteTerminology(TX))
    assert chained.contains(ECL, "http://snomed.info/sct", "22298006") is True
    assert chained.contains(ECL, "http://snomed.info/sct", "22298006") is True
    assert route.call_count == 1
    assert route.calls[0].request.url.params["url"] == ECL
    assert route.calls[0].request.url.params["code"] == "22298006"


@respx.mock
def test_client_credentials_token_and_renewal_after_401() -> None:
    tokens = iter(["first", "second"])
    token = respx.post("https://auth.example/token").mock(
        side_effect=lambda request: httpx.Response(200, json={"access_token": next(tokens), "token_type": "bearer"})
    )
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(401) if len(seen) == 1 else httpx.Response(200, json=result(False))

    respx.get(f"{TX}/ValueSet/$validate-code").mock(side_effect=answer)
    remote = RemoteTerminology(TX, token_url="https://auth.example/token", client_id="id", client_secret="secret")
    assert remote.contains(ECL, "http://snomed.info/sct", "1") is False
    assert seen == ["Bearer first", "Bearer second"]
    assert token.call_count == 2
    assert token.calls[0].request.headers["authorization"].startswith("Basic ")
    assert b"grant_type=client_credentials" in token.calls[0].request.content


@respx.mock
@pytest.mark.parametrize("failure", [httpx.Response(500), httpx.ConnectError("refused"), httpx.Response(200, json={})])
def test_a_failing_server_means_not_checked_never_a_pass(failure: Any) -> None:
    route = respx.get(f"{TX}/ValueSet/$validate-code")
    if isinstance(failure, Exception):
        route.mock(side_effect=failure)
    else:
        route.mock(return_value=failure)
    remote = RemoteTerminology(TX)
    assert remote.contains(ECL, "http://snomed.info/sct", "1") is None
