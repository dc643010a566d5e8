"""The message back to the GP and referrer (``adapter/mapping/message_back.py``, issue #5): every golden
input gives a valid SP-MessageBackToGP document; outcome changes come from the data; narratives and the
HTML page escape what they show; the document is reproducible; ``flatten`` gives back the scores."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from lxml import html as lxml_html

from adapter.mapping.base import MappingError
from adapter.mapping.message_back import COLUMNS, build, flatten, render_html
from adapter.validation.bundled import bundled_packages, profiles_dir
from adapter.validation.profiles import ProfileValidator
from adapter.validation.xhtml import check_xhtml

FOLDER = Path(__file__).parents[2] / "mappings" / "message-back-to-gp"
CASES = sorted(path.name for path in (FOLDER / "cases").iterdir() if (path / "input.json").is_file())
SPEC: dict[str, Any] = yaml.safe_load((FOLDER / "mapping.yaml").read_text(encoding="utf-8"))
XHTML = "{http://www.w3.org/1999/xhtml}"


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator(bundled_packages())


def case_input(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FOLDER / "cases" / name / "input.json").read_text(encoding="utf-8"))
    return loaded


def document(record: dict[str, Any]) -> dict[str, Any]:
    mapped = build(record)
    assert len(mapped.resources) == 1
    return mapped.resources[0].resource


def resource(record: dict[str, Any], key: str) -> dict[str, Any]:
    """The input resource ``Type/id`` (to change it in a test)."""
    type, _, id = key.partition("/")
    return next(
        e["resource"] for e in record["entry"] if (e["resource"]["resourceType"], e["resource"]["id"]) == (type, id)
    )


def sections(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Composition's sections by their SP-SectionCode code."""
    out = {}
    for section in bundle["entry"][0]["resource"]["section"]:
        codes = [c["code"] for c in section["code"]["coding"] if c["system"].endswith("/SP-SectionCode")]
        out[codes[0]] = section
    return out


def row(bundle: dict[str, Any], tool: str) -> dict[str, str]:
    return next(r for r in flatten(bundle) if r["tool"] == tool)


def test_the_golden_cases_are_there() -> None:
    assert {"closed-case", "no-outcomes", "open-case", "accents"} <= set(CASES)


def test_the_spec_names_this_builder() -> None:
    from adapter.mapping.spec import load

    spec = load("message-back-to-gp")
    assert spec.build is build
    assert spec.output == "document"
    assert spec.format == "json"


@pytest.mark.parametrize("name", CASES)
def test_every_case_gives_a_valid_document(validator: ProfileValidator, name: str) -> None:
    bundle = document(case_input(name))
    assert bundle["type"] == "document"
    assert bundle["meta"]["profile"] == ["https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-MessageBackToGP"]
    assert bundle["entry"][0]["resource"]["resourceType"] == "Composition"
    issues = validator.validate(bundle)
    assert [(i.expression, i.diagnostics) for i in issues if i.is_error] == []
    # No warnings either (dom-6, "a resource should have narrative", is about the copied resources).
    assert [i.diagnostics for i in issues if i.severity == "warning" and "dom-6" not in i.diagnostics] == []


def test_the_identity_and_date_come_from_the_case() -> None:
    mapped = build(case_input("closed-case"))
    bundle = mapped.resources[0].resource
    composition = bundle["entry"][0]["resource"]
    assert bundle["identifier"] == {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle['id']}"}
    assert mapped.resources[0].if_none_exist == f"identifier=urn:ietf:rfc:3986|urn%3Auuid%3A{bundle['id']}"
    # The latest date of the case: the referral status Task was last changed after the final contact.
    assert bundle["timestamp"] == composition["date"] == "2024-05-20T16:00:00+00:00"
    assert composition["status"] == "final"
    other = case_input("closed-case")
    resource(other, "EpisodeOfCare/case")["identifier"][0]["value"] = "CASE-2024-9999"
    assert document(other)["id"] != bundle["id"]


def test_the_same_case_gives_the_same_document() -> None:
    record = case_input("closed-case")
    first = orjson.dumps(document(record), option=orjson.OPT_SORT_KEYS)
    assert orjson.dumps(document(copy.deepcopy(record)), option=orjson.OPT_SORT_KEYS) == first
    shuffled = copy.deepcopy(record)
    shuffled["entry"].reverse()
    assert orjson.dumps(document(shuffled), option=orjson.OPT_SORT_KEYS) == first


