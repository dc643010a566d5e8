"""Profile validation: slicing, bindings, fixed and pattern values, extensions, invariants, target
profiles, snapshots and differentials, on a small test package and on UK Core (vendored)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from adapter.validation.bundled import bundled_packages
from adapter.validation.packages import PackageError, PackageSet, load_package
from adapter.validation.profiles import ProfileError, ProfileValidator

BASE = "https://test.example/fhir"
UKCORE = "https://fhir.hl7.org.uk/StructureDefinition/"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


def sd(id: str, type: str, base: str, elements: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "StructureDefinition",
        "id": id,
        "url": f"{BASE}/StructureDefinition/{id}",
        "name": id.replace("-", ""),
        "status": "draft",
        "kind": extra.pop("kind", "resource"),
        "abstract": False,
        "type": type,
        "baseDefinition": base,
        "derivation": "constraint",
        "differential": {"element": elements},
        **extra,
    }


def make_package(tmp_path: Path) -> Path:
    """A package with a CodeSystem, ValueSets, an extension and profiles that use every discriminator."""
    resources = [
        {
            "resourceType": "CodeSystem",
            "id": "colour",
            "url": f"{BASE}/CodeSystem/colour",
            "status": "draft",
            "content": "complete",
            "concept": [{"code": "red", "concept": [{"code": "crimson"}]}, {"code": "blue"}],
        },
        {
            "resourceType": "ValueSet",
            "id": "reds",
            "url": f"{BASE}/ValueSet/reds",
            "status": "draft",
            "compose": {
                "include": [
                    {
                        "system": f"{BASE}/CodeSystem/colour",
                        "filter": [{"property": "concept", "op": "is-a", "value": "red"}],
                    }
                ]
            },
        },
        {
            "resourceType": "ValueSet",
            "id": "snomed-ecl",
            "url": f"{BASE}/ValueSet/snomed-ecl",
            "status": "draft",
            "compose": {
                "include": [
                    {
                        "system": "http://snomed.info/sct",
                        "filter": [{"property": "constraint", "op": "=", "value": "<< 404684003"}],
                    }
                ]
            },
        },
        sd(
            "score",
            "Extension",
            "http://hl7.org/fhir/StructureDefinition/Extension",
            [
                {
                    "id": "Extension",
                    "path": "Extension",
                    "max": "1",
                    "constraint": [
                        {
                            "key": "t-1",
                            "severity": "error",
                            "human": "1 to 10",
                            "expression": "value.exists() implies (value >= 1 and value <= 10)",
                        }
                    ],
                },
                {"id": "Extension.url", "path": "Extension.url", "fixedUri": f"{BASE}/StructureDefinition/score"},
                {"id": "Extension.value[x]", "path": "Extension.value[x]", "min": 1, "type": [{"code": "integer"}]},
            ],
            kind="complex-type",
            context=[{"type": "element", "expression": "Goal"}],
        ),
        sd(
            "goal",
            "Goal",
            "http://hl7.org/fhir/StructureDefinition/Goal",
            [
                {
                    "id": "Goal.extension:importance",
                    "path": "Goal.extension",
                    "sliceName": "importance",
                    "min": 1,
                    "type": [{"code": "Extension", "profile": [f"{BASE}/StructureDefinition/score"]}],
                },
                {
                    "id": "Goal.category",
                    "path": "Goal.category",
                    "slicing": {
                        "discriminator": [{"type": "pattern", "path": "$this"}],
                        "rules": "closed",
                        "ordered": True,
                    },
                },
                {
                    "id": "Goal.category:first",
                    "path": "Goal.category",
                    "sliceName": "first",
                    "min": 1,
                    "max": "1",
                    "patternCodeableConcept": {"coding": [{"system": f"{BASE}/CodeSystem/colour", "code": "blue"}]},
                },
                {
                    "id": "Goal.category:second",
                    "path": "Goal.category",
                    "sliceName": "second",
                    "max": "1",
                    "patternCodeableConcept": {"coding": [{"system": f"{BASE}/CodeSystem/colour"}]},
                    "binding": {"strength": "required", "valueSet": f"{BASE}/ValueSet/reds"},
                },
                {"id": "Goal.category:second.coding", "path": "Goal.category.coding", "min": 1},
                {
                    "id": "Goal.category:second.coding.system",
                    "path": "Goal.category.coding.system",
                    "fixedUri": f"{BASE}/CodeSystem/colour",
                },
                {
                    "id": "Goal.priority",
                    "path": "Goal.priority",
                    "binding": {"strength": "extensible", "valueSet": f"{BASE}/ValueSet/snomed-ecl"},
                },
                {
                    "id": "Goal.subject",
                    "path": "Goal.subject",
                    "type": [{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/patient"]}],
                },
                {"id": "Goal.target.detail[x]", "path": "Goal.target.detail[x]", "type": [{"code": "Quantity"}]},
                {"id": "Goal.description.text", "path": "Goal.description.text", "min": 1, "maxLength": 20},
            ],
        ),
        sd(
            "patient",
            "Patient",
            UKCORE + "UKCore-Patient",
            [
                {
                    "id": "Patient.identifier:nhsNumber",
                    "path": "Patient.identifier",
                    "sliceName": "nhsNumber",
                    "min": 1,
                },
                {
                    "id": "Patient.identifier:nhsNumber.value",
                    "path": "Patient.identifier.value",
                    "constraint": [
                        {
                            "key": "t-nhs",
                            "severity": "error",
                            "human": "ten digits",
                            "expression": "matches('^[0-9]{10}$')",
                        }
                    ],
                },
                {
                    "id": "Patient.telecom",
                    "path": "Patient.telecom",
                    "slicing": {"discriminator": [{"type": "exists", "path": "period"}], "rules": "open"},
                },
                {"id": "Patient.telecom:current", "path": "Patient.telecom", "sliceName": "current", "max": "1"},
                {"id": "Patient.telecom:current.period", "path": "Patient.telecom.period", "max": "0"},
                {
                    "id": "Patient.name",
                    "path": "Patient.name",
                    "slicing": {"discriminator": [{"type": "value", "path": "use"}], "rules": "openAtEnd"},
                },
                {"id": "Patient.name:official", "path": "Patient.name", "sliceName": "official", "max": "1"},
                {"id": "Patient.name:official.use", "path": "Patient.name.use", "fixedCode": "official"},
                {"id": "Patient.gender", "path": "Patient.gender", "fixedCode": "female", "mustSupport": True},
                {"id": "Patient.birthDate", "path": "Patient.birthDate", "mustSupport": True},
            ],
        ),
        sd(
            "message",
            "Bundle",
            "http://hl7.org/fhir/StructureDefinition/Bundle",
            [
                {"id": "Bundle.type", "path": "Bundle.type", "fixedCode": "collection"},
                {
                    "id": "Bundle.entry",
                    "path": "Bundle.entry",
                    "slicing": {"discriminator": [{"type": "type", "path": "resource"}], "rules": "open"},
                },
                {"id": "Bundle.entry:goal", "path": "Bundle.entry", "sliceName": "goal", "min": 1, "max": "1"},
                {"id": "Bundle.entry:goal.resource", "path": "Bundle.entry.resource", "type": [{"code": "Goal"}]},
                {"id": "Bundle.entry:person", "path": "Bundle.entry", "sliceName": "person", "min": 1},
                {
                    "id": "Bundle.entry:person.resource",
                    "path": "Bundle.entry.resource",
                    "type": [{"code": "Patient", "profile": [f"{BASE}/StructureDefinition/patient"]}],
                },
            ],
        ),
        sd(
            "conforming-entries",
            "Bundle",
            "http://hl7.org/fhir/StructureDefinition/Bundle",
            [
                {
                    "id": "Bundle.entry",
                    "path": "Bundle.entry",
                    "slicing": {"discriminator": [{"type": "profile", "path": "resource"}], "rules": "closed"},
                },
                {"id": "Bundle.entry:woman", "path": "Bundle.entry", "sliceName": "woman", "min": 1},
                {
                    "id": "Bundle.entry:woman.resource",
                    "path": "Bundle.entry.resource",
                    "type": [{"code": "Patient", "profile": [f"{BASE}/StructureDefinition/patient"]}],
                },
            ],
        ),
    ]
    root = tmp_path / "test-package"
    root.mkdir(parents=True)
    (root / "package.json").write_text(
        json.dumps(
            {
                "name": "test.profiles",
                "version": "0.0.1",
                "dependencies": {"hl7.fhir.r4.core": "4.0.1", "fhir.r4.ukcore.staging": "2.0.0"},
            }
        )
    )
    for resource in resources:
        (root / f"{resource['resourceType']}-{resource['id']}.json").write_text(json.dumps(resource))
    return root


@pytest.fixture
def validator(tmp_path: Path) -> ProfileValidator:
    packages = bundled_packages()
    packages.add_path(make_package(tmp_path))
    packages.check()
    return ProfileValidator(packages)


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"profile": [f"{BASE}/StructureDefinition/patient"]},
        "identifier": [{"system": NHS, "value": "9990000018"}],
        "gender": "female",
        **extra,
    }


def goal(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Goal",
        "id": "g1",
        "meta": {"profile": [f"{BASE}/StructureDefinition/goal"]},
        "extension": [{"url": f"{BASE}/StructureDefinition/score", "valueInteger": 7}],
        "lifecycleStatus": "active",
        "category": [{"coding": [{"system": f"{BASE}/CodeSystem/colour", "code": "blue"}]}],
        "description": {"text": "Walk twice a week"},
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


def errors(validator: ProfileValidator, resource: dict[str, Any], profiles: list[str] = ()) -> list[tuple[str, str]]:  # type: ignore[assignment]
    return [(i.expression or "", i.diagnostics) for i in validator.validate(resource, profiles) if i.is_error]


def test_valid_instances_have_no_errors(validator: ProfileValidator) -> None:
    assert errors(validator, patient()) == []
    assert errors(validator, goal()) == []
    second = {"coding": [{"system": f"{BASE}/CodeSystem/colour", "code": "crimson"}]}
    assert errors(validator, goal(category=[goal()["category"][0], second])) == []


def test_a_missing_slice_and_a_bad_value_in_a_slice(validator: ProfileValidator) -> None:
    found = errors(validator, patient(identifier=[{"system": "https://example.org/other", "value": "1"}]))
    assert found and all(where == "Patient.identifier" for where, _ in found)
    assert "nhsNumber" in found[0][1] and "value:system" in found[0][1] and "at least 1" in found[0][1]
    [(where, message)] = errors(validator, patient(identifier=[{"system": NHS, "value": "12345"}]))
    assert where == "Patient.identifier[0].value" and message.startswith("patient: t-nhs")


def test_fixed_values_and_the_inherited_ukcore_slice(validator: ProfileValidator) -> None:
    [(where, message)] = errors(validator, patient(gender="male"))
    assert where == "Patient.gender" and "must be exactly" in message
    # UK Core's nhsNumber slice allows one NHS number; our profile adds min 1 to the same slice.
    two = [{"system": NHS, "value": "9990000018"}, {"system": NHS, "value": "9990000026"}]
    [(_, message)] = errors(validator, patient(identifier=two))
    assert "at most 1" in message


def test_exists_discriminator(validator: ProfileValidator) -> None:
    current = [{"system": "phone", "value": "1"}, {"system": "phone", "value": "2"}]
    [(_, message)] = errors(validator, patient(telecom=current))
    assert "slice current (exists:period)" in message and "at most 1" in message
    old = [{"system": "phone", "value": "1"}, {"system": "phone", "value": "2", "period": {"end": "2020"}}]
    assert errors(validator, patient(telecom=old)) == []


def test_pattern_slices_closed_and_ordered_with_a_required_binding(validator: ProfileValidator) -> None:
    blue = goal()["category"][0]
    red = {"coding": [{"system": f"{BASE}/CodeSystem/colour", "code": "red"}]}
    out_of_order = errors(validator, goal(category=[red, blue]))
    assert any("out of order" in message for _, message in out_of_order)
    closed = errors(validator, goal(category=[blue, {"text": "no coding"}]))
    assert any("matches none of the slices" in message for _, message in closed)
    # green has the colour system, so it is slice "second", whose required binding (reds) it fails.
    green = {"coding": [{"system": f"{BASE}/CodeSystem/colour", "code": "green"}]}
    [(where, message)] = errors(validator, goal(category=[blue, green]))
    assert where == "Goal.category[1]" and "slice second" in message and "not in" in message
    [(where, message)] = errors(validator, goal(category=[red]))
    assert where == "Goal.category" and "slice first" in message and "at least 1" in message


def test_bindings_required_extensible_and_not_expandable(validator: ProfileValidator) -> None:
    issues = validator.validate(goal(priority={"coding": [{"system": "http://snomed.info/sct", "code": "123"}]}))
    [note] = [i for i in issues if "not checked" in i.diagnostics]
    assert note.severity == "information" and f"{BASE}/ValueSet/snomed-ecl" in note.diagnostics
    assert not [i for i in issues if i.is_error]


def test_extensions_definitions_invariants_and_did_you_mean(validator: ProfileValidator) -> None:
    [(where, message)] = errors(
        validator, goal(extension=[{"url": f"{BASE}/StructureDefinition/score", "valueInteger": 11}])
    )
    assert where == "Goal.extension[0]" and "t-1" in message
    [(where, message)] = errors(
        validator, goal(extension=[{"url": f"{BASE}/StructureDefinition/score", "valueString": "7"}])
    )
    assert "type string is not allowed" in message
    missing = errors(validator, goal(extension=[]))
    assert any("slice importance" in m and "at least 1" in m for _, m in missing)
    typo = goal(extension=[*goal()["extension"], {"url": f"{BASE}/StructureDefinition/scor", "valueInteger": 1}])
    [warning] = [i for i in validator.validate(typo) if "unknown extension" in i.diagnostics]
    assert warning.severity == "warning" and f"did you mean {BASE}/StructureDefinition/score?" in warning.diagnostics
    modifier = goal(modifierExtension=[{"url": "https://unknown.example/x", "valueBoolean": True}])
    assert any("unknown extension" in m for _, m in errors(validator, modifier))


def test_unknown_extensions_are_found_wherever_the_walk_meets_them(validator: ProfileValidator) -> None:
    """The sweep for extensions no profile mentions is skipped only for a resource the structural
    walk went all through without meeting an extension: one on a primitive of a contained
    resource of a Bundle entry is still reported, and so is one below an unknown element."""
    assert validator.structural.examine(patient())[1] is False
    unknown = {"url": "https://unknown.example/x", "valueBoolean": True}
    inner = patient(id="p2", meta=None, _gender={"extension": [unknown]})
    del inner["meta"]
    assert validator.structural.examine(inner)[1] is True
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": "urn:uuid:0d3f5ad5-1b0c-4b7f-9a55-3a3e3f0b6a61", "resource": goal(contained=[inner])}],
    }
    [warning] = [i for i in validator.validate(bundle) if "unknown extension" in i.diagnostics]
    assert warning.expression == "Bundle.entry[0].resource.contained[0].gender.extension[0]"
    hidden = patient(unknownElement={"extension": [unknown]})
    assert validator.structural.examine(hidden)[1] is True
    assert any("unknown extension" in i.diagnostics for i in validator.validate(hidden))


def test_types_max_length_and_target_profiles_inside_a_bundle(validator: ProfileValidator) -> None:
    [(where, message)] = errors(validator, goal(target=[{"measure": {"text": "steps"}, "detailString": "x"}]))
    assert where == "Goal.target[0].detail.ofType(string)"
    [(_, message)] = errors(validator, goal(description={"text": "x" * 21}))
    assert "longer than 20" in message
    assert any(
        "Patient or" not in m and "is not a reference to Patient" in m
        for _, m in errors(validator, goal(subject={"reference": "Group/1"}))
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "meta": {"profile": [f"{BASE}/StructureDefinition/message"]},
        "entry": [
            {"fullUrl": "https://x.example/Goal/g1", "resource": goal()},
            {"fullUrl": "https://x.example/Patient/p1", "resource": patient(gender="male")},
        ],
    }
    found = errors(validator, bundle)
    # The entry's own meta.profile, and the target profile of Goal.subject, both fail on gender.
    assert any(
        where == "Bundle.entry[1].resource.gender" and "entry 1 (https://x.example/Patient/p1, Patient/p1)" in m
        for where, m in found
    )
    assert any("does not conform" in m and where == "Bundle.entry[0].resource.subject" for where, m in found)
    bundle["entry"][1]["resource"] = patient()
    assert errors(validator, bundle) == []
    bundle["entry"] = bundle["entry"][1:]
    assert any("slice goal (type:resource)" in m for _, m in errors(validator, bundle))


def test_profile_discriminator(validator: ProfileValidator) -> None:
    url = f"{BASE}/StructureDefinition/conforming-entries"
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": "urn:uuid:a", "resource": patient()}],
    }
    assert errors(validator, bundle, [url]) == []
    bundle["entry"][0]["resource"] = patient(gender="male")
    found = errors(validator, bundle, [url])
    assert any("matches none of the slices" in m for _, m in found)


def test_must_support_is_reported_on_request(tmp_path: Path) -> None:
    packages = bundled_packages()
    packages.add_path(make_package(tmp_path))
    quiet = ProfileValidator(packages)
    loud = ProfileValidator(packages, must_support=True)
    resource = patient()
    assert not [i for i in quiet.validate(resource) if "mustSupport" in i.diagnostics]
    notes = {i.expression: i for i in loud.validate(resource) if "mustSupport" in i.diagnostics}
    assert notes["Patient.birthDate"].severity == "information"
    assert "Patient.gender" not in notes  # present
    assert "Patient.name" in notes  # mustSupport in UK Core, inherited


def test_a_snapshot_gives_the_same_answers_as_the_differential(tmp_path: Path) -> None:
    """The same constraints written as a snapshot (as published packages carry them)."""
    root = make_package(tmp_path)
    goal_sd = json.loads((root / "StructureDefinition-goal.json").read_text())
    core = [
        {"id": "Goal", "path": "Goal", "min": 0, "max": "*"},
        {
            "id": "Goal.extension",
            "path": "Goal.extension",
            "min": 0,
            "max": "*",
            "slicing": {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"},
        },
        {"id": "Goal.lifecycleStatus", "path": "Goal.lifecycleStatus", "min": 1, "max": "1"},
        {"id": "Goal.description", "path": "Goal.description", "min": 1, "max": "1"},
    ]
    goal_sd["snapshot"] = {"element": core + copy.deepcopy(goal_sd["differential"]["element"])}
    del goal_sd["differential"]
    (root / "StructureDefinition-goal.json").write_text(json.dumps(goal_sd))
    packages = bundled_packages()
    packages.add_path(root)
    with_snapshot = ProfileValidator(packages)
    red = {"coding": [{"system": f"{BASE}/CodeSystem/colour", "code": "red"}]}
    plain = bundled_packages()
    plain.add_path(make_package(tmp_path / "differential"))
    differential = ProfileValidator(plain)
    cases = (goal(), goal(category=[red]), goal(extension=[]), goal(description={"text": "x" * 21}))
    for case in cases:
        assert sorted(errors(with_snapshot, case)) == sorted(errors(differential, case))
    assert [len(errors(differential, case)) > 0 for case in cases] == [False, True, True, True]


def test_unknown_profiles_and_missing_dependencies(tmp_path: Path, validator: ProfileValidator) -> None:
    declared = patient(meta={"profile": ["https://nowhere.example/StructureDefinition/x"]})
    [warning] = [i for i in validator.validate(declared) if "nowhere" in i.diagnostics]
    assert warning.severity == "warning" and "not checked" in warning.diagnostics
    with pytest.raises(ProfileError):
        validator.profile("https://nowhere.example/StructureDefinition/x")
    lonely = PackageSet()
    lonely.add_path(make_package(tmp_path / "alone"))
    with pytest.raises(PackageError, match=re.escape("fhir.r4.ukcore.staging#2.0.0")):
        lonely.resolve_dependencies(cache=tmp_path / "empty-cache")
    with pytest.raises(PackageError):
        load_package(tmp_path / "nothing.tgz")


def test_an_extension_outside_its_context(validator: ProfileValidator) -> None:
    misplaced = patient(extension=[{"url": f"{BASE}/StructureDefinition/score", "valueInteger": 3}])
    [(where, message)] = errors(validator, misplaced)
    assert where == "Patient.extension[0]" and "not allowed on Patient" in message and "Goal" in message
    # UK Core's OtherContactSystem has the datatype path ContactPoint.system as its context.
    other = f"{UKCORE.replace('StructureDefinition/', 'StructureDefinition/Extension-')}UKCore-OtherContactSystem"
    code = {"coding": [{"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-OtherContactSystem", "code": "textphone"}]}
    on_system = patient(
        telecom=[
            {"system": "other", "value": "1", "_system": {"extension": [{"url": other, "valueCodeableConcept": code}]}}
        ]
    )
    assert errors(validator, on_system) == []
    on_value = patient(
        telecom=[
            {"system": "other", "value": "1", "_value": {"extension": [{"url": other, "valueCodeableConcept": code}]}}
        ]
    )
    assert any("not allowed on Patient.telecom.value" in m for _, m in errors(validator, on_value))


def test_default_profiles_per_type_apply_when_none_is_declared(tmp_path: Path) -> None:
    packages = bundled_packages()
    packages.add_path(make_package(tmp_path))
    validator = ProfileValidator(packages, defaults={"Patient": [f"{BASE}/StructureDefinition/patient"]})
    plain = {"resourceType": "Patient", "gender": "male"}
    found = errors(validator, plain)
    assert any(where == "Patient.gender" for where, _ in found)
    assert any("nhsNumber" in m for _, m in found)
    assert errors(ProfileValidator(packages), plain) == []


def test_open_at_end_slicing_wants_the_unmatched_items_last(validator: ProfileValidator) -> None:
    official, nickname = {"use": "official", "family": "Carmody"}, {"use": "nickname", "given": ["Elle"]}
    assert errors(validator, patient(name=[official, nickname])) == []
    [(where, message)] = errors(validator, patient(name=[nickname, official]))
    assert where == "Patient.name" and "openAtEnd" in message


CORE_PACKAGE = Path(__file__).resolve().parents[3] / "shared" / "fhir-packages" / "hl7.fhir.r4.core-4.0.1.tgz"


@pytest.mark.skipif(not CORE_PACKAGE.exists(), reason="../shared/fhir-packages is not here")
def test_core_extensions_are_checked_when_the_core_package_is_loaded() -> None:
    birth_place = {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueString": "Leeds"}
    resource = {"resourceType": "Patient", "extension": [birth_place]}
    assert errors(ProfileValidator(bundled_packages()), resource) == []  # no definition: not checked
    with_core = bundled_packages()
    with_core.add_path(CORE_PACKAGE)
    [(where, message)] = errors(ProfileValidator(with_core), resource)
    assert where == "Patient.extension[0].value.ofType(string)" and "Address" in message
