"""FHIR JSON parsing: decimals as written, and the errors json.loads itself would give."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from adapter.errors import ParseError
from adapter.fhir.json_format import dumps, loads


def test_decimals_keep_their_written_form() -> None:
    parsed = loads(b'{"value": 0.40, "exponent": 1e400, "count": 3}')
    assert parsed == {"value": Decimal("0.40"), "exponent": Decimal("1E+400"), "count": 3}
    assert dumps(parsed) == b'{"value":0.40,"exponent":1E+400,"count":3}'


@pytest.mark.parametrize(
    "text",
    ['{"a":', "[1, 2,]", '{"a" 1}', "\ufeff{}", '{"a": 1} x', "", '"\\x"'],
)
def test_invalid_json_is_reported_as_json_loads_reports_it(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(ParseError) as raised:
        loads("\ufeff" + text)  # one byte order mark is allowed, a second is not
    error = expected.value
    assert raised.value.message == f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(ParseError, match="NaN is not allowed"):
        loads(b'{"a": NaN}')