def test_sections_have_the_codesystem_codes_and_entries_that_resolve() -> None:
    codes = [c["code"] for c in json.loads((profiles_dir() / "CodeSystem-SP-SectionCode.json").read_text())["concept"]]
    for name in CASES:
        bundle = document(case_input(name))
        assert list(sections(bundle)) == codes
        full_urls = [entry["fullUrl"] for entry in bundle["entry"]]
        assert len(set(full_urls)) == len(full_urls)
        for entry in bundle["entry"]:
            assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"
        for section in sections(bundle).values():
            assert section["text"]["status"] == "generated"
            for reference in section.get("entry", []):
                assert reference["reference"] in full_urls
        # Every reference of every resource resolves inside the document.
        text = orjson.dumps(bundle).decode()
        for reference in set(re.findall(r'"reference":"([^"]+)"', text)):
            assert reference in full_urls or reference.startswith("#"), reference


def test_section_entries_are_the_case_resources() -> None:
    bundle = document(case_input("closed-case"))
    by_url = {entry["fullUrl"]: entry["resource"] for entry in bundle["entry"]}

    def types(code: str) -> list[str]:
        return [by_url[r["reference"]]["resourceType"] for r in sections(bundle)[code].get("entry", [])]

    assert types("referral") == ["ServiceRequest", "Task"]
    assert types("plan") == ["CarePlan", "Goal", "Goal"]
    assert types("activities") == ["CarePlan", "Encounter", "Encounter", "Encounter", "EpisodeOfCare"]
    assert types("outcomes") == ["Observation"] * 8


def test_unused_lists_the_resources_that_are_not_in_the_document() -> None:
    assert build(case_input("closed-case")).unused == ["Condition/hypertension"]
    # A cancelled contact did not take place: it is not counted, and not sent.
    assert build(case_input("no-outcomes")).unused == ["Encounter/contact-3"]
    assert build(case_input("open-case")).unused == []


def test_narratives_say_what_the_case_holds() -> None:
    bundle = document(case_input("closed-case"))
    text = {code: section["text"]["div"] for code, section in sections(bundle).items()}
    assert "15 January 2024" in text["referral"] and "Dr Hannah Fairweather" in text["referral"]
    assert "Loneliness or social isolation" in text["referral"]
    assert "9/10" in text["plan"] and "6/10" in text["plan"]
    assert "3 contacts with the link worker, from 24 January 2024 to 20 May 2024." in text["activities"]
    assert "remote (telephone or video)" in text["activities"]
    assert "Citizens Advice Millbrook" in text["activities"] and "Physical activity" in text["activities"]
    assert "The case was closed on 20 May 2024 (status: finished)." in text["activities"]
    assert "Goals met: walks twice a week" in text["activities"]
    assert "<td>38 (24 January 2024)</td><td>51 (20 May 2024)</td><td>+13 (improved)</td>" in text["outcomes"]
    # Lower is better for anxiety and loneliness.
    assert "<td>-4 (improved)</td>" in text["outcomes"] and "<td>-3 (improved)</td>" in text["outcomes"]


def test_wemwbs_change_is_computed_from_the_scores() -> None:
    assert row(document(case_input("closed-case")), "wemwbs") == {
        "nhs_number": "9990000018",
        "episode_identifier": "CASE-2024-0001",
        "tool": "wemwbs",
        "first_date": "2024-01-24T11:30:00+00:00",
        "first_score": "38",
        "last_date": "2024-05-20T11:30:00+00:00",
        "last_score": "51",
        "change": "+13",
    }
    record = case_input("closed-case")
    resource(record, "Observation/wemwbs-1")["valueInteger"] = 60
    resource(record, "Observation/wemwbs-2")["valueInteger"] = 45
    bundle = document(record)
    assert (row(bundle, "wemwbs")["first_score"], row(bundle, "wemwbs")["change"]) == ("60", "-15")
    assert "<td>-15 (worse)</td>" in sections(bundle)["outcomes"]["text"]["div"]
    resource(record, "Observation/wemwbs-2")["valueInteger"] = 60
    assert row(document(record), "wemwbs")["change"] == "0"


