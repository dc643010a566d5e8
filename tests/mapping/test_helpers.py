"""The named helpers of the mapping rules (adapter.mapping.helpers), one by one."""

from __future__ import annotations

import pytest
from lxml import etree

from adapter.mapping.helpers import HELPERS, INVERSES, ArgumentError, Scale
from adapter.mapping.spec import SpecError

WEMWBS = "14 items of 1-5, total 14-70"
ONS4 = "4 items of 0-10, no total"
PAM = "no items, total 1-4"
UCLA = "3 items of 1-3, total 3-9"
NO_ITEMS = (None,) * 14


def scored_total(total: int | None, scale: str, *items: int | None) -> int | None:
    result: int | None = HELPERS["scored-total"](total, scale, *items, *([None] * (14 - len(items))))
    return result


# -- narrative ---------------------------------------------------------------------------------------


def test_narrative_escapes_the_text_and_its_inverse_gives_it_back() -> None:
    text = "José's <b>not</b> keen & prefers 1:1 — Zoë"
    narrative = HELPERS["narrative"](text)
    assert narrative["status"] == "additional"
    div = etree.fromstring(narrative["div"])
    assert div.tag == "{http://www.w3.org/1999/xhtml}div"
    assert "".join(str(part) for part in div.itertext()) == text
    assert INVERSES["narrative"](narrative) == text


@pytest.mark.parametrize("text", [None, ""])
def test_narrative_of_nothing_is_nothing(text: str | None) -> None:
    assert HELPERS["narrative"](text) is None


@pytest.mark.parametrize(
    "narrative",
    [
        None,
        {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>made by a server</p></div>'},
        {"status": "additional", "div": '<div xmlns="http://www.w3.org/1999/xhtml">no paragraph</div>'},
    ],
)
def test_a_narrative_the_helper_did_not_write_gives_no_notes_back(narrative: object) -> None:
    assert INVERSES["narrative"](narrative) is None


# -- scales and totals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "items", "item_range", "total_range"),
    [
        (WEMWBS, 14, (1, 5), (14, 70)),
        ("7 items of 1-5, total 7-35", 7, (1, 5), (7, 35)),
        (ONS4, 4, (0, 10), None),
        (PAM, 0, None, (1, 4)),
        ("1 item of 0-3, total 0-3", 1, (0, 3), (0, 3)),
    ],
)
def test_a_scale_is_read_from_its_constant(
    text: str, items: int, item_range: tuple[int, int] | None, total_range: tuple[int, int] | None
) -> None:
    assert Scale.parse(text) == Scale(text, items, item_range, total_range)


@pytest.mark.parametrize("text", ["14 items, total 14-70", "total 1-4", "14 items of 1-5", ""])
def test_a_malformed_scale_is_a_spec_error(text: str) -> None:
    with pytest.raises(SpecError, match="is not a scale"):
        Scale.parse(text)


def test_a_blank_total_is_the_sum_of_the_items() -> None:
    assert scored_total(None, WEMWBS, *([4] * 14)) == 56
    assert scored_total(None, UCLA, 1, 2, 3) == 6


def test_a_total_equal_to_the_sum_of_the_items_is_kept() -> None:
    assert scored_total(6, UCLA, 1, 2, 3) == 6


def test_a_total_alone_is_checked_and_kept() -> None:
    assert scored_total(41, WEMWBS) == 41
    assert scored_total(2, PAM) == 2


@pytest.mark.parametrize(
    ("total", "scale", "items", "argument", "message"),
    [
        (80, WEMWBS, (), 0, "80 is outside the range 14-70"),
        (13, WEMWBS, (), 0, "13 is outside the range 14-70"),
        (5, PAM, (), 0, "5 is outside the range 1-4"),
        (7, UCLA, (1, 2, 3), 0, r"7 is not the sum of the item scores \(6\)"),
        (None, UCLA, (1, 4, 3), 3, "4 is outside the item range 1-3"),
        (None, ONS4, (7, 11, 6, 3), 3, "11 is outside the item range 0-10"),
        (None, UCLA, (1, 2), 4, r"give all 3 item scores or none \(2 given\)"),
        (None, UCLA, (1, None, 3), 3, r"give all 3 item scores or none \(2 given\)"),
        (None, UCLA, (1, 2, 3, 1), 5, "the scale .* has no item 4"),
        (3, PAM, (1,), 2, "the scale .* has no item 1"),
        (None, WEMWBS, (), 0, "is blank, and so are the item scores"),
        (20, ONS4, (7, 8, 6, 3), 0, "has no total"),
        (None, ONS4, (), 2, "needs its item scores"),
    ],
)
def test_a_score_that_does_not_fit_its_scale_names_the_argument_at_fault(
    total: int | None, scale: str, items: tuple[int | None, ...], argument: int, message: str
) -> None:
    with pytest.raises(ArgumentError, match=message) as caught:
        scored_total(total, scale, *items)
    assert caught.value.argument == argument


def test_a_scale_without_a_total_gives_nothing_once_its_items_are_checked() -> None:
    assert scored_total(None, ONS4, 7, 8, 6, 3) is None


def test_the_inverse_of_a_total_is_the_total() -> None:
    assert INVERSES["scored-total"](52) == 52
    assert INVERSES["scored-total"](None) is None
