"""The gpconnect-structured builder (adapter/mapping/gpconnect.py): GP Connect Access Record Structured
(STU3) Bundles -> R4 UK Core. Golden cases are in mappings/gpconnect-structured/cases/<case>/input.json."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.fhir import json_format
from adapter.mapping.base import Mapped, MappingError
from adapter.mapping.gpconnect import COLUMNS, build, flatten
from adapter.mapping.ids import deterministic_id, identity
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator

CASES_DIR = Path(__file__).resolve().parents[2] / "mappings" / "gpconnect-structured" / "cases"
CASES = sorted(path.name for path in CASES_DIR.iterdir() if (path / "input.json").is_file())
NHS = "https://fhir.nhs.uk/Id/nhs-number"
XCARE = "https://fhir.nhs.uk/Id/cross-care-setting-identifier"
SCT = "http://snomed.info/sct"
STU3 = "https://fhir.nhs.uk/STU3/StructureDefinition/"
SP_PATIENT = "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Patient"
UKCORE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-"
VERIFICATION_URL = "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus"
VERIFICATION_SYSTEM = "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland"


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator(bundled_packages())


def load(case: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json_format.loads((CASES_DIR / case / "input.json").read_bytes())
    return loaded


def resources(mapped: Mapped) -> list[dict[str, Any]]:
    return [item.resource for item in mapped.resources]


def of_type(mapped: Mapped, kind: str) -> list[dict[str, Any]]:
    return [resource for resource in resources(mapped) if resource["resourceType"] == kind]


def by_identifier(mapped: Mapped, value: str) -> dict[str, Any]:
    found = [r for r in resources(mapped) if any(i.get("value") == value for i in r.get("identifier") or ())]
    assert len(found) == 1, value
    return found[0]


def references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            yield value["reference"]
        for item in value.values():
            yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def errors(validator: ProfileValidator, resource: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(issue.expression, issue.diagnostics) for issue in validator.validate(resource) if issue.is_error]


def entry(bundle: dict[str, Any], kind: str, n: int = 0) -> dict[str, Any]:
    """The n-th resource of type ``kind`` in an STU3 Bundle (to change a fixture in a test)."""
    found: dict[str, Any] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind][n]
    return found


# -- golden cases ---------------------------------------------------------------------------------


def test_the_cases_are_there() -> None:
    assert {"full", "minimal", "unresolved-reference", "legacy-values"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_every_resource_is_valid_r4_and_conforms_to_its_profile(validator: ProfileValidator, case: str) -> None:
    mapped = build(load(case))
    assert mapped.resources
    for resource in resources(mapped):
        (profile,) = resource["meta"]["profile"]
        expected = SP_PATIENT if profile == SP_PATIENT else f"{UKCORE}{resource['resourceType']}"
        assert profile == expected
        assert errors(validator, resource) == [], resource["resourceType"]
        issues = validator.validate(resource)
        assert not [i for i in issues if "not in the loaded packages" in i.diagnostics]


@pytest.mark.parametrize("case", CASES)
def test_json_read_with_floats_gives_the_same_valid_resources(validator: ProfileValidator, case: str) -> None:
    # The engine's JSON reader uses orjson (floats); R4 decimals must come out as Decimal all the same.
    raw = json.loads((CASES_DIR / case / "input.json").read_text(encoding="utf-8"))
    mapped = build(raw)
    for resource in resources(mapped):
        assert errors(validator, resource) == []
    if case != "unresolved-reference":  # its 64.20: a Decimal keeps the trailing zero, a float cannot
        assert resources(mapped) == resources(build(load(case)))


@pytest.mark.parametrize("case", CASES)
def test_ids_are_deterministic(case: str) -> None:
    first, second = build(load(case)), build(load(case))
    assert resources(first) == resources(second)
    for item in first.resources:
        resource = item.resource
        assert item.if_none_exist and item.if_none_exist.startswith("identifier=")
        assert resource["id"] == deterministic_id(resource["resourceType"], item.if_none_exist)
    ids = [r["id"] for r in resources(first)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES)
def test_the_patient_id_is_that_of_its_nhs_number(case: str) -> None:
    bundle = load(case)
    number = next(i["value"] for i in entry(bundle, "Patient")["identifier"] if i["system"] == NHS)
    (patient,) = of_type(build(bundle), "Patient")
    assert patient["id"] == deterministic_id("Patient", identity(NHS, number))


@pytest.mark.parametrize("case", CASES)
def test_references_resolve_to_produced_resources(case: str) -> None:
    mapped = build(load(case))
    produced = {f"urn:uuid:{r['id']}": r["resourceType"] for r in resources(mapped)}
    (patient,) = of_type(mapped, "Patient")
    for resource in resources(mapped):
        for reference in references(resource):
            assert reference in produced, (resource["resourceType"], reference)
        subject = resource.get("patient" if resource["resourceType"] == "AllergyIntolerance" else "subject")
        if subject is not None:
            assert subject["reference"] == f"urn:uuid:{patient['id']}"


def test_the_full_record() -> None:
    mapped = build(load("full"))
    counts = {kind: len(of_type(mapped, kind)) for kind in ("Patient", "Organization", "Practitioner")}
    assert counts == {"Patient": 1, "Organization": 2, "Practitioner": 1}
    clinical = {kind: len(of_type(mapped, kind)) for kind in ("Condition", "ServiceRequest", "Encounter")}
    assert clinical == {"Condition": 2, "ServiceRequest": 1, "Encounter": 2}
    assert len(of_type(mapped, "Observation")) == 2
    assert len(of_type(mapped, "AllergyIntolerance")) == 1
    (patient,) = of_type(mapped, "Patient")
    (practice,) = [o for o in of_type(mapped, "Organization") if o["identifier"][0]["value"] == "A12345"]
    (gp,) = of_type(mapped, "Practitioner")
    assert practice["identifier"] == [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "A12345"}]
    assert gp["identifier"][0] == {"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "111222333444"}
    assert practice["id"] == deterministic_id("Organization", identity(practice["identifier"][0]["system"], "A12345"))
    assert gp["id"] == deterministic_id("Practitioner", identity("https://fhir.nhs.uk/Id/sds-user-id", "111222333444"))
    # The practice first (as PDS gives it), then the usual GP; the practice manages the record.
    assert patient["generalPractitioner"] == [
        {"reference": f"urn:uuid:{practice['id']}"},
        {"reference": f"urn:uuid:{gp['id']}"},
    ]
    assert patient["managingOrganization"] == {"reference": f"urn:uuid:{practice['id']}"}
    assert patient["name"][0]["family"] == "Hartley" and patient["birthDate"] == "1958-03-14"
    assert [t["system"] for t in patient["telecom"]] == ["phone", "email"]
    # Each clinical resource keeps its cross-care-setting identifier and is identified by it.
    for kind in ("Condition", "Observation", "AllergyIntolerance", "ServiceRequest", "Encounter"):
        for resource in of_type(mapped, kind):
            (identifier,) = resource["identifier"]
            assert identifier["system"] == XCARE
            assert resource["id"] == deterministic_id(kind, identity(XCARE, identifier["value"]))


def test_status_translations() -> None:
    mapped = build(load("full"))
    depression = by_identifier(mapped, "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b01")
    back_pain = by_identifier(mapped, "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b02")
    clinical = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    assert depression["clinicalStatus"] == {"coding": [{"system": clinical, "code": "active", "display": "Active"}]}
    assert back_pain["clinicalStatus"] == {"coding": [{"system": clinical, "code": "resolved", "display": "Resolved"}]}
    assert back_pain["abatementDateTime"] == "2019-06-30"
    for condition in (depression, back_pain):
        assert condition["category"] == [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                        "display": "Problem List Item",
                    }
                ]
            }
        ]
        assert condition["recordedDate"] and condition["recorder"] == condition["asserter"]
    assert depression["extension"] == [
        {
            "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-ProblemSignificance",
            "valueCode": "major",
        }
    ]
    (allergy,) = of_type(mapped, "AllergyIntolerance")
    assert allergy["clinicalStatus"]["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
            "code": "active",
            "display": "Active",
        }
    ]
    assert "verificationStatus" not in allergy  # GP Connect's fixed `unconfirmed` carries no meaning
    assert allergy["recordedDate"] == "2010-05-12T11:00:00+01:00"
    (referral,) = of_type(mapped, "ServiceRequest")
    assert (referral["status"], referral["intent"], referral["priority"]) == ("active", "order", "routine")
    assert referral["code"]["coding"][0]["code"] == "871731000000106"
    assert referral["reasonCode"][0]["coding"][0]["code"] == "35489007"
    assert referral["note"] == [{"text": "Referred to the link worker for support with isolation and low mood."}]
    encounters = {e["identifier"][0]["value"][-2:]: e for e in of_type(mapped, "Encounter")}
    assert encounters["05"]["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "AMB",
        "display": "ambulatory",
    }
    absent = {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
    }
    assert encounters["04"]["class"] == absent
    assert encounters["04"]["participant"][0]["type"][0]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
    )
    assert mapped.defaults == ["Bundle.entry[6].resource (Encounter).class=unknown (data-absent-reason)"]
    weight = by_identifier(mapped, "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b06")
    assert weight["valueQuantity"]["value"] == Decimal("72.5")
    smoking = by_identifier(mapped, "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b07")
    assert smoking["note"] == [{"text": "Stopped smoking in 2015."}]


@pytest.mark.parametrize(
    ("stu3", "r4"),
    [("suspended", "on-hold"), ("cancelled", "revoked"), ("unknown", "unknown"), ("completed", "completed")],
)
def test_referral_status(validator: ProfileValidator, stu3: str, r4: str) -> None:
    bundle = load("full")
    entry(bundle, "ReferralRequest")["status"] = stu3
    (referral,) = of_type(build(bundle), "ServiceRequest")
    assert referral["status"] == r4
    assert errors(validator, referral) == []


@pytest.mark.parametrize(
    ("stu3", "r4"),
    [
        ("confirmed", "confirmed"),
        ("refuted", "refuted"),
        ("entered-in-error", "entered-in-error"),
        ("unconfirmed", None),
    ],
)
def test_allergy_verification_status(validator: ProfileValidator, stu3: str, r4: str | None) -> None:
    bundle = load("full")
    entry(bundle, "AllergyIntolerance")["verificationStatus"] = stu3
    mapped = build(bundle)
    (allergy,) = of_type(mapped, "AllergyIntolerance")
    assert errors(validator, allergy) == []
    if r4 is None:
        assert "verificationStatus" not in allergy
        assert any(u.endswith("verificationStatus: 'unconfirmed' has no R4 equivalent") for u in mapped.unused)
    else:
        system = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
        display = {"confirmed": "Confirmed", "refuted": "Refuted", "entered-in-error": "Entered in Error"}[r4]
        assert allergy["verificationStatus"]["coding"] == [{"system": system, "code": r4, "display": display}]
    # R4 ait-2: no clinicalStatus on an allergy entered in error
    assert ("clinicalStatus" in allergy) is (r4 != "entered-in-error")


@pytest.mark.parametrize(
    ("verification", "clinical_kept", "verification_kept"),
    [("confirmed", True, True), ("unknown", True, False), ("entered-in-error", False, True)],
)
def test_condition_verification_status(
    validator: ProfileValidator, verification: str, clinical_kept: bool, verification_kept: bool
) -> None:
    bundle = load("full")
    entry(bundle, "Condition", 1)["verificationStatus"] = verification
    mapped = build(bundle)
    condition = by_identifier(mapped, "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b02")
    assert errors(validator, condition) == []
    assert ("clinicalStatus" in condition) is clinical_kept
    assert ("verificationStatus" in condition) is verification_kept
    if verification_kept:
        assert condition["verificationStatus"]["coding"][0]["code"] == verification


def test_an_active_problem_keeps_no_abatement(validator: ProfileValidator) -> None:
    bundle = load("full")
    entry(bundle, "Condition", 0)["abatementDateTime"] = "2022-01-01"
    mapped = build(bundle)
    condition = by_identifier(mapped, "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b01")
    assert "abatementDateTime" not in condition
    assert errors(validator, condition) == []
    assert "Bundle.entry[3].resource (Condition).abatementDateTime: clinicalStatus is active" in "\n".join(
        mapped.unused
    )


def test_allergy_end_goes_on_the_clinical_status(validator: ProfileValidator) -> None:
    mapped = build(load("legacy-values"))
    (allergy,) = of_type(mapped, "AllergyIntolerance")
    assert allergy["clinicalStatus"]["extension"] == [
        {
            "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-AllergyIntoleranceEnd",
            "extension": [
                {"url": "endDate", "valueDateTime": "2009-03"},
                {"url": "reasonEnded", "valueString": "No information available"},
            ],
        }
    ]
    assert errors(validator, allergy) == []


def test_legacy_values_are_carried_as_written() -> None:
    mapped = build(load("legacy-values"))
    (patient,) = of_type(mapped, "Patient")
    assert patient["name"] == [{"use": "official", "family": "O'Brien", "given": ["Zoë", "Siobhán"], "prefix": ["Mrs"]}]
    assert patient["birthDate"] == "1947"
    (condition,) = of_type(mapped, "Condition")
    assert not any(key.startswith("onset") for key in condition)
    assert condition["recordedDate"] == "2003-07"
    # The SNOMED CT description chosen in the GP system: R4 core coding-sctdescid and UK Core's display
    assert condition["code"]["coding"][0]["extension"] == [
        {"url": "http://hl7.org/fhir/StructureDefinition/coding-sctdescid", "valueId": "64176011"},
        {
            "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-CodingSCTDescDisplay",
            "valueString": "Hypertension",
        },
    ]
    (encounter,) = of_type(mapped, "Encounter")
    assert encounter["period"] == {"start": "2001"}
    (observation,) = of_type(mapped, "Observation")
    assert observation["effectiveDateTime"] == "1999-04"


# -- the NHS number and the Patient's profile ----------------------------------------------------


def test_verification_status_is_mapped_to_uk_core() -> None:
    (patient,) = of_type(build(load("full")), "Patient")
    assert patient["meta"]["profile"] == [SP_PATIENT]
    assert patient["identifier"] == [
        {
            "extension": [
                {
                    "url": VERIFICATION_URL,
                    "valueCodeableConcept": {
                        "coding": [
                            {"system": VERIFICATION_SYSTEM, "code": "01", "display": "Number present and verified"}
                        ]
                    },
                }
            ],
            "system": NHS,
            "value": "9990000018",
        }
    ]


@pytest.mark.parametrize("code", ["01", "02", "03", "04", "05", "06", "07", "08"])
def test_every_verification_status_code(validator: ProfileValidator, code: str) -> None:
    bundle = load("full")
    coding = entry(bundle, "Patient")["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]
    coding["code"] = code
    (patient,) = of_type(build(bundle), "Patient")
    assert patient["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == code
    assert patient["meta"]["profile"] == [SP_PATIENT]
    assert errors(validator, patient) == []


def test_a_patient_without_verification_status_claims_uk_core(validator: ProfileValidator) -> None:
    (patient,) = of_type(build(load("minimal")), "Patient")
    assert patient["meta"]["profile"] == [f"{UKCORE}Patient"]
    assert errors(validator, patient) == []
    # ... and would not be a valid SP-Patient
    assert errors(validator, {**patient, "meta": {"profile": [SP_PATIENT]}})


def test_an_nhs_number_with_a_bad_check_digit_claims_uk_core(validator: ProfileValidator) -> None:
    bundle = load("full")
    entry(bundle, "Patient")["identifier"][0]["value"] = "9990000019"
    (patient,) = of_type(build(bundle), "Patient")
    assert patient["meta"]["profile"] == [f"{UKCORE}Patient"]
    assert errors(validator, patient) == []


def test_an_unknown_verification_code_is_reported() -> None:
    bundle = load("full")
    entry(bundle, "Patient")["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] = "99"
    mapped = build(bundle)
    (patient,) = of_type(mapped, "Patient")
    assert "extension" not in patient["identifier"][0]
    assert patient["meta"]["profile"] == [f"{UKCORE}Patient"]
    assert (
        "Bundle.entry[0].resource (Patient).identifier[0].extension[NHSNumberVerificationStatus]: "
        "no CareConnect NHS number verification status code"
    ) in mapped.unused


# -- the trace ------------------------------------------------------------------------------------


def test_what_is_not_mapped_is_listed() -> None:
    assert build(load("full")).unused == [
        "Bundle.entry[12].resource (List)",
        "Bundle.entry[13].resource (MedicationStatement)",
        "Bundle.entry[0].resource (Patient).extension[RegistrationDetails]",
        "Bundle.entry[10].resource (AllergyIntolerance).verificationStatus: 'unconfirmed' has no R4 equivalent",
        "Bundle.entry[5].resource (ReferralRequest).requester.onBehalfOf",
    ]
    assert build(load("minimal")).unused == []


def test_an_unresolved_reference_is_dropped_and_listed() -> None:
    mapped = build(load("unresolved-reference"))
    (observation,) = of_type(mapped, "Observation")
    (practice,) = of_type(mapped, "Organization")
    assert observation["performer"] == [{"reference": f"urn:uuid:{practice['id']}"}]
    assert mapped.unused == [
        "Bundle.entry[2].resource (Observation).performer[0]: Practitioner/99 does not resolve in the Bundle"
    ]


def test_entries_of_types_not_mapped_are_listed_and_references_to_them_dropped() -> None:
    bundle = load("minimal")
    patient_ref = {"reference": "Patient/1"}
    others: list[dict[str, Any]] = [
        {"resourceType": "Location", "id": "20", "name": "Branch surgery"},
        {"resourceType": "PractitionerRole", "id": "21"},
        {"resourceType": "Medication", "id": "22", "code": {"text": "Sertraline"}},
        {
            "resourceType": "MedicationRequest",
            "id": "23",
            "subject": patient_ref,
            "intent": "plan",
            "medicationCodeableConcept": {"text": "Sertraline 50mg tablets"},
        },
        {
            "resourceType": "Immunization",
            "id": "24",
            "status": "completed",
            "notGiven": False,
            "primarySource": True,
            "patient": patient_ref,
            "vaccineCode": {"text": "Flu"},
        },
        {"resourceType": "DiagnosticReport", "id": "25", "status": "final", "code": {"text": "Full blood count"}},
        {
            "resourceType": "ProcedureRequest",
            "id": "26",
            "status": "active",
            "intent": "plan",
            "code": {"text": "Review"},
            "subject": patient_ref,
        },
        {
            "resourceType": "DocumentReference",
            "id": "27",
            "status": "current",
            "indexed": "2024-01-05T10:00:00+00:00",
            "type": {"text": "Letter"},
            "content": [{"attachment": {"title": "Letter"}}],
        },
        {
            "resourceType": "Encounter",
            "id": "28",
            "identifier": [{"system": XCARE, "value": "0e8b5a8e-1d7c-4a51-8c0e-3b9d2f6a7c01"}],
            "status": "finished",
            "subject": patient_ref,
            "location": [{"location": {"reference": "Location/20"}}],
        },
        {
            "resourceType": "Observation",
            "id": "29",
            "identifier": [{"system": XCARE, "value": "0e8b5a8e-1d7c-4a51-8c0e-3b9d2f6a7c02"}],
            "status": "final",
            "code": {"text": "Review requested"},
            "subject": patient_ref,
            "basedOn": [{"reference": "ProcedureRequest/26"}],
        },
    ]
    bundle["entry"] += [{"resource": resource} for resource in others]
    mapped = build(bundle)
    listed = [f"Bundle.entry[{n}].resource ({r['resourceType']})" for n, r in enumerate(others[:-2], start=2)]
    assert mapped.unused[: len(listed)] == listed
    assert mapped.unused[len(listed) :] == [
        "Bundle.entry[10].resource (Encounter).location",
        "Bundle.entry[11].resource (Observation).basedOn[0]: "
        "ProcedureRequest/26 is a ProcedureRequest entry that is not mapped",
    ]
    (observation,) = of_type(mapped, "Observation")
    assert "basedOn" not in observation


def test_a_clinical_entry_about_someone_else_is_not_mapped() -> None:
    bundle = load("unresolved-reference")
    entry(bundle, "Observation")["subject"] = {"reference": "Patient/2"}
    mapped = build(bundle)
    assert not of_type(mapped, "Observation")
    reason = "its subject (Patient/2) is not the record's Patient"
    assert f"Bundle.entry[2].resource (Observation): {reason}" in mapped.unused


def test_an_entry_without_identifier_is_not_mapped_and_references_to_it_are_dropped() -> None:
    bundle = load("full")
    del entry(bundle, "Practitioner")["identifier"]
    mapped = build(bundle)
    assert not of_type(mapped, "Practitioner")
    assert "Bundle.entry[2].resource (Practitioner): no identifier to identify it by" in mapped.unused
    reason = "Practitioner/3 is a Practitioner entry that is not mapped"
    assert f"Bundle.entry[3].resource (Condition).asserter: {reason}" in mapped.unused
    produced = {f"urn:uuid:{r['id']}" for r in resources(mapped)}
    assert all(ref in produced for r in resources(mapped) for ref in references(r))


def test_the_same_practice_twice_is_mapped_once() -> None:
    bundle = load("minimal")
    twin = copy.deepcopy(entry(bundle, "Organization"))
    twin["id"] = "9"
    bundle["entry"].append({"resource": twin})
    entry(bundle, "Patient")["generalPractitioner"] = [{"reference": "Organization/9"}]
    mapped = build(bundle)
    (practice,) = of_type(mapped, "Organization")
    (patient,) = of_type(mapped, "Patient")
    assert patient["generalPractitioner"] == [{"reference": f"urn:uuid:{practice['id']}"}]
    assert "Bundle.entry[2].resource (Organization): same identifier as Bundle.entry[1], mapped once" in mapped.unused


def test_references_by_full_url_resolve() -> None:
    bundle = load("minimal")
    bundle["entry"][1]["fullUrl"] = "urn:uuid:3f1e0c52-8a7b-4c2d-9e6f-1a2b3c4d5e6f"
    entry(bundle, "Patient")["managingOrganization"] = {"reference": "urn:uuid:3f1e0c52-8a7b-4c2d-9e6f-1a2b3c4d5e6f"}
    mapped = build(bundle)
    (practice,) = of_type(mapped, "Organization")
    (patient,) = of_type(mapped, "Patient")
    assert patient["managingOrganization"] == {"reference": f"urn:uuid:{practice['id']}"}


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [{"resourceType": "Patient"}, [], "Bundle", {"entry": []}])
def test_not_a_bundle(record: Any) -> None:
    with pytest.raises(MappingError, match="expected an STU3 Bundle"):
        build(record)


def test_an_stu3_error_names_the_path() -> None:
    bundle = load("minimal")
    entry(bundle, "Patient")["birthDate"] = "14/03/1958"
    with pytest.raises(MappingError) as caught:
        build(bundle)
    message = caught.value.message
    assert message.startswith("not a valid STU3 Bundle: Bundle.entry[0].resource (Patient).birthDate: ")
    assert "'14/03/1958'" in message
    assert caught.value.field == "Bundle.entry[0].resource (Patient).birthDate"


def test_an_unknown_element_is_an_stu3_error() -> None:
    bundle = load("minimal")
    entry(bundle, "Organization")["colour"] = "blue"
    with pytest.raises(MappingError, match=r"Bundle\.entry\[1\]\.resource \(Organization\)\.colour"):
        build(bundle)


def test_an_r4_type_in_the_bundle_is_not_stu3() -> None:
    bundle = load("minimal")
    bundle["entry"].append({"resource": {"resourceType": "ServiceRequest", "id": "9"}})
    with pytest.raises(
        MappingError, match=r"Bundle\.entry\[2\]\.resource\.resourceType: 'ServiceRequest' is not an STU3"
    ):
        build(bundle)


def test_a_bundle_without_a_patient() -> None:
    bundle = load("minimal")
    bundle["entry"] = bundle["entry"][1:]
    with pytest.raises(MappingError, match="no Patient"):
        build(bundle)


def test_a_bundle_with_two_patients() -> None:
    bundle = load("minimal")
    bundle["entry"].append(copy.deepcopy(bundle["entry"][0]))
    with pytest.raises(MappingError, match="more than one Patient"):
        build(bundle)


def test_a_patient_without_nhs_number() -> None:
    bundle = load("minimal")
    entry(bundle, "Patient")["identifier"] = [{"system": "https://example.org/local", "value": "123"}]
    with pytest.raises(MappingError, match="no NHS number"):
        build(bundle)


def test_a_code_stu3_does_not_define() -> None:
    bundle = load("full")
    entry(bundle, "Condition")["clinicalStatus"] = "current"
    with pytest.raises(MappingError, match=r"\(Condition\)\.clinicalStatus: 'current' is not an STU3 code"):
        build(bundle)


def test_a_missing_mandatory_status() -> None:
    bundle = load("full")
    del entry(bundle, "Observation")["status"]
    with pytest.raises(MappingError, match=r"Bundle\.entry\[8\]\.resource \(Observation\)\.status: .* is required"):
        build(bundle)


def test_a_modifier_extension_rejects_the_record() -> None:
    bundle = load("full")
    entry(bundle, "Condition")["modifierExtension"] = [{"url": "https://example.org/negated", "valueBoolean": True}]
    with pytest.raises(MappingError, match="modifier extension"):
        build(bundle)


# -- flatten --------------------------------------------------------------------------------------


def test_flatten_the_full_record() -> None:
    mapped = build(load("full"))
    rows = flatten(mapped.resources)
    assert rows == flatten(resources(mapped))
    assert all(tuple(row) == COLUMNS for row in rows)
    assert [row["resource_type"] for row in rows] == [
        "Encounter",
        "Encounter",
        "Condition",
        "Condition",
        "Observation",
        "Observation",
        "AllergyIntolerance",
        "ServiceRequest",
    ]
    assert {row["nhs_number"] for row in rows} == {"9990000018"}
    weight = next(row for row in rows if row["code"] == "27113001")
    assert weight == {
        "nhs_number": "9990000018",
        "resource_type": "Observation",
        "identifier": "5a1f7b1e-6b7e-4c55-9b0e-2f1d3c4a5b06",
        "code_system": SCT,
        "code": "27113001",
        "display": "Body weight",
        "status": "final",
        "date": "2023-11-20",
        "value": "72.5 kg",
    }
    back_pain = next(row for row in rows if row["code"] == "279039007")
    assert (back_pain["status"], back_pain["date"], back_pain["value"]) == ("resolved", "2018-11-02", "")
    referral = next(row for row in rows if row["resource_type"] == "ServiceRequest")
    assert (referral["code"], referral["status"], referral["date"]) == (
        "871731000000106",
        "active",
        "2024-02-05T09:15:00+00:00",
    )
    face_to_face = next(row for row in rows if row["display"] == "Face to face consultation")
    assert (face_to_face["code_system"], face_to_face["code"]) == ("", "")


def test_flatten_without_the_patient_leaves_the_nhs_number_empty() -> None:
    rows = flatten([r for r in resources(build(load("full"))) if r["resourceType"] != "Patient"])
    assert rows and {row["nhs_number"] for row in rows} == {""}


# -- property: what flatten gives back is what the STU3 record said --------------------------------


def _check_digit(nine: str) -> str | None:
    total = sum(int(digit) * weight for digit, weight in zip(nine, range(10, 1, -1), strict=True))
    check = (11 - total % 11) % 11
    return None if check == 10 else nine + str(check)


nhs_numbers = st.integers(0, 999_999).map(lambda n: _check_digit(f"999{n:06d}")).filter(lambda n: n is not None)
words = (
    st.text(alphabet=st.characters(categories=["Lu", "Ll"]) | st.sampled_from("'- "), min_size=1, max_size=20)
    .map(str.strip)
    .filter(lambda text: text and text[0].isalpha())
)
days = st.dates(min_value=date(1900, 1, 1), max_value=date(2030, 12, 31))
fhir_dates = st.one_of(days.map(lambda d: f"{d.year:04d}"), days.map(lambda d: f"{d:%Y-%m}"), days.map(str))
offsets = st.sampled_from([UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5, minutes=-30))])
instants = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2030, 12, 31), timezones=offsets).map(
    lambda moment: moment.isoformat(timespec="seconds")
)
fhir_datetimes = fhir_dates | instants


@st.composite
def problems(draw: st.DrawFn, n: int) -> dict[str, Any]:
    status = draw(st.sampled_from(["active", "recurrence", "inactive", "remission", "resolved"]))
    problem: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"p{n}",
        "meta": {"profile": [STU3 + "CareConnect-GPC-ProblemHeader-Condition-1"]},
        "identifier": [{"system": XCARE, "value": str(draw(st.uuids()))}],
        "clinicalStatus": status,
        "category": [{"coding": [{"system": "http://hl7.org/fhir/condition-category", "code": "problem-list-item"}]}],
        "code": {
            "coding": [
                {
                    "system": SCT,
                    "code": draw(st.from_regex(r"[1-9][0-9]{5,17}", fullmatch=True)),
                    "display": draw(words),
                }
            ]
        },
        "subject": {"reference": "Patient/1"},
        "assertedDate": draw(fhir_datetimes),
    }
    verification = draw(
        st.none()
        | st.sampled_from(["provisional", "differential", "confirmed", "refuted", "entered-in-error", "unknown"])
    )
    if verification:
        problem["verificationStatus"] = verification
    onset = draw(st.none() | fhir_datetimes)
    if onset:
        problem["onsetDateTime"] = onset
    if status in ("inactive", "remission", "resolved") and draw(st.booleans()):
        problem["abatementDateTime"] = draw(fhir_datetimes)
    return problem


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    patient = {
        "resourceType": "Patient",
        "id": "1",
        "identifier": [{"system": NHS, "value": draw(nhs_numbers)}],
        "name": [{"use": "official", "family": draw(words), "given": draw(st.lists(words, min_size=1, max_size=3))}],
        "gender": draw(st.sampled_from(["male", "female", "other", "unknown"])),
        "birthDate": draw(fhir_dates),
    }
    count = draw(st.integers(0, 5))
    found = [draw(problems(n)) for n in range(count)]
    unique = list({p["identifier"][0]["value"]: p for p in found}.values())
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in [patient, *unique]]}


def expected_row(problem: dict[str, Any], nhs: str) -> dict[str, str]:
    coding = problem["code"]["coding"][0]
    entered_in_error = problem.get("verificationStatus") == "entered-in-error"
    return {
        "nhs_number": nhs,
        "resource_type": "Condition",
        "identifier": problem["identifier"][0]["value"],
        "code_system": coding["system"],
        "code": coding["code"],
        "display": coding["display"],
        "status": "" if entered_in_error else problem["clinicalStatus"],
        "date": problem.get("onsetDateTime") or problem["assertedDate"],
        "value": "",
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records())
def test_flatten_gives_back_what_the_stu3_record_said(validator: ProfileValidator, record: dict[str, Any]) -> None:
    mapped = build(record)
    patient_in = record["entry"][0]["resource"]
    nhs = patient_in["identifier"][0]["value"]
    problems_in = [e["resource"] for e in record["entry"][1:]]
    assert flatten(mapped.resources) == [expected_row(problem, nhs) for problem in problems_in]
    (patient,) = of_type(mapped, "Patient")
    assert patient["id"] == deterministic_id("Patient", identity(NHS, nhs))
    for key in ("name", "gender", "birthDate"):
        assert patient[key] == patient_in[key]
    for resource in resources(mapped):
        assert errors(validator, resource) == []