def test_first_and_last_are_by_date_not_by_order_in_the_bundle() -> None:
    record = case_input("closed-case")
    resource(record, "Observation/wemwbs-1")["effectiveDateTime"] = "2024-06-01T09:00:00+00:00"
    found = row(document(record), "wemwbs")
    assert (found["first_date"], found["first_score"]) == ("2024-05-20T11:30:00+00:00", "51")
    assert (found["last_date"], found["last_score"], found["change"]) == ("2024-06-01T09:00:00+00:00", "38", "-13")


def test_a_case_without_follow_up_scores_says_so() -> None:
    bundle = document(case_input("no-outcomes"))
    outcomes = sections(bundle)["outcomes"]["text"]["div"]
    assert "no follow-up score" in outcomes
    assert "(improved)" not in outcomes and "(worse)" not in outcomes
    wemwbs = row(bundle, "wemwbs")
    assert (wemwbs["first_score"], wemwbs["last_date"], wemwbs["last_score"], wemwbs["change"]) == ("31", "", "", "")
    assert bundle["entry"][0]["resource"]["status"] == "final"


def test_an_open_case_is_a_preliminary_document() -> None:
    bundle = document(case_input("open-case"))
    composition = bundle["entry"][0]["resource"]
    assert composition["status"] == "preliminary"
    assert "The case is open (status: active) since 5 June 2024" in sections(bundle)["activities"]["text"]["div"]
    assert bundle["timestamp"] == "2024-06-12T16:00:00+01:00"


@pytest.mark.parametrize(
    ("tool", "code"),
    [
        ("wemwbs", "718426000"),
        ("wemwbs", "885541000000103"),
        ("swemwbs", "718466001"),
        ("swemwbs", "960481000000107"),
    ],
)
def test_current_and_legacy_codes_are_recognised(tool: str, code: str) -> None:
    record = case_input("closed-case")
    for key in ("Observation/wemwbs-1", "Observation/wemwbs-2"):
        resource(record, key)["code"]["coding"][0]["code"] = code
        resource(record, key)["meta"]["profile"] = [
            f"https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-{tool.upper()}"
        ]
    resource(record, "Observation/wemwbs-1")["valueInteger"] = 20
    resource(record, "Observation/wemwbs-2")["valueInteger"] = 30
    found = row(document(record), tool)
    assert (found["first_score"], found["last_score"], found["change"]) == ("20", "30", "+10")


def test_the_tool_codes_are_those_of_the_profiles_value_sets() -> None:
    tools = {tool["key"]: tool for tool in SPEC["outcome_tools"]}
    for key, value_set in (("wemwbs", "ValueSet-SP-WEMWBSCode.json"), ("swemwbs", "ValueSet-SP-SWEMWBSCode.json")):
        compose = json.loads((profiles_dir() / value_set).read_text())["compose"]["include"]
        expected = {(i["system"], c["code"]) for i in compose for c in i["concept"]}
        assert {(c["system"], c["code"]) for c in tools[key]["codes"]} == expected


def test_a_score_out_of_range_is_refused() -> None:
    record = case_input("closed-case")
    resource(record, "Observation/wemwbs-2")["valueInteger"] = 71
    with pytest.raises(MappingError, match="outside 14-70") as caught:
        build(record)
    assert caught.value.field == "Observation/wemwbs-2.value"


def test_entered_in_error_scores_are_left_out() -> None:
    record = case_input("closed-case")
    resource(record, "Observation/wemwbs-2")["status"] = "entered-in-error"
    mapped = build(record)
    assert "Observation/wemwbs-2" in mapped.unused
    assert row(mapped.resources[0].resource, "wemwbs")["last_score"] == ""


@pytest.mark.parametrize("count", [0, 2])
def test_a_case_is_exactly_one_episode_of_care(count: int) -> None:
    record = case_input("closed-case")
    episode = resource(record, "EpisodeOfCare/case")
    record["entry"] = [e for e in record["entry"] if e["resource"] is not episode]
    for n in range(count):
        record["entry"].append({"resource": {**copy.deepcopy(episode), "id": f"case-{n}"}})
    with pytest.raises(MappingError, match="one EpisodeOfCare"):
        build(record)


