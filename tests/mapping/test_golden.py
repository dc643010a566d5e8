"""Every golden case of every mapping gives its expected output (see ``tests/mapping/golden.py``)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.mapping.golden import cases, run_case


@pytest.mark.parametrize("case", cases(), ids=lambda case: f"{case.parent.parent.name}/{case.name}")
def test_golden_case(case: Path) -> None:
    expected_file = case / "expected.json"
    assert expected_file.is_file(), "no expected.json: run .venv/bin/python -m tests.mapping.golden --update"
    expected = orjson.loads(expected_file.read_bytes())
    actual = orjson.loads(orjson.dumps(run_case(case)))
    assert actual["summary"] == expected["summary"]
    assert actual["output"] == expected["output"]


def test_every_mapping_has_golden_cases() -> None:
    mappings = {case.parent.parent.name for case in cases()}
    assert {"sp-referral", "sp-case", "sp-outcomes", "gpconnect-structured", "message-back-to-gp"} <= mappings
