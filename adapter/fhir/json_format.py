"""FHIR R4 JSON: parsing with decimals kept exactly as written, and serialising with orjson.

See https://hl7.org/fhir/R4/json.html. Decimals are parsed as :class:`decimal.Decimal` so that
``0.40`` stays ``0.40`` through parse -> store -> serialise (https://hl7.org/fhir/R4/json.html#primitive
"decimal values ... SHALL be represented as written"). orjson's parser cannot keep the written
form; msgspec's can (``float_hook`` gets the number's text) and parses the R4 examples in 0.6 s
where the standard library's C scanner with ``parse_float`` takes 1.05 s (#2). Whatever msgspec
refuses goes to the standard library, which decides: its result or its error message, so that
both are what ``json.loads`` gives. Output uses orjson with :class:`orjson.Fragment` to write each
Decimal's text unchanged.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import orjson

from adapter.errors import InputTooLargeError, ParseError

__all__ = ["dumps", "loads"]


def _reject_constant(name: str) -> Any:
    raise ParseError(f"JSON value {name} is not allowed in FHIR (numbers must be finite)")


# One decoder for every call: json.loads with these options builds a new decoder and scanner each
# time, 40% of the time it takes to parse a small resource. The standard library shares its own
# default decoder between threads in the same way.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


# https://jcristharif.com/msgspec/api.html#msgspec.json.Decoder: float_hook "for handling decoding
# untyped float literals", called with the literal's text.
_FAST = msgspec.json.Decoder(float_hook=Decimal)


def loads(data: bytes | str) -> Any:
    """Parse FHIR JSON; raise :class:`ParseError` with a readable message when it is not JSON."""
    try:
        return _FAST.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError, ArithmeticError):
        # Not JSON to msgspec, or nested beyond its limit; also a leading byte order mark, a lone
        # surrogate escape ("\ud800") or, in a str, a lone surrogate itself, which json.loads
        # accepts; and a number Decimal cannot hold (1e999999999999999999), refused below.
        return _standard(data)


def _standard(data: bytes | str) -> Any:
    if isinstance(data, bytes):
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from exc
    else:
        text = data.removeprefix("\ufeff")
    try:
        if text.startswith("\ufeff"):  # a second byte order mark, refused as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        # The C scanner counts nesting against the interpreter's recursion limit.
        raise InputTooLargeError("JSON nested too deeply") from exc
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() (4,300) digits
        raise ParseError("not valid JSON: a number has too many digits") from exc
    except ArithmeticError as exc:  # decimal.InvalidOperation: an exponent beyond Decimal's range
        raise ParseError("not valid JSON: a number is out of range") from exc


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"cannot serialise {type(value).__name__} as FHIR JSON")


def dumps(resource: Any, *, indent: bool = False) -> bytes:
    """Serialise to FHIR JSON (UTF-8 bytes), keeping decimals as written."""
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(resource, default=_default, option=option)
