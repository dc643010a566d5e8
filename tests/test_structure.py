"""Structural validation: valid resources pass, each kind of defect is caught at the right path."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from adapter.validation.base import Issue
from adapter.validation.structure import StructuralValidator

VALIDATOR = StructuralValidator()

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
    "name": [{"family": "O'Brien", "given": ["Anne", "Marie"]}],
    "gender": "female",
    "birthDate": "1970-01-01",
    "_birthDate": {"extension": [{"url": "http://example.org/x", "valueBoolean": True}]},
    "contact": [{"name": {"text": "Joe"}}],
}
OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "718426000"}]},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": Decimal("52.0"), "unit": "score"},
}


def errors(resource: Any) -> list[Issue]:
    return [i for i in VALIDATOR.validate(resource) if i.is_error]


def with_change(base: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    resource = copy.deepcopy(base)
    node: Any = resource
    for step in path[:-1]:
        node = node[step]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return resource


def test_valid_resources_have_no_errors() -> None:
    assert errors(PATIENT) == []
    assert errors(OBSERVATION) == []


# (name, base, change path, new value, expected issue code, expected expression)
INVALID = [
    ("unknown element", PATIENT, ["foo"], 1, "structure", "Patient.foo"),
    ("unknown nested element", PATIENT, ["name", 0, "foo"], "x", "structure", "Patient.name[0].foo"),
    ("array for a single element", PATIENT, ["gender"], ["female"], "structure", "Patient.gender"),
    ("object for a repeating element", PATIENT, ["name"], {"family": "X"}, "structure", "Patient.name"),
    ("empty array", PATIENT, ["identifier"], [], "structure", "Patient.identifier"),
    ("missing required element", OBSERVATION, ["status"], KeyError, "required", "Observation.status"),
    ("string for boolean", PATIENT, ["active"], "yes", "structure", "Patient.active"),
    (
        "decimal for integer",
        PATIENT,
        ["multipleBirthInteger"],
        Decimal("1.5"),
        "structure",
        "Patient.multipleBirth.ofType(integer)",
    ),
    ("bad date", PATIENT, ["birthDate"], "1990-13-01", "value", "Patient.birthDate"),
    ("bad id", PATIENT, ["id"], "a b", "value", "Patient.id"),
    (
        "bad dateTime in a datatype",
        OBSERVATION,
        ["effectiveDateTime"],
        "2020-01-01T10:00",
        "value",
        "Observation.effective.ofType(dateTime)",
    ),
    ("bad code in required binding", PATIENT, ["gender"], "mail", "code-invalid", "Patient.gender"),
    (
        "bad code in a datatype binding",
        PATIENT,
        ["name", 0, "use"],
        "nickname-ish",
        "code-invalid",
        "Patient.name[0].use",
    ),
    ("invariant pat-1", PATIENT, ["contact", 0], {"gender": "male"}, "invariant", "Patient.contact[0]"),
    (
        "invariant per-1",
        PATIENT,
        ["name", 0, "period"],
        {"start": "2020-02-01", "end": "2020-01-01"},
        "invariant",
        "Patient.name[0].period",
    ),
    ("two choices", OBSERVATION, ["valueString"], "x", "structure", "Observation.value"),
    (
        "bad reference format",
        OBSERVATION,
        ["subject", "reference"],
        "Patient/",
        "value",
        "Observation.subject.reference",
    ),
    (
        "reference to a type not allowed",
        OBSERVATION,
        ["subject", "reference"],
        "Medication/m1",
        "value",
        "Observation.subject.reference",
    ),
    (
        "value inside the _ part",
        PATIENT,
        ["_birthDate"],
        {"value": "1970"},
        "structure",
        "Patient.birthDate.value",
    ),
    (
        "extension with value and extensions",
        PATIENT,
        ["extension"],
        [{"url": "http://e.org/a", "valueString": "x", "extension": [{"url": "b", "valueString": "y"}]}],
        "invariant",
        "Patient.extension[0]",
    ),
    (
        "integer out of range",
        PATIENT,
        ["multipleBirthInteger"],
        2**31,
        "value",
        "Patient.multipleBirth.ofType(integer)",
    ),
]


@pytest.mark.parametrize(("name", "base", "path", "value", "code", "expression"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_variant_is_caught_at_the_right_path(
    name: str, base: dict[str, Any], path: list[Any], value: Any, code: str, expression: str
) -> None:
    found = errors(with_change(base, path, value))
    assert found, f"{name}: no error reported"
    assert any(i.code == code and i.expression == expression for i in found), [
        (i.code, i.expression, i.diagnostics) for i in found
    ]


def test_bundle_entries_are_validated_with_entry_paths() -> None:
    broken = with_change(OBSERVATION, ["status"], KeyError)
    broken["subject"] = {"reference": "Patient/"}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:8d6a6a1e-1f43-4f0c-9a51-5f8f3c0f0001", "resource": PATIENT},
            {"fullUrl": "urn:uuid:8d6a6a1e-1f43-4f0c-9a51-5f8f3c0f0002", "resource": broken},
        ],
    }
    found = {(i.code, i.expression) for i in errors(bundle)}
    assert ("required", "Bundle.entry[1].resource.status") in found
    assert ("value", "Bundle.entry[1].resource.subject.reference") in found
    assert not any(expr and expr.startswith("Bundle.entry[0]") for _, expr in found)


def test_contained_resources_are_validated() -> None:
    patient = copy.deepcopy(PATIENT)
    patient["contained"] = [{"resourceType": "Organization", "id": "org", "nonsense": True}]
    patient["managingOrganization"] = {"reference": "#org"}
    found = {(i.code, i.expression) for i in errors(patient)}
    assert ("structure", "Patient.contained[0].nonsense") in found


def test_unknown_and_abstract_resource_types() -> None:
    assert errors({"resourceType": "Patientt"})[0].diagnostics == "Unknown resource type 'Patientt'"
    assert "abstract" in errors({"resourceType": "DomainResource"})[0].diagnostics
    assert errors({"id": "x"})[0].code == "required"
    assert errors([1, 2])[0].code == "structure"


def test_primitive_arrays_with_nulls_must_align() -> None:
    patient = copy.deepcopy(PATIENT)
    patient["name"][0]["given"] = ["Anne", None]
    assert errors(patient), "a null with no extension must be an error"
    patient["name"][0]["_given"] = [None, {"extension": [{"url": "http://e.org/x", "valueCode": "a"}]}]
    assert errors(patient) == []
    patient["name"][0]["_given"] = [None]
    assert any(i.expression == "Patient.name[0].given" for i in errors(patient))


def test_narrative_must_be_safe_xhtml() -> None:
    patient = copy.deepcopy(PATIENT)
    patient["text"] = {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml"><script/>x</div>',
    }
    found = errors(patient)
    assert [i.expression for i in found] == ["Patient.text.div"]
    assert "script" in found[0].diagnostics


@pytest.mark.parametrize("extra", [{"id": 3}, {"id": "a"}, {"extension": [{"url": "http://e", "valueString": "v"}]}])
def test_narrative_has_no_underscore_part(extra: dict[str, object]) -> None:
    # "_div": {"id": 3} raised KeyError: xhtml.id was typed System.String, which has no model.
    patient = copy.deepcopy(PATIENT)
    patient["text"] = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>', "_div": extra}
    found = errors(patient)
    assert [(i.expression, i.code) for i in found] == [("Patient.text._div", "structure")]
    assert "narrative xhtml has no '_' part" in found[0].diagnostics


def test_issue_has_operation_outcome_shape() -> None:
    issue = errors(with_change(PATIENT, ["gender"], "mail"))[0]
    fhir = issue.to_fhir()
    assert fhir["severity"] == "error"
    assert fhir["code"] == "code-invalid"
    assert fhir["expression"] == ["Patient.gender"]
    assert "mail" in fhir["diagnostics"] and "administrative-gender" in fhir["diagnostics"]


def test_identical_issues_are_reported_once() -> None:
    resource = with_change(PATIENT, ["gender"], "mail")
    found = VALIDATOR.validate(resource)
    assert len(found) == len(set(found))


def test_deep_nesting_is_an_issue_not_a_crash() -> None:
    item: dict[str, Any] = {"linkId": "x", "type": "group"}
    root = {"resourceType": "Questionnaire", "status": "active", "item": [item]}
    for _ in range(3000):
        child = {"linkId": "x", "type": "group"}
        item["item"] = [child]
        item = child
    found = errors(root)
    assert found and found[0].code == "too-costly"


def test_an_empty_json_key_is_an_unknown_element_not_a_crash() -> None:
    """JSON allows "" as a key; the walk took key[0] of it (an IndexError, a 500 from the API)."""
    for resource, where in [
        ({"resourceType": "Patient", "": 1}, "Patient."),
        ({"resourceType": "Patient", "name": [{"family": "Ann", "": {"a": 1}}]}, "Patient.name[0]."),
        ({"resourceType": "Patient", "gender": "female", "_gender": {"": []}}, "Patient.gender."),
    ]:
        [issue] = errors(resource)
        assert issue.code == "structure" and "Unknown element ''" in issue.diagnostics
        assert issue.expression == where


def test_invariants_on_primitive_elements_are_evaluated() -> None:
    # eld-3 sits on ElementDefinition.max, a string: "empty() or ($this = '*') or (toInteger() >= 0)"
    structure = {
        "resourceType": "StructureDefinition",
        "url": "http://example.org/StructureDefinition/y",
        "name": "Y",
        "status": "draft",
        "kind": "logical",
        "abstract": True,
        "type": "Y",
        "differential": {"element": [{"id": "Y", "path": "Y", "max": "-1"}]},
    }
    found = [(i.code, i.expression) for i in errors(structure) if i.diagnostics.startswith("eld-3")]
    assert found == [("invariant", "StructureDefinition.differential.element[0].max")]


def test_string_fast_tests_accept_what_the_r4_regexes_match() -> None:
    """The walk's str-method tests stand in for the regexes of string, markdown, uri, url, canonical
    and code (#2): each character (R4's \\s is ASCII) and the empty string."""
    from adapter.validation.structure import _CODE_FAST, _STR_TESTS, _code_ok, _regex

    texts = ["", " ", "a b", "a  b", " a", "a "] + [chr(c) for c in [*range(0x3100), 0x1680, 0x3000, 0xFEFF, 0x1F600]]
    for code in ("string", "markdown", "uri", "url", "canonical"):
        regex = _regex(code)
        assert regex is not None
        test = _STR_TESTS[regex.pattern]
        for text in texts:
            for value in (text, "x" + text + "y"):
                assert test(value) == bool(regex.fullmatch(value)), (code, value)
    for text in texts:
        for value in (text, "x" + text + "y"):
            assert not _code_ok(value) or _CODE_FAST.fullmatch(value), value


def test_base64_fast_test_accepts_what_the_r4_regex_matches() -> None:
    """base64Binary's test stands in for its regex (#2): groups of four, ASCII whitespace only
    between groups, every character alone and between groups, and the empty string."""
    from adapter.validation.structure import _STR_TESTS, _regex

    regex = _regex("base64Binary")
    assert regex is not None
    test = _STR_TESTS[regex.pattern]
    chars = [chr(c) for c in [*range(0x100), 0x1680, 0x2028, 0x3000, 0xFEFF]]
    shapes = ["", "abcd", "abc", "abcde", "ab=="]
    shapes += [
        f"{a}{w}{b}" for a in ("", "abcd", "ab", "abcdef") for w in (" ", "\n", "\r\n ") for b in ("", "AB+/", "A")
    ]
    values = (
        shapes + [s + c for s in ("", "abc", "abcd", "abcd ") for c in chars] + ["abcd" + c + "efgh" for c in chars]
    )
    for value in values:
        assert test(value) == bool(regex.fullmatch(value)), repr(value)


@pytest.mark.parametrize(
    ("change", "value", "expression"),
    [
        (["active"], 1, "Patient.active"),
        (["active"], "true", "Patient.active"),
        (["multipleBirthInteger"], True, "Patient.multipleBirth.ofType(integer)"),
        (["multipleBirthInteger"], -(2**31) - 1, "Patient.multipleBirth.ofType(integer)"),
        (["contact", 0, "name", "given"], ["Jo", "\x0b"], "Patient.contact[0].name.given[1]"),
        (["contact", 0, "name", "text"], "", "Patient.contact[0].name.text"),
        (["identifier", 0, "system"], "https://x.org/a b", "Patient.identifier[0].system"),
        (["photo"], [{"url": "http://x.org/\x0c"}], "Patient.photo[0].url"),
    ],
)
def test_values_the_fast_tests_refuse_are_still_reported(change: list[Any], value: Any, expression: str) -> None:
    assert [i.expression for i in errors(with_change(PATIENT, change, value))] == [expression]


def test_invariants_are_reported_after_the_runner_is_generated() -> None:
    """After 32 nodes of a context the walk runs its invariants as generated code (#2): a
    violation on the 40th node, and on a node without the elements an invariant names, is reported."""
    patient = copy.deepcopy(PATIENT)
    patient["contact"] = [{"name": {"text": f"C{i}"}} for i in range(40)] + [{"gender": "male"}]
    patient["name"] = [{"period": {"start": "2020-01-01"}} for _ in range(40)]
    patient["name"].append({"period": {"start": "2020-02-01", "end": "2020-01-01"}})
    found = [(i.expression, i.diagnostics[:6]) for i in errors(patient)]
    assert found == [("Patient.name[40].period", "per-1:"), ("Patient.contact[40]", "pat-1:")]


def test_an_invalid_xml_id_in_a_narrative_is_still_reported() -> None:
    """Narratives are parsed without collecting xml:id values unless they mention xml:id (#2)."""
    from adapter.validation.xhtml import check_xhtml

    problem = check_xhtml('<div xmlns="http://www.w3.org/1999/xhtml" xml:id="1 2">a</div>')
    assert problem is not None and "not an NCName" in problem
    assert check_xhtml('<div xmlns="http://www.w3.org/1999/xhtml" id="a"><p id="a">b</p></div>') is None


@pytest.mark.parametrize("code", [["active"], {"value": "active"}, 7])
def test_a_code_that_is_not_a_string_under_a_required_binding_is_an_issue_not_a_crash(code: Any) -> None:
    """A set lookup of an array or object code raised TypeError (unhashable): the CLI reported the
    file unreadable and the API answered 500."""
    resource = {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": code}]
        },
        "patient": {"reference": "Patient/p1"},
    }
    found = {(issue.expression, issue.code) for issue in errors(resource)}
    assert ("AllergyIntolerance.clinicalStatus.coding", "code-invalid") in found
    assert any(expression == "AllergyIntolerance.clinicalStatus.coding[0].code" for expression, _ in found)
