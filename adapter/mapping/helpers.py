"""Named helper functions: what a mapping rule cannot say in data.

A rule ``{path: ..., helper: name, args: [field, ...]}`` calls ``HELPERS[name]`` with the typed values
of its argument fields (``None`` for a field without a value) and puts the result at its path; a
result of ``None`` puts nothing. A helper may have an inverse (``INVERSES[name]``) that a reverse
mapping uses to give the first argument field back from the FHIR value. Helpers are pure and
unit-tested (``tests/mapping/test_helpers.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

__all__ = ["HELPERS", "INVERSES", "helper"]

HELPERS: dict[str, Callable[..., Any]] = {}
INVERSES: dict[str, Callable[[Any], Any]] = {}


def helper(
    name: str, inverse: Callable[[Any], Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        HELPERS[name] = function
        if inverse is not None:
            INVERSES[name] = inverse
        return function

    return register


@helper("given-names", inverse=lambda given: " ".join(given) if isinstance(given, list) else None)
def given_names(text: str | None) -> list[str] | None:
    """``"Mary Ann"`` -> ``["Mary", "Ann"]``: HumanName.given holds each given name on its own
    (https://hl7.org/fhir/R4/datatypes.html#HumanName)."""
    if not text:
        return None
    return text.split()


@helper("sum")
def total(*values: Any) -> int | Decimal | None:
    """The sum of the values given, ``None`` unless every one is given (a total of some items only
    would understate the score)."""
    if not values or any(value is None for value in values):
        return None
    result: int | Decimal = 0
    for value in values:
        result += value
    return result


@helper("score-quantity", inverse=lambda quantity: quantity.get("value") if isinstance(quantity, dict) else None)
def score_quantity(value: int | Decimal | None) -> dict[str, Any] | None:
    """A score as a unitless Quantity (UCUM ``{score}``, https://ucum.org/ucum#section-Curly-Braces)."""
    if value is None:
        return None
    return {"value": value, "unit": "score", "system": "http://unitsofmeasure.org", "code": "{score}"}