def test_other_records_are_refused() -> None:
    record = case_input("closed-case")
    del resource(record, "EpisodeOfCare/case")["identifier"]
    with pytest.raises(MappingError, match="no identifier"):
        build(record)
    with pytest.raises(MappingError, match="collection or searchset"):
        build({"resourceType": "Bundle", "type": "transaction", "entry": []})
    with pytest.raises(MappingError, match="collection or searchset"):
        build({"resourceType": "Patient"})


def _escaped_inputs(record: dict[str, Any]) -> list[str]:
    """The input strings that markup would change."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)
        elif isinstance(value, str) and ("<" in value or "&" in value):
            found.append(value)

    walk(record)
    return found


@pytest.mark.parametrize("name", CASES)
def test_every_narrative_is_xhtml_with_its_input_escaped(name: str) -> None:
    record = case_input(name)
    dangerous = _escaped_inputs(record)
    if name == "accents":
        assert len(dangerous) >= 5
    bundle = document(record)
    shown = ""
    for section in sections(bundle).values():
        div = section["text"]["div"]
        assert check_xhtml(div) is None
        root = etree.fromstring(div.encode())
        assert root.tag == f"{XHTML}div"
        assert {element.tag for element in root.iter()} <= {
            f"{XHTML}{tag}" for tag in ("div", "p", "h3", "table", "thead", "tbody", "tr", "th", "td")
        }
        for value in dangerous:
            assert value not in div
        shown += "".join(str(text) for text in root.itertext())
    for value in dangerous:
        if value.startswith(("Says", "What matters", "Grow", "Allotment", "Smith", "Goals met", "REF-")):
            assert value in shown, value  # escaped, not dropped


def test_the_accents_case_keeps_every_character() -> None:
    bundle = document(case_input("accents"))
    composition = bundle["entry"][0]["resource"]
    assert composition["subject"]["display"] == "Zoë O'Brien-Ñúñez"
    plan = sections(bundle)["plan"]["text"]["div"]
    assert "Zoë O'Brien-Ñúñez; Anaïs Łukasiewicz" in plan


def test_the_html_page_escapes_what_it_shows() -> None:
    page = render_html(document(case_input("accents")))
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in page
    assert "St. John's &amp; Ñewtown &lt;Health&gt; Centre" in page
    assert "<h1>Zoë O'Brien-Ñúñez</h1>" in page
    assert "999 000 0042" in page
    # Nothing to load: no links, images or scripts, and a policy that forbids them.
    assert not any(attribute in page for attribute in (" src=", " href=", "@import", "url("))
    assert "default-src 'none'" in page
    tree = lxml_html.document_fromstring(page)
    assert [h.text for h in tree.iter("h2")] == [
        "Referral",
        "Personalised care and support plan",
        "Activities and contacts",
        "Outcomes",
    ]


def test_the_html_page_of_the_profiles_example() -> None:
    example = json.loads((profiles_dir() / "examples" / "Bundle-sp-message-back-to-gp-1.json").read_text())
    page = render_html(example)
    text = etree.tostring(lxml_html.document_fromstring(page), method="text", encoding="unicode")
    for expected in (
        "Ellis Carmody",
        "999 000 0018",
        "14 March 1958",
        "Millbrook Medical Practice",
        "Jordan Ellison",
        "21 May 2024",
        "Outcomes",
        "WEMWBS 38 (24 January 2024) then 51 (20 May 2024).",
    ):
        assert expected in text, expected
    assert row(example, "wemwbs")["change"] == "+13"


def test_the_html_page_does_not_trust_the_narrative() -> None:
    example = json.loads((profiles_dir() / "examples" / "Bundle-sp-message-back-to-gp-1.json").read_text())
    sections_ = example["entry"][0]["resource"]["section"]
    sections_[0]["text"]["div"] = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="x()">Seen <a href="https://evil.example">here</a>'
        '<img src="https://evil.example/t.png"/><script>steal()</script> &amp; done</p></div>'
    )
    sections_[1]["text"]["div"] = "<div>not xhtml <b>at all"
    page = render_html(example)
    assert "<script" not in page and "onclick" not in page and "evil.example" not in page
    assert "<p>Seen here &amp; done</p>" in page
    assert "&lt;div&gt;not xhtml &lt;b&gt;at all" in page


# -- property: flatten(build(case)) gives back the scores that went in ------------------------

TOOLS = SPEC["outcome_tools"]
ZONES = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5))]


@st.composite
def outcome_cases(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The closed case with generated outcome Observations, and the rows they should give."""
    record = case_input("closed-case")
    record["entry"] = [e for e in record["entry"] if e["resource"]["resourceType"] != "Observation"]
    start = datetime(2023, 1, 1, tzinfo=UTC)
    expected: list[dict[str, str]] = []
    for tool in TOOLS:
        count = draw(st.integers(0, 3))
        if not count:
            continue
        minutes = sorted(draw(st.lists(st.integers(0, 1_000_000), min_size=count, max_size=count, unique=True)))
        moments = [(start + timedelta(minutes=m)).astimezone(draw(st.sampled_from(ZONES))) for m in minutes]
        dates = [moment.isoformat() for moment in moments]
        low, high = tool["range"]
        items = [item["code"] for item in tool.get("items") or ()] or [None]
        values = [[draw(st.integers(low, high)) for _ in items] for _ in dates]
        for n, (when, scores) in enumerate(zip(dates, values, strict=True)):
            coding = draw(st.sampled_from(tool["codes"]))
            observation: dict[str, Any] = {
                "resourceType": "Observation",
                "id": f"{tool['key']}-{n}",
                "status": "final",
                "code": {"coding": [dict(coding)]},
                "subject": {"reference": "Patient/patient"},
                "effectiveDateTime": when,
            }
            if items == [None]:
                observation["valueInteger"] = scores[0]
            else:
                observation["component"] = [
                    {"code": {"coding": [dict(code)]}, "valueInteger": score}
                    for code, score in zip(items, scores, strict=True)
                ]
            record["entry"].insert(draw(st.integers(0, len(record["entry"]))), {"resource": observation})
        for i, item in enumerate(tool.get("items") or [None]):
            first, last = values[0][i], values[-1][i]
            expected.append(
                {
                    "nhs_number": "9990000018",
                    "episode_identifier": "CASE-2024-0001",
                    "tool": tool["key"] if item is None else f"{tool['key']}:{item['key']}",
                    "first_date": dates[0],
                    "first_score": str(first),
                    "last_date": dates[-1] if count > 1 else "",
                    "last_score": str(last) if count > 1 else "",
                    "change": (f"{last - first:+d}" if last != first else "0") if count > 1 else "",
                }
            )
    return record, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(outcome_cases())
