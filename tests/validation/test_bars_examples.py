"""The BaRS 1.4.0 ``$process-message`` request examples (../shared, skipped when absent) parse and are
valid R4."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.fhir import json_format
from adapter.validation.structure import StructuralValidator

BARS = Path(__file__).resolve().parents[3] / "shared" / "examples" / "bars-1.4.0" / "process_message"
REQUESTS = sorted([BARS / "POST-body.json", *(BARS / "request").glob("*.json")]) if BARS.is_dir() else []


@pytest.mark.skipif(not BARS.is_dir(), reason="../shared/examples/bars-1.4.0 is not here")
def test_the_bars_request_examples_are_valid_r4() -> None:
    assert len(REQUESTS) == 4
    validator = StructuralValidator()
    for path in REQUESTS:
        bundle = json_format.loads(path.read_bytes())
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "message", path.name
        assert bundle["entry"][0]["resource"]["resourceType"] == "MessageHeader", path.name
        errors = [(i.expression, i.diagnostics) for i in validator.validate(bundle) if i.is_error]
        assert errors == [], path.name
