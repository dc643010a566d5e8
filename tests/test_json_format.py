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


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1.50, "b": -0.0, "c": 1E-7, "d": 123456789012345678901234567890, "e": -0}',
        b'{"a": 1, "a": 2.0}',  # the last of a repeated key, as json.loads
        b'\xef\xbb\xbf{"bom": "one is allowed"}',
        b'{"lone": "\\ud800", "pair": "\\ud83d\\ude00"}',  # json.loads accepts a lone surrogate
        '{"text": "caf\u00e9 \u2713"}',
    ],
)
def test_the_quick_parser_gives_what_the_standard_library_gives(data: bytes | str) -> None:
    """msgspec parses first; what it refuses goes to json.loads (#2). Same values, same decimal text."""
    from adapter.fhir.json_format import _standard

    def exact(value: object) -> object:
        if isinstance(value, dict):
            return {k: exact(v) for k, v in value.items()}
        return (type(value).__name__, str(value))

    assert exact(loads(data)) == exact(_standard(data))
    assert exact(loads(data)) == exact(json.loads(data, parse_float=Decimal))


def test_nesting_beyond_the_limit_is_too_large_not_a_crash() -> None:
    from adapter.errors import InputTooLargeError

    with pytest.raises(InputTooLargeError):
        loads(b"[" * 100_000 + b"]" * 100_000)


def test_a_lone_surrogate_in_a_str_is_parsed_as_json_loads_parses_it() -> None:
    """msgspec cannot encode it to UTF-8 (UnicodeEncodeError); the standard library takes it."""
    assert loads('{"a": "x\ud800"}') == {"a": "x\ud800"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON: a number has too many digits"),
        (b'{"a": 1e999999999999999999999}', "not valid JSON: a number is out of range"),
    ],
)
def test_numbers_beyond_what_python_holds_are_parse_errors_not_crashes(data: bytes, message: str) -> None:
    """Both escaped loads as ValueError and decimal.InvalidOperation (a 500 from the API)."""
    with pytest.raises(ParseError) as raised:
        loads(data)
    assert raised.value.message == message
