"""The plain-path walk that indexes most search parameters finds what our FHIRPath finds.

:class:`adapter.search.index._PlainPath` walks ``Type.a.b`` paths over the JSON instead of running
the compiled expression; every index row must be the same. Checked on the demo data, the profile
examples and the mapping goldens, and on a quarter of the official R4 examples when they are available.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.demo import demo_resources
from adapter.fhir import fhirpath
from adapter.fhir.json_format import loads
from adapter.search import index
from bench.corpus import example_files, official_examples

ROOT = Path(__file__).resolve().parents[2]


def _fhirpath_only(extractors: tuple[tuple[Any, tuple[Any, ...]], ...]) -> tuple[tuple[Any, tuple[Any, ...]], ...]:
    """``extractors`` with each plain walk replaced by the compiled FHIRPath of the same path."""
    return tuple(
        (
            param,
            tuple(
                fhirpath.compile_tree(e.text, fhirpath.parse_tree(e.text, search=True))
                if isinstance(e, index._PlainPath)
                else e
                for e in compiled
            ),
        )
        for param, compiled in extractors
    )


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
        if isinstance(e, index._PlainPath)
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