def test_flatten_gives_back_the_first_and_last_scores(generated: tuple[dict[str, Any], list[dict[str, str]]]) -> None:
    record, expected = generated
    rows = flatten(build(record).resources[0].resource)
    assert rows == expected
    assert all(tuple(found) == COLUMNS for found in rows)
    for found in rows:
        if found["change"]:
            assert int(found["change"]) == int(found["last_score"]) - int(found["first_score"])


def test_the_closure_reason_of_an_sp_case_episode_is_used_when_no_task_gives_one() -> None:
    """A case mapped by sp-case keeps its closure reason in EpisodeOfCare.type (case closed) text."""
    import io

    from adapter.mapping.engine import Mapper
    from adapter.mapping.sources import read_records
    from adapter.mapping.spec import load
    from adapter.validation.bundled import bundled_packages
    from adapter.validation.profiles import ProfileValidator

    spec = load("sp-case")
    source = FOLDER.parent / "sp-case" / "cases" / "full" / "input.json"
    [record] = [
        Mapper(spec, ProfileValidator(bundled_packages())).map(raw)
        for raw in read_records(spec, io.BytesIO(source.read_bytes()), name="input.json")
    ]
    assert record.error is None
    case_bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{item.resource['id']}", "resource": item.resource} for item in record.resources
        ],
    }
    document = build(case_bundle).resources[0].resource
    closure = next(
        section["text"]["div"]
        for entry in document["entry"][:1]
        for section in entry["resource"]["section"]
        if "closed" in section["text"]["div"]
    )
    assert "Goals achieved: connected to a walking group and a befriending service" in closure
