"""The sp-outcomes mapping: assessments (CSV) -> an Observation per assessment with the profile of
its tool, and a QuestionnaireResponse of its item scores; and back (mappings/sp-outcomes)."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.mapping.commands import map_records
from adapter.mapping.engine import MappedRecord, Mapper
from adapter.mapping.helpers import Scale
from adapter.mapping.ids import deterministic_id, identity
from adapter.mapping.reverse import Resolver, unmap
from adapter.mapping.sources import RawRecord, extract, read_records
from adapter.mapping.spec import load
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator
from bench.api import nhs_numbers

CASES = Path(__file__).resolve().parents[2] / "mappings" / "sp-outcomes" / "cases"
SPEC = load("sp-outcomes")
VALIDATOR = ProfileValidator(bundled_packages())
MAPPER = Mapper(SPEC, VALIDATOR)
PROFILE = "https://sp-fhir-adapter.org/fhir/StructureDefinition/"
ITEMS = [f"item_{n}" for n in range(1, 15)]
HEADER = "assessment_id,nhs_number,tool,date,total," + ",".join(ITEMS) + ",comment"


def row(assessment: str, tool: str, total: object = "", items: tuple[int, ...] = (), when: str = "20/05/2024") -> str:
    cells = [str(item) for item in items] + [""] * (14 - len(items))
    return ",".join([assessment, "9990000018", tool, when, str(total), *cells, ""])


def mapped(data: bytes | str, name: str = "input.csv") -> list[MappedRecord]:
    source = data.encode() if isinstance(data, str) else data
    return [MAPPER.map(raw) for raw in read_records(SPEC, io.BytesIO(source), name=name)]


def golden(name: str) -> list[MappedRecord]:
    return mapped((CASES / name / "input.csv").read_bytes())


def of_type(result: MappedRecord, kind: str) -> list[dict[str, Any]]:
    assert result.error is None, result.error.message
    return [item.resource for item in result.resources if item.resource["resourceType"] == kind]


def observation(result: MappedRecord) -> dict[str, Any]:
    [found] = of_type(result, "Observation")
    return found


# -- golden inputs -----------------------------------------------------------------------------------


def test_each_tool_gives_an_observation_with_its_profile_code_and_score() -> None:
    results = golden("totals")
    observations = [observation(result) for result in results]
    assert [o["meta"]["profile"] for o in observations] == [
        [f"{PROFILE}SP-{name}"] for name in ("WEMWBS", "SWEMWBS", "ONS4", "PAM", "UCLALoneliness")
    ]
    assert [o["code"]["coding"][0]["code"] for o in observations] == [
        "718426000",
        "718466001",
        "ons4",
        "962851000000103",
        "ucla-3",
    ]
    assert [o.get("valueInteger") for o in observations] == [41, 19, None, 2, 8]
    assert all(o["status"] == "final" and o["effectiveDateTime"] == "2024-01-17" for o in observations)
    assert observations[0]["note"] == [{"text": "Baseline at first meeting"}]
    ons4 = observations[2]
    assert [(c["code"]["coding"][0]["code"], c["valueInteger"]) for c in ons4["component"]] == [
        ("life-satisfaction", 4),
        ("worthwhile", 5),
        ("happiness", 3),
        ("anxiety", 7),
    ]
    # Totals only: no QuestionnaireResponse, nothing derived from one. ONS4's answers are its items.
    assert [len(of_type(result, "QuestionnaireResponse")) for result in results] == [0, 0, 1, 0, 0]
    assert ["derivedFrom" in o for o in observations] == [False, False, True, False, False]


def test_item_scores_give_a_questionnaire_response_and_a_derived_total() -> None:
    wemwbs, ons4, swemwbs, ucla = golden("items")
    [response] = of_type(wemwbs, "QuestionnaireResponse")
    [patient] = of_type(wemwbs, "Patient")
    total = observation(wemwbs)
    assert total["valueInteger"] == 52
    assert total["derivedFrom"] == [{"reference": f"urn:uuid:{response['id']}"}]
    assert response["status"] == "completed"
    assert response["subject"] == {"reference": f"urn:uuid:{patient['id']}"}
    assert response["authored"] == "2024-05-20"
    assert response["identifier"]["value"] == "ASM-0101/items"
    assert [item["linkId"] for item in response["item"]] == [str(n) for n in range(1, 15)]
    assert [item["answer"][0]["valueInteger"] for item in response["item"]] == [
        4,
        3,
        4,
        4,
        3,
        4,
        4,
        3,
        4,
        4,
        3,
        4,
        4,
        4,
    ]
    [ons4_response] = of_type(ons4, "QuestionnaireResponse")
    assert [item["answer"][0]["valueInteger"] for item in ons4_response["item"]] == [7, 8, 6, 3]
    assert [c["valueInteger"] for c in observation(ons4)["component"]] == [7, 8, 6, 3]
    assert "valueInteger" not in observation(ons4)
    assert observation(swemwbs)["valueInteger"] == 25
    assert len(of_type(swemwbs, "QuestionnaireResponse")[0]["item"]) == 7
    assert observation(ucla)["valueInteger"] == 4


def test_dates_in_either_format() -> None:
    assert [observation(result)["effectiveDateTime"] for result in golden("mixed-dates")] == [
        "2024-02-03",
        "2024-06-03",
        "2024-06-03",
    ]


def test_out_of_range_rows_are_refused_naming_row_and_column(tmp_path: Path) -> None:
    with (CASES / "out-of-range" / "input.csv").open("rb") as handle:
        summary = map_records("sp-outcomes", handle, "input.csv", str(tmp_path / "out.json"), validator=VALIDATOR)
    assert (summary.records, summary.mapped, summary.rejected) == (6, 1, 5)
    assert [(item.record, item.field) for item in summary.rejections] == [
        (1, "total"),
        (2, "item_2"),
        (3, "total"),
        (4, "item_3"),
        (5, "total"),
    ]
    reasons = [item.reason for item in summary.rejections]
    assert reasons[0] == "80 is outside the range 14-70 (14 items of 1-5, total 14-70)"
    assert reasons[1] == "11 is outside the item range 0-10 (4 items of 0-10, no total)"
    assert reasons[2] == "30 is not the sum of the item scores (25)"
    assert reasons[3] == "is blank: give all 3 item scores or none (2 given)"
    assert reasons[4] == "5 is outside the range 1-4 (no items, total 1-4)"
    bundle = orjson.loads((tmp_path / "out.json").read_bytes())
    [kept] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert kept["identifier"][0]["value"] == "ASM-0306"


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        (row("X1", "SWEMWBS", items=(4, 3, 4, 4, 3, 4, 3, 2)), "item_8", "has no item 8"),
        (row("X2", "ONS4", 24, items=(7, 8, 6, 3)), "total", "has no total"),
        (row("X3", "PAM", 3, items=(2,)), "item_1", "has no item 1"),
        (row("X4", "ONS4"), "item_1", "needs its item scores"),
        (row("X5", "WEMWBS"), "total", "is blank, and so are the item scores"),
        (row("X6", "UCLA", items=(1, 2, 4)), "item_3", "outside the item range 1-3"),
        (row("X7", "EQ-5D", 10), "tool", "is not a known value"),
        (row("X8", "WEMWBS", 50, when="2024/05/20"), "date", "is not a date"),
        (row("X9", "WEMWBS", "fifty"), "total", "is not an integer"),
    ],
)
def test_a_row_that_does_not_fit_its_tool_is_refused(line: str, field: str, message: str) -> None:
    [result] = mapped(f"{HEADER}\n{line}\n")
    assert result.error is not None
    assert (result.error.record, result.error.field) == (1, field)
    assert message in result.error.message


def test_a_windows_1252_export_is_read_as_such() -> None:
    first, second = golden("windows-1252")
    assert observation(first)["note"] == [{"text": "Séance de suivi: café with the walking group"}]
    assert observation(second)["note"] == [{"text": "Zoë O'Brien: naïve résumé — fine"}]


def test_a_byte_order_mark_does_not_hide_the_first_column() -> None:
    first, second = golden("bom")
    assert observation(first)["identifier"][0]["value"] == "ASM-0501"
    assert observation(second)["valueInteger"] == 4
    assert first.unused == []


def test_older_snomed_codes_are_taken_and_the_current_ones_given() -> None:
    results = golden("legacy-codes")
    assert [observation(r)["code"]["coding"][0]["code"] for r in results] == ["718426000", "718426000", "718466001"]
    assert [observation(r)["meta"]["profile"] for r in results] == [
        [f"{PROFILE}SP-WEMWBS"],
        [f"{PROFILE}SP-WEMWBS"],
        [f"{PROFILE}SP-SWEMWBS"],
    ]
    raw = next(read_records(SPEC, io.BytesIO((CASES / "legacy-codes" / "input.csv").read_bytes()), name="x.csv"))
    assert extract(SPEC, raw).values["tool"] == "WEMWBS"


def test_the_patient_is_the_one_the_other_mappings_give() -> None:
    [result] = mapped(f"{HEADER}\n{row('X1', 'PAM', 2)}\n")
    [patient] = of_type(result, "Patient")
    assert patient["id"] == deterministic_id("Patient", identity("https://fhir.nhs.uk/Id/nhs-number", "9990000018"))


# -- reverse -----------------------------------------------------------------------------------------


def test_each_assessment_of_a_person_gets_back_only_its_own_items() -> None:
    results = golden("totals") + golden("items")
    stored = [item.resource for result in results for item in result.resources]
    back = {record["assessment_id"]: record for record in unmap(SPEC, Resolver(stored))}
    assert len(back) == 9
    assert not any(name in back["ASM-0001"] for name in ITEMS)
    assert [back["ASM-0003"][name] for name in ITEMS[:4]] == ["4", "5", "3", "7"]
    assert back["ASM-0101"]["item_14"] == "4"
    # The derived total comes back as a total: not reversible (see the property test).
    assert back["ASM-0101"]["total"] == "52"
    assert back["ASM-0101"]["date"] == "20/05/2024"


@pytest.mark.parametrize("name", ["totals", "items", "mixed-dates", "windows-1252", "bom", "legacy-codes"])
def test_each_golden_input_comes_back_the_same_but_for_derived_totals(name: str) -> None:
    raws = list(read_records(SPEC, io.BytesIO((CASES / name / "input.csv").read_bytes()), name="input.csv"))
    results = [MAPPER.map(raw) for raw in raws]
    stored = [item.resource for result in results for item in result.resources]
    back = list(unmap(SPEC, Resolver(stored)))
    assert [extract(SPEC, RawRecord(1, record)).values for record in back] == [
        _with_derived_total(extract(SPEC, raw).values) for raw in raws
    ]


# -- source -> FHIR -> source ------------------------------------------------------------------------

_NUMBERS = [number for number, _ in zip(nhs_numbers(), range(200), strict=False)]
_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyzÀÉÎÕÜßçñëø'&<>\"/:;!?, -", min_size=1, max_size=30).filter(
    lambda value: value.strip() == value and value.strip() != ""
)
#: Each tool's scale, from the spec's constants (the same data the mapping checks against).
SCALES = {tool: Scale.parse(SPEC.constants[f"{tool.lower()}_scale"]) for tool in SPEC.lookups["tool"].canonical_sources}


def _with_derived_total(values: dict[str, Any]) -> dict[str, Any]:
    """Not reversible: a blank total that the items gave comes back as that total (the
    Observation holds the total, and nothing says the source left it blank)."""
    scale = SCALES[values["tool"]]
    items = [values[name] for name in ITEMS if name in values]
    if "total" not in values and items and scale.total_range is not None:
        return {**values, "total": sum(items)}
    return values


@st.composite
def assessment_rows(draw: st.DrawFn) -> dict[str, str]:
    tool = draw(st.sampled_from(sorted(SCALES)))
    scale = SCALES[tool]
    record = {
        "assessment_id": draw(st.from_regex(r"ASM-[0-9]{1,8}", fullmatch=True)),
        "nhs_number": draw(st.sampled_from(_NUMBERS)),
        "tool": tool,
        "date": draw(st.dates(min_value=date(2000, 1, 1))).strftime(draw(st.sampled_from(SPEC.field("date").formats))),
    }
    with_items = scale.items > 0 and (scale.total_range is None or draw(st.booleans()))
    if with_items:
        assert scale.item_range is not None
        items = draw(st.lists(st.integers(*scale.item_range), min_size=scale.items, max_size=scale.items))
        record.update({name: str(value) for name, value in zip(ITEMS, items, strict=False)})
        if scale.total_range is not None and draw(st.booleans()):
            record["total"] = str(sum(items))
    else:
        assert scale.total_range is not None
        record["total"] = str(draw(st.integers(*scale.total_range)))
    if draw(st.booleans()):
        record["comment"] = draw(_text)
    if draw(st.booleans()):
        record["nhs_number_status"] = draw(st.sampled_from(SPEC.lookups["nhs-number-status"].canonical_sources))
    return record


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assessment_rows())
def test_every_field_survives_source_to_fhir_to_source(record: dict[str, str]) -> None:
    result = MAPPER.map(RawRecord(1, record))
    assert result.error is None, result.error.message
    [back] = list(unmap(SPEC, Resolver(item.resource for item in result.resources)))
    original = extract(SPEC, RawRecord(1, record)).values
    assert extract(SPEC, RawRecord(1, back)).values == _with_derived_total(original)
