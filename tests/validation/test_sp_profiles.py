"""The project's profiles (profiles/): every example is valid, and one defect at a time (the cases in
tests/data/profile-defects.json) is caught at the right place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from adapter.fhir import json_format
from adapter.validation.bundled import bundled_packages, profiles_dir
from adapter.validation.profiles import ProfileValidator

EXAMPLES = profiles_dir() / "examples"
CASES: list[dict[str, Any]] = json.loads((Path(__file__).parents[1] / "data" / "profile-defects.json").read_text())[
    "cases"
]
CANONICAL = "https://sp-fhir-adapter.org/fhir/"


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator(bundled_packages())


def example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json_format.loads((EXAMPLES / name).read_bytes())
    return loaded


def test_the_package_is_ours_and_loads_with_its_dependency(validator: ProfileValidator) -> None:
    ours = validator.packages.packages["sp-fhir-adapter.profiles"]
    assert not any(host in url for url in ours.resources for host in ("fhir.nhs.uk", "fhir.hl7.org.uk"))
    validator.packages.check()
    profiles = [r for r in ours.resources.values() if r["resourceType"] == "StructureDefinition"]
    assert len({p["url"] for p in profiles}) >= 20
    for profile in profiles:
        assert "snapshot" not in profile and profile["derivation"] == "constraint"
        validator.profile(profile["url"])  # compiles: its base chain is all there


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_every_example_is_valid_against_the_profiles_it_claims(validator: ProfileValidator, name: str) -> None:
    resource = example(name)
    assert resource["meta"]["profile"], "every example claims a profile"
    issues = validator.validate(resource)
    assert [(i.expression, i.diagnostics) for i in issues if i.is_error] == []
    assert not [i for i in issues if "not in the loaded packages" in i.diagnostics]


def test_every_profile_has_an_example(validator: ProfileValidator) -> None:
    claimed = {url for path in EXAMPLES.glob("*.json") for url in example(path.name)["meta"]["profile"]}
    ours = validator.packages.packages["sp-fhir-adapter.profiles"]
    profiles = {
        r["url"]
        for r in ours.resources.values()
        if r["resourceType"] == "StructureDefinition" and r["type"] != "Extension"
    }
    assert profiles <= claimed


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_one_defect_is_caught_at_its_place(validator: ProfileValidator, case: dict[str, Any]) -> None:
    broken = jsonpatch.apply_patch(example(case["example"]), case["patch"])
    errors = [(i.expression, i.diagnostics) for i in validator.validate(broken) if i.is_error]
    assert any(where == case["expression"] and case["message"] in message for where, message in errors), errors


@pytest.mark.parametrize(
    "coding",
    [["not-a-coding"], {"system": "http://snomed.info/sct", "code": "1"}, [{"system": ["a"], "code": "c"}]],
)
def test_a_coding_of_the_wrong_shape_is_an_issue_not_a_crash(validator: ProfileValidator, coding: Any) -> None:
    """A binding's check read such codings with ``.get`` and a set lookup: AttributeError or
    TypeError (unhashable) instead of the structural walk's error."""
    resource = example("ServiceRequest-sp-referral-1.json")
    resource["code"]["coding"] = coding
    errors = [issue for issue in validator.validate(resource) if issue.severity == "error"]
    assert any(
        issue.code == "structure" and issue.expression.startswith("ServiceRequest.code.coding") for issue in errors
    )


def test_a_number_system_stays_a_coding_that_is_in_no_value_set() -> None:
    """Only the systems a value set lookup cannot take (arrays, objects) are dropped: a number or
    boolean system is still checked against the binding, and is in none (code-invalid)."""
    from adapter.validation.profiles import _codes

    assert _codes({"coding": [{"system": 5, "code": "x"}, {"system": ["a"], "code": "y"}, "z"]}) == [(5, "x")]
    assert _codes({"system": True, "code": "mg"}) == [(True, "mg")]
    assert _codes({"coding": {"system": "s", "code": "c"}}) == []
