"""The 215 UK Core staging examples against the UK Core profile of their type: no errors except in the
examples that are genuinely wrong, each listed with its reason in docs/validation.md."""

from __future__ import annotations

import pytest

from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator

UKCORE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-"

# example file -> the error it has (see docs/validation.md, "UK Core staging examples")
GENUINELY_WRONG = {
    "Condition-Extension-UKCore-ConditionEpisode-Example.json": "valueCode and valueCodeableConcept",
    "MedicationDispense-UKCore-MedicationDispense-Amoxicillin-Example.json": "Invalid reference",
    "MedicationDispense-UKCore-MedicationDispense-CiprofloxacinIV-Example.json": "Invalid reference",
    "MedicationDispense-UKCore-MedicationDispense-CiprofloxacinOral-Example.json": "Invalid reference",
    "Provenance-UKCore-Provenance-RARecordConsent-Example.json": "Invalid reference",
}


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator(bundled_packages())


def test_every_ukcore_example_is_valid_against_its_ukcore_profile_or_known_wrong(validator: ProfileValidator) -> None:
    package = validator.packages.packages["fhir.r4.ukcore.staging"]
    assert len(package.examples) == 215
    checked_against_profile = 0
    failures: dict[str, list[str]] = {}
    for name, example in package.examples:
        url = UKCORE + example["resourceType"]
        profiles = [url] if validator.packages.resource(url) is not None else []
        checked_against_profile += bool(profiles)
        errors = [i.diagnostics for i in validator.validate(example, profiles) if i.is_error]
        if errors:
            failures[name] = errors
    assert checked_against_profile == 215
    assert set(failures) == set(GENUINELY_WRONG)
    for name, reason in GENUINELY_WRONG.items():
        assert any(reason in message for message in failures[name]), (name, failures[name])


def test_a_typo_in_an_extension_url_is_caught_with_a_hint(validator: ProfileValidator) -> None:
    package = validator.packages.packages["fhir.r4.ukcore.staging"]
    example = dict(package.examples)["Observation-Extension-UKCore-RecordingSetting-Example.json"]
    [warning] = [i for i in validator.validate(example) if "unknown extension" in i.diagnostics]
    assert "Extension-UKCore-RcordingSetting" in warning.diagnostics
    assert "did you mean https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-RecordingSetting?" in (
        warning.diagnostics
    )
