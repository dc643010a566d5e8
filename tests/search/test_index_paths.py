"""The walks that index most search parameters find what our FHIRPath finds.

:class:`adapter.search.index._PlainPath` walks ``Type.a.b`` paths over the JSON instead of running
the compiled expression, and :class:`adapter.search.index._Walk` the choice, ``where(resolve() is T)``
and ``where(system='email')`` forms and unions of them; every index row must be the same.
Checked on the demo data, the profile examples and the mapping goldens, on resources made to take
the walks' odd ways, and on a quarter of the official R4 examples when they are available; and the
rows of a few resources against their expected values (#5).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapter.demo import demo_resources
from adapter.fhir import fhirpath
from adapter.fhir.json_format import loads
from adapter.search import index
from bench.corpus import example_files, official_examples

ROOT = Path(__file__).resolve().parents[2]


def _compiled(extractor: Any) -> Any:
    """The compiled FHIRPath an extractor stands for."""
    if isinstance(extractor, index._PlainPath):
        return fhirpath.compile_tree(extractor.text, fhirpath.parse_tree(extractor.text, search=True))
    if isinstance(extractor, index._Walk):
        return extractor.compiled
    return extractor


def _fhirpath_only(extractors: tuple[tuple[Any, tuple[Any, ...]], ...]) -> tuple[tuple[Any, tuple[Any, ...]], ...]:
    """``extractors`` with each walk replaced by the compiled FHIRPath it stands for."""
    return tuple((param, tuple(_compiled(e) for e in compiled)) for param, compiled in extractors)


def _resources(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if isinstance(value.get("resourceType"), str):
            yield value
        for item in value.values():
            yield from _resources(item)
    elif isinstance(value, list):
        for item in value:
            yield from _resources(item)


def _local_resources() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for pattern in ("profiles/examples/**/*.json", "mappings/*/cases/*/expected.json"):
        for path in sorted(ROOT.glob(pattern)):
            found.extend(_resources(loads(path.read_bytes())))
    found.extend(demo_resources())
    return found


def _same_rows(resources: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> int:
    plain = [index.index_values(resource) for resource in resources]
    checked = sum(
        1
        for _, compiled in (p for r in resources for p in index._extractors(r["resourceType"]))
        for e in compiled
        if isinstance(e, index._PlainPath | index._Walk)
    )
    original = index._extractors
    monkeypatch.setattr(index, "_extractors", lambda type: _fhirpath_only(original(type)))
    for resource, rows in zip(resources, plain, strict=True):
        assert index.index_values(resource) == rows, json.dumps(resource)[:300]
    monkeypatch.setattr(index, "_extractors", original)
    return checked


def test_plain_paths_index_what_fhirpath_finds_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = _local_resources()
    assert len(resources) > 100
    # Most parameters of the resources here go through the plain walk, so this compares something.
    assert _same_rows(resources, monkeypatch) > 1000


def test_plain_paths_index_what_fhirpath_finds_in_the_official_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = official_examples()
    if folder is None:
        pytest.skip("official R4 examples not available (npm pack hl7.fhir.r4.examples@4.0.1 failed)")
    # Every fourth file (all of them take over a minute): about 1,300 files of every type.
    files = example_files(folder)[::4]
    resources = [r for path in files for r in _resources(loads(path.read_bytes()))]
    assert _same_rows(resources, monkeypatch) > 10_000


def test_choice_and_extension_paths_stay_with_fhirpath() -> None:
    assert index._plain_path("Patient.name.family", "Patient") is not None
    assert index._plain_path("Resource.meta.profile", "Patient") is not None
    assert index._plain_path("Observation.value", "Observation") is None  # value[x]
    assert index._plain_path("Patient.deceased", "Patient") is None  # deceased[x]
    assert index._plain_path("Patient.birthDate.extension", "Patient") is None
    assert index._plain_path("Patient.telecom.where(system='email')", "Patient") is None
    assert index._plain_path("Patient.nothing", "Patient") is None


# -- the walks of choices, references by type, and ContactPoint systems (#5) ---------------------

OBSERVATION = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "89708-7"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2024-01-17T10:30:00+01:00",
    "valueQuantity": {
        "value": Decimal("52"),
        "unit": "score",
        "system": "http://unitsofmeasure.org",
        "code": "{score}",
    },
    "component": [
        {
            "code": {"text": "item 1"},
            "valueCodeableConcept": {"coding": [{"system": "http://example.org/a", "code": "4"}]},
        },
        {"code": {"text": "item 2"}, "valueQuantity": {"value": 3, "unit": "pts"}},
    ],
}
ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "contained": [{"resourceType": "Practitioner", "id": "pr"}],
    "subject": {"reference": "http://example.org/fhir/Patient/p1/_history/2"},
    "participant": [
        {"individual": {"reference": "Practitioner/lw1"}},
        {"individual": {"reference": "PractitionerRole/r1"}},
        {"individual": {"reference": "#pr"}},  # a contained Practitioner: FHIRPath resolves it
    ],
    "period": {"start": "2024-02-10T10:30:00Z"},
}
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
    "name": [{"family": "O'Connor", "given": ["Zoë"]}],
    "birthDate": "1980-02-29",
    "deceasedDateTime": "2024-03",
    "telecom": [
        {"system": "email", "value": "a@example.org"},
        {"system": "phone", "value": "0113 000 0000"},
        {"value": "no system"},
    ],
    "generalPractitioner": [{"reference": "Organization/B81001"}],
}
GOAL = {
    "resourceType": "Goal",
    "id": "g1",
    "lifecycleStatus": "active",
    "description": {"text": "Meet people"},
    "subject": {"reference": "urn:uuid:1b2c"},
    "startDate": "2024-01-03",
    "target": [{"dueDate": "2024-06-30"}, {"dueDuration": {"value": 3}}],
}
ORGANIZATION = {
    "resourceType": "Organization",
    "id": "org1",
    "name": "Leeds Practice",
    "alias": ["Leeds Practice", "LP"],
}


def _rows(resource: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    rows = index.index_values(resource)
    found = {"tokens": rows.tokens, "strings": rows.strings, "references": rows.references}
    return {**found, "dates": rows.dates, "numbers": rows.numbers}


def test_rows_of_resources_the_walks_index() -> None:
    """The rows, in order, that these resources had before the walks (FHIRPath's)."""
    assert _rows(OBSERVATION) == {
        "tokens": [
            ("combo-code", "http://loinc.org", "89708-7"),
            ("combo-value-concept", "http://example.org/a", "4"),
            ("component-value-concept", "http://example.org/a", "4"),
            ("status", None, "final"),
            ("code", "http://loinc.org", "89708-7"),
        ],
        "strings": [],
        "references": [("subject", "Patient", "p1", "Patient/p1"), ("patient", "Patient", "p1", "Patient/p1")],
        "dates": [("date", "2024-01-17T09:30:00.000000", "2024-01-17T09:30:01.000000")],
        "numbers": [
            ("combo-value-quantity", 52.0, "http://unitsofmeasure.org", "{score}"),
            ("combo-value-quantity", 3.0, None, "pts"),
            ("component-value-quantity", 3.0, None, "pts"),
            ("value-quantity", 52.0, "http://unitsofmeasure.org", "{score}"),
        ],
    }
    subject = "http://example.org/fhir/Patient/p1/_history/2"
    assert _rows(ENCOUNTER) == {
        "tokens": [("class", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB"), ("status", None, "finished")],
        "strings": [],
        "references": [
            ("participant", "Practitioner", "lw1", "Practitioner/lw1"),
            ("participant", "PractitionerRole", "r1", "PractitionerRole/r1"),
            ("participant", None, None, "#pr"),
            ("practitioner", "Practitioner", "lw1", "Practitioner/lw1"),
            ("practitioner", None, None, "#pr"),
            ("subject", "Patient", "p1", subject),
            ("patient", "Patient", "p1", subject),
        ],
        "dates": [("date", "2024-02-10T10:30:00.000000", "9999-12-31T23:59:59.999999")],
        "numbers": [],
    }
    assert _rows(PATIENT) == {
        "tokens": [
            ("deceased", None, "true"),
            ("identifier", "https://fhir.nhs.uk/Id/nhs-number", "9990000018"),
            ("email", "email", "a@example.org"),
            ("phone", "phone", "0113 000 0000"),
            ("telecom", "email", "a@example.org"),
            ("telecom", "phone", "0113 000 0000"),
            ("telecom", None, "no system"),
        ],
        "strings": [
            ("name", "o'connor", "O'Connor"),
            ("name", "zoe", "Zoë"),
            ("family", "o'connor", "O'Connor"),
            ("given", "zoe", "Zoë"),
            ("phonetic", "o'connor", "O'Connor"),
            ("phonetic", "zoe", "Zoë"),
        ],
        "references": [("general-practitioner", "Organization", "B81001", "Organization/B81001")],
        "dates": [
            ("death-date", "2024-03-01T00:00:00.000000", "2024-04-01T00:00:00.000000"),
            ("birthdate", "1980-02-29T00:00:00.000000", "1980-03-01T00:00:00.000000"),
        ],
        "numbers": [],
    }
    assert _rows(GOAL) == {
        "tokens": [("lifecycle-status", None, "active")],
        "strings": [],
        "references": [("subject", None, None, "urn:uuid:1b2c")],
        "dates": [
            ("start-date", "2024-01-03T00:00:00.000000", "2024-01-04T00:00:00.000000"),
            ("target-date", "2024-06-30T00:00:00.000000", "2024-07-01T00:00:00.000000"),
        ],
        "numbers": [],
    }
    assert _rows(ORGANIZATION)["strings"] == [
        ("name", "leeds practice", "Leeds Practice"),
        ("name", "lp", "LP"),
        ("phonetic", "leeds practice", "Leeds Practice"),
    ]


def _extractor(type: str, code: str) -> Any:
    [found] = [compiled for param, compiled in index._extractors(type) if param.code == code]
    assert len(found) == 1
    return found[0]


def test_walks_answer_the_common_forms_and_leave_odd_ones_to_fhirpath() -> None:
    practitioner = _extractor("Encounter", "practitioner")
    value = _extractor("Observation", "value-quantity")
    email = _extractor("Patient", "email")
    assert isinstance(practitioner, index._Walk) and isinstance(email, index._Walk)
    assert isinstance(value, index._Walk) and isinstance(_extractor("Observation", "date"), index._Walk)
    assert practitioner.find({**ENCOUNTER, "participant": ENCOUNTER["participant"][:2]}) == [
        {"reference": "Practitioner/lw1"}
    ]
    assert practitioner.find(ENCOUNTER) is None  # #pr: FHIRPath looks in the contained resources
    assert value.find(OBSERVATION) == [OBSERVATION["valueQuantity"]]
    assert value.find({**OBSERVATION, "valueString": "x"}) is None  # two forms of value[x]
    assert value.find({**OBSERVATION, "_valueQuantity": {"id": "a"}}) is None
    assert value.find({**OBSERVATION, "valueQuantity": None}) is None
    assert value.find({**OBSERVATION, "valueQuantity": [{"value": 1}]}) is None
    assert email.find(PATIENT) == [PATIENT["telecom"][0]]
    assert email.find({**PATIENT, "telecom": [{"_system": {"id": "s"}, "value": "x"}]}) is None
    assert email.find({**PATIENT, "telecom": [{"system": ["email"], "value": "x"}]}) is None
    # A union of strings (or objects) is answered; of numbers, FHIRPath's equality decides.
    names = _extractor("Organization", "name")
    assert isinstance(names, index._Walk) and names.find(ORGANIZATION) == ["Leeds Practice", "Leeds Practice", "LP"]
    assert names.find({**ORGANIZATION, "alias": [1, Decimal("1.0")]}) is None


def test_walks_index_what_fhirpath_finds_where_they_take_odd_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    quantity = OBSERVATION["valueQuantity"]
    odd: list[dict[str, Any]] = [
        OBSERVATION,
        ENCOUNTER,
        PATIENT,
        GOAL,
        ORGANIZATION,
        {**OBSERVATION, "valueString": "x"},
        {**OBSERVATION, "_valueQuantity": {"id": "a"}},
        {**OBSERVATION, "valueQuantity": None, "effectivePeriod": {"start": "2024"}},
        {**OBSERVATION, "value": quantity},
        {**OBSERVATION, "valueQuantity": [quantity]},
        {**OBSERVATION, "valueAge": quantity},  # an Age is a Quantity
        {**OBSERVATION, "valueQuantity": {**quantity, "resourceType": "Patient"}},
        {**OBSERVATION, "component": [{"valueQuantity": quantity, "valueString": "x"}, "not an object"]},
        {**OBSERVATION, "subject": {"reference": "#p"}, "contained": [{"resourceType": "Patient", "id": "p"}]},
        {**OBSERVATION, "subject": {"reference": "Patient?identifier=x"}},
        {**OBSERVATION, "subject": {"identifier": {"value": "x"}}},
        {**OBSERVATION, "subject": {"reference": "https://example.org/fhir/Group/g"}},
        {**ENCOUNTER, "participant": [{"individual": {"reference": "Practitioner/1", "_reference": {"id": "r"}}}]},
        {**PATIENT, "deceasedBoolean": False},
        {**PATIENT, "_deceasedDateTime": {"extension": [{"url": "http://example.org", "valueCode": "x"}]}},
        {**PATIENT, "telecom": [{"_system": {"id": "s"}, "value": "x"}, {"system": None, "value": "y"}]},
        {**PATIENT, "telecom": [{"system": "email", "value": "a@example.org"}, "not an object"]},
        {**GOAL, "startCodeableConcept": {"text": "soon"}},
        {**ORGANIZATION, "alias": [1, Decimal("1.0")]},
        {**ORGANIZATION, "alias": "Leeds Practice", "_alias": {"id": "a"}},
        {
            "resourceType": "Provenance",
            "target": [{"reference": "Patient/1"}, {"reference": "Observation/2"}],
            "occurredDateTime": "2024-01-01",
        },
    ]
    assert _same_rows(odd, monkeypatch) > 50
