"""The official R4 examples: valid ones pass, the genuinely invalid ones (listed) fail.

A sample ships in ``tests/data/r4-examples``; the full corpus (5,306 files) is fetched once with
``npm pack`` by ``bench/corpus.py`` and checked too (skipped, with the reason, when it cannot be had).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter.fhir.json_format import loads
from adapter.validation.structure import StructuralValidator
from bench.corpus import example_files, official_examples

DATA = Path(__file__).parent / "data"
KNOWN_INVALID = {
    name: rule
    for name, rule in json.loads((DATA / "r4-examples-known-invalid.json").read_text()).items()
    if not name.startswith("_")
}
SAMPLE = sorted((DATA / "r4-examples").glob("*.json"))
VALIDATOR = StructuralValidator()


def error_lines(path: Path) -> list[str]:
    issues = VALIDATOR.validate(loads(path.read_bytes()))
    return [f"{i.expression}: {i.diagnostics}" for i in issues if i.is_error]


@pytest.mark.parametrize("path", SAMPLE, ids=[p.name for p in SAMPLE])
def test_sample_example(path: Path) -> None:
    errors = error_lines(path)
    if path.name in KNOWN_INVALID:
        assert errors, f"{path.name} breaks {KNOWN_INVALID[path.name]} but no error was reported"
    else:
        assert errors == []


def test_full_official_corpus() -> None:
    folder = official_examples()
    if folder is None:
        pytest.skip("official R4 examples not available (npm pack hl7.fhir.r4.examples@4.0.1 failed)")
    files = example_files(folder)
    assert len(files) == 5306
    invalid = {path.name: lines for path in files if (lines := error_lines(path))}
    unexpected = {name: lines[:3] for name, lines in invalid.items() if name not in KNOWN_INVALID}
    assert unexpected == {}
    assert set(KNOWN_INVALID) - set(invalid) == set()
