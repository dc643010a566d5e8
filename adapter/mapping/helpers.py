"""Named helper functions: what a mapping rule cannot say in data.

A rule ``{path: ..., helper: name, args: [field, ...]}`` calls ``HELPERS[name]`` with the typed values
of its argument fields (``None`` for a field without a value) and puts the result at its path; a
result of ``None`` puts nothing. A helper may have an inverse (``INVERSES[name]``) that a reverse
mapping uses to give the first argument field back from the FHIR value. Helpers are pure and
unit-tested (``tests/mapping/test_helpers.py``).

An argument may also name one of the spec's ``constants`` (a string): data such as a scale's ranges
stays in the spec. A helper refuses a value by raising :class:`ArgumentError` with the position of
the argument at fault; the engine reports it as a :class:`~adapter.mapping.base.MappingError` naming
that argument's field.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from adapter.mapping.base import MappingError
from adapter.mapping.spec import SpecError

__all__ = ["HELPERS", "INVERSES", "ArgumentError", "Scale", "helper"]

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


class ArgumentError(MappingError):
    """A helper's argument it cannot take; ``argument`` is its position in the rule's ``args``."""

    def __init__(self, message: str, argument: int = 0) -> None:
        super().__init__(message)
        self.argument = argument


@helper("given-names", inverse=lambda given: " ".join(given) if isinstance(given, list) else None)
def given_names(text: str | None) -> list[str] | None:
    """``"Mary Ann"`` -> ``["Mary", "Ann"]``: HumanName.given holds each given name on its own
    (https://hl7.org/fhir/R4/datatypes.html#HumanName)."""
    if not text:
        return None
    return text.split()


_XHTML_DIV = '<div xmlns="http://www.w3.org/1999/xhtml">'
_NARRATIVE = re.compile(re.escape(_XHTML_DIV) + r"<p>(.*)</p></div>", re.DOTALL)


def _narrative_text(narrative: Any) -> str | None:
    if not isinstance(narrative, dict) or narrative.get("status") != "additional":
        return None
    found = _NARRATIVE.fullmatch(str(narrative.get("div", "")))
    return html.unescape(found.group(1)) if found else None


@helper("narrative", inverse=_narrative_text)
def narrative(text: str | None) -> dict[str, str] | None:
    """Free text as a resource's narrative, status ``additional`` (it holds what the structured data
    does not): for notes where R4 has no ``note`` element, such as an Encounter's
    (https://hl7.org/fhir/R4/narrative.html#Narrative). The text is escaped, never parsed."""
    if not text:
        return None
    return {"status": "additional", "div": f"{_XHTML_DIV}<p>{html.escape(text, quote=False)}</p></div>"}


_SCALE = re.compile(
    r"(?:(?P<items>\d+) items? of (?P<item_min>\d+)-(?P<item_max>\d+)|no items), "
    r"(?:total (?P<total_min>\d+)-(?P<total_max>\d+)|no total)"
)


@dataclass(frozen=True, slots=True)
class Scale:
    """How an assessment tool is scored, as a spec constant says it: ``"14 items of 1-5, total 14-70"``,
    ``"4 items of 0-10, no total"``, ``"no items, total 1-4"``."""

    text: str
    items: int
    item_range: tuple[int, int] | None
    total_range: tuple[int, int] | None

    @staticmethod
    @cache
    def parse(text: str) -> Scale:
        found = _SCALE.fullmatch(text.strip())
        if found is None:
            # A mistake in the spec, not in the record: let it stop the run.
            raise SpecError(f"{text!r} is not a scale such as '14 items of 1-5, total 14-70'")
        items = int(found["items"] or 0)
        item_range = (int(found["item_min"]), int(found["item_max"])) if items else None
        total_range = (int(found["total_min"]), int(found["total_max"])) if found["total_min"] else None
        return Scale(text.strip(), items, item_range, total_range)


@helper("scored-total", inverse=lambda value: value if isinstance(value, int) else None)
def scored_total(total: int | None, scale: str, *items: int | None) -> int | None:
    """The total score of an assessment, checked against its ``scale`` (:class:`Scale`); ``items`` are
    the item-score fields of the source, in order (the scale says how many belong to the tool).

    The item scores are all given or none; each is in the scale's item range; items beyond the
    tool's count are blank. A blank total is the sum of the items; a given total equals it. The
    total is in the scale's total range; a scale without a total gives ``None`` (and refuses one).
    A fault raises :class:`ArgumentError` naming the argument (0: the total; 2 + i: item i + 1).
    """
    measure = Scale.parse(scale)
    for index, value in enumerate(items):
        if index >= measure.items and value is not None:
            raise ArgumentError(f"{value} is given, but the scale ({measure.text}) has no item {index + 1}", 2 + index)
    mine = items[: measure.items]
    for index, value in enumerate(mine):
        low, high = measure.item_range or (0, 0)
        if value is not None and not low <= value <= high:
            raise ArgumentError(f"{value} is outside the item range {low}-{high} ({measure.text})", 2 + index)
    given = [value for value in mine if value is not None]
    if given and len(given) < measure.items:
        missing = next(index for index, value in enumerate(mine) if value is None)
        raise ArgumentError(f"is blank: give all {measure.items} item scores or none ({len(given)} given)", 2 + missing)
    if measure.total_range is None:
        if total is not None:
            raise ArgumentError(f"{total} is given, but the scale ({measure.text}) has no total")
        if measure.items and not given:
            raise ArgumentError(f"is blank: the scale ({measure.text}) needs its item scores", 2)
        return None
    if given:
        derived = sum(given)
        if total is not None and total != derived:
            raise ArgumentError(f"{total} is not the sum of the item scores ({derived})")
        total = derived
    if total is None:
        raise ArgumentError(f"is blank, and so are the item scores ({measure.text})")
    low, high = measure.total_range
    if not low <= total <= high:
        raise ArgumentError(f"{total} is outside the range {low}-{high} ({measure.text})")
    return total
