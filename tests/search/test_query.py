"""Parsing a FHIR search: values, prefixes, modifiers, chains, result parameters, strict and lenient."""

from __future__ import annotations

import unicodedata

import pytest

from adapter.api.context import full_condition
from adapter.errors import InputError
from adapter.search.index import date_range, index_values, normalise
from adapter.search.query import (
    MAX_COUNT,
    DateValue,
    NumberValue,
    SearchQuery,
    TokenValue,
    parse_search,
    parse_token_condition,
    split_values,
    unescape,
)


def test_commas_split_values_unless_escaped() -> None:
    assert [unescape(part) for part in split_values("a,b\\,c,d\\\\,e\\$")] == ["a", "b,c", "d\\", "e$"]


def test_token_forms() -> None:
    [criterion] = parse_search("Patient", [("identifier", "sys|1,|2,sys|,3,a\\|b|c")]).criteria
    assert criterion.values == (
        TokenValue("sys", "1"),
        TokenValue("", "2"),
        TokenValue("sys", None),
        TokenValue(None, "3"),
        TokenValue("a|b", "c"),
    )


NHS = "https://fhir.nhs.uk/Id/nhs-number"

#: Conditions that parse_token_condition takes: business identifiers as the mappings write them
#: (percent-encoded as mappings.identity encodes them), and the token forms around them.
SHORT_WAY = [
    ("Patient", f"identifier={NHS}|9990000018"),
    ("Task", "identifier=https://sp-fhir-adapter.org/fhir/Id/referral-id|REF-0002579%2Ftask"),
    ("Practitioner", "identifier=https://sp-fhir-adapter.org/fhir/Id/referrer|B81033%2FDr%20Referrer%2039"),
    ("Patient", "identifier=|9990000018"),  # no system
    ("Patient", f"identifier={NHS}|"),  # any code of the system
    ("Patient", "identifier=9990000018"),  # any system
    ("Patient", "identifier="),
    ("Patient", "identifier=|"),
    ("Patient", "identifier=a|b|c"),  # split on the first bar
    ("Patient", "identifier=sys|a+b"),  # + is a space in a query string
    ("Patient", "identifier=sys%7Ccode"),  # an encoded bar is a bar once decoded
    ("Patient", "identifier=sys|%C3%A9t%C3%A9"),  # UTF-8
    ("Patient", "identifier=sys|%zz%2"),  # not escapes: kept as written
    ("Patient", "identifier=sys|%25"),
    ("Patient", f"identifier={NHS}|1&identifier={NHS}|2"),  # ANDed
    ("Patient", f"identifier={NHS}|1&gender=female"),
    ("Observation", "code=http://loinc.org|1234-5&status=final"),
    ("Organization", "identifier=https://fhir.nhs.uk/Id/ods-organization-code|B81001"),
]

#: Conditions it leaves to the full parser: escapes, commas, modifiers, chains, _ parameters,
#: other parameter types, a type prefix, unknown parameters and malformed query strings.
FULL_WAY = [
    ("Patient", "identifier=sys\\|a|code"),
    ("Patient", "identifier=sys|a\\,b"),
    ("Patient", "identifier=sys|a\\$b"),
    ("Patient", "identifier=sys|a\\\\b"),
    ("Patient", "identifier=sys|a%5C%7Cb"),  # an encoded backslash
    ("Patient", "identifier=a|1,b|2"),  # ORed
    ("Patient", "identifier=sys|a%2Cb"),  # an encoded comma
    ("Patient", "identifier:exact=x"),
    ("Patient", "identifier:missing=true"),
    ("Patient", "gender:missing=false"),
    ("Patient", "gender:text=female"),
    ("Patient", "name:exact=Smith"),
    ("ServiceRequest", f"subject.identifier={NHS}|9990000018"),
    ("ServiceRequest", f"patient.identifier={NHS}|9990000018"),
    ("ServiceRequest", f"subject:Patient.identifier={NHS}|9990000018"),
    ("Patient", "_id=abc"),
    ("Patient", "_id=a,b"),
    ("Patient", "_tag=http://example.org|x"),
    ("Patient", f"_format=json&identifier={NHS}|1"),
    ("Patient", f"Patient?identifier={NHS}|1"),
    ("Patient", f"?identifier={NHS}|1"),
    ("Patient", "ident%69fier=sys|1"),  # an encoded name
    ("Patient", "name=Smith"),
    ("Patient", "birthdate=2020"),
    ("Patient", "general-practitioner=Practitioner/1"),
    ("Patient", "identifier"),  # no =
    ("Patient", f"identifier={NHS}|1&"),
    ("Patient", f"&identifier={NHS}|1"),
    ("Patient", "nonsense=1"),
    ("Patient", f"identifier={NHS}|1&nonsense=1"),
    ("Patient", "birthdate=tomorrow"),
    ("Patient", ""),
    ("Patient", "&"),
    ("NotAType", "identifier=a|b"),
]


def _full_way(type: str, text: str) -> SearchQuery | str:
    """What a conditional create's If-None-Exist parses to, or the message it is refused with."""
    try:
        return full_condition(type, text, "ifNoneExist")
    except InputError as exc:
        return exc.message


@pytest.mark.parametrize(("type", "text"), SHORT_WAY)
def test_token_conditions_parse_the_short_way_to_the_full_parsers_query(type: str, text: str) -> None:
    short = parse_token_condition(type, text)
    assert short is not None
    assert short == _full_way(type, text)


@pytest.mark.parametrize(("type", "text"), FULL_WAY)
def test_other_conditions_go_the_full_way(type: str, text: str) -> None:
    assert parse_token_condition(type, text) is None
    _full_way(type, text)  # parses, or is refused with an InputError (not anything else)


def test_the_short_way_gives_the_values_each_token_form_means() -> None:
    def values(text: str) -> list[tuple[str | None, str | None]]:
        query = parse_token_condition("Patient", text)
        assert query is not None
        return [(value.system, value.code) for criterion in query.criteria for value in criterion.values]

    assert values(f"identifier={NHS}|1&identifier=|2&identifier=sys|&identifier=3") == [
        (NHS, "1"),
        ("", "2"),
        ("sys", None),
        (None, "3"),
    ]
    assert values("identifier=a%2Fb|c+d%20e") == [("a/b", "c d e")]


def test_prefixes_and_partial_dates_become_ranges() -> None:
    [criterion] = parse_search("Patient", [("birthdate", "ge2026-02")]).criteria
    assert criterion.values == (DateValue("ge", "2026-02-01T00:00:00.000000", "2026-03-01T00:00:00.000000"),)
    assert date_range("2026-12") == ("2026-12-01T00:00:00.000000", "2027-01-01T00:00:00.000000")
    assert date_range("2026-11-23T23:30:00-01:00") == ("2026-11-24T00:30:00.000000", "2026-11-24T00:30:01.000000")
    assert date_range("2026-02-30") is None and date_range("tomorrow") is None


def test_numbers_carry_the_range_of_their_precision() -> None:
    [criterion] = parse_search("Observation", [("value-quantity", "lt5.40|http://unitsofmeasure.org|mg")]).criteria
    assert criterion.values == (NumberValue("lt", 5.4, 5.395, 5.405, "http://unitsofmeasure.org", "mg"),)


def test_chains_resolve_to_the_targets_that_have_the_parameter() -> None:
    [criterion] = parse_search("ServiceRequest", [("patient.identifier", "9990000018")]).criteria
    assert criterion.targets == ("Patient",) and criterion.chain[0].param.code == "identifier"
    [typed] = parse_search("ServiceRequest", [("subject:Patient.name", "x")]).criteria
    assert typed.targets == ("Patient",)
    # subject can point at Patient, Group, Location, Device: only those with "identifier" are chained.
    [wide] = parse_search("ServiceRequest", [("subject.identifier", "x")]).criteria
    assert set(wide.targets) == {"Patient", "Group", "Location", "Device"}


@pytest.mark.parametrize(
    "pair",
    [
        ("foo", "1"),
        ("_text", "x"),
        ("code-value-quantity", "x$1"),
        ("name:below", "x"),
        ("_summary", "true"),
        ("_has", "x"),
    ],
)
def test_unsupported_parameters_fail_strict_and_are_reported_lenient(pair: tuple[str, str]) -> None:
    with pytest.raises(InputError) as caught:
        parse_search("Observation", [pair], strict=True)
    assert caught.value.status == 400 and caught.value.expression
    lenient = parse_search("Observation", [pair])
    assert lenient.criteria == () and len(lenient.ignored) == 1 and pair[0] in lenient.ignored[0]


@pytest.mark.parametrize(
    "pair",
    [
        ("birthdate", "yesterday"),
        ("_count", "-1"),
        ("_count", "ten"),
        ("_include", "Patient"),
        ("_total", "all"),
        ("general-practitioner:missing", "maybe"),
        ("_include", "Observation:subject"),
    ],
)
def test_unreadable_values_are_errors_even_when_lenient(pair: tuple[str, str]) -> None:
    with pytest.raises(InputError):
        parse_search("Patient", [pair])


def test_a_huge_count_is_capped_with_a_warning() -> None:
    query = parse_search("Patient", [("_count", "10000000")])
    assert query.count == MAX_COUNT and "10000000" in query.warnings[0]


def test_result_parameters() -> None:
    query = parse_search(
        "ServiceRequest",
        [
            ("_sort", "-authored,_id"),
            ("_include", "ServiceRequest:subject:Patient"),
            ("_revinclude:iterate", "Task:focus"),
            ("_elements", "status, subject"),
            ("_summary", "count"),
            ("_format", "xml"),
        ],
    )
    assert [(key.param.code, key.descending) for key in query.sort] == [("authored", True), ("_id", False)]
    assert [(i.source, i.param, i.target) for i in query.includes] == [("ServiceRequest", "subject", "Patient")]
    assert [(i.source, i.param) for i in query.revincludes] == [("Task", "focus")]
    assert query.elements == ("status", "subject") and query.summary_count and query.ignored == ()


def test_index_values_of_names_addresses_and_periods() -> None:
    rows = index_values(
        {
            "resourceType": "Patient",
            "name": [{"family": "Ñúñez", "given": ["Ana", "María"]}],
            "address": [{"line": ["1 High St"], "postalCode": "LS1 4AP"}],
            "telecom": [{"system": "phone", "value": "0113 000 0000"}],
            "active": True,
        }
    )
    names = {(param, exact) for param, _, exact in rows.strings if param == "name"}
    assert names == {("name", "Ñúñez"), ("name", "Ana"), ("name", "María")}
    assert ("address-postalcode", normalise("LS1 4AP"), "LS1 4AP") in rows.strings
    assert ("active", None, "true") in rows.tokens and ("phone", "phone", "0113 000 0000") in rows.tokens
    care = index_values({"resourceType": "EpisodeOfCare", "status": "active", "period": {"start": "2026-01-01"}})
    assert care.dates == [("date", "2026-01-01T00:00:00.000000", "9999-12-31T23:59:59.999999")]


def test_normalise_folds_case_and_accents() -> None:
    assert normalise("LS1 4AP") == "ls1 4ap" and normalise("Ñúñez") == "nunez" and normalise("Straße") == "strasse"
    # ASCII text takes a shortcut: the same as the full folding, character by character.
    for code in range(128):
        assert normalise(chr(code)) == "".join(
            c for c in unicodedata.normalize("NFKD", chr(code).casefold()) if not unicodedata.combining(c)
        )


def test_date_ranges_are_fixed_width_text() -> None:
    assert date_range("1000-01-01") == ("1000-01-01T00:00:00.000000", "1000-01-02T00:00:00.000000")
    assert date_range("9999") == ("9999-01-01T00:00:00.000000", "9999-12-31T23:59:59.999999")
    assert date_range("2026-01-02T03:04:05.000001Z") == ("2026-01-02T03:04:05.000001", "2026-01-02T03:04:05.000002")
    assert date_range("2026-01-02T03:04Z") == ("2026-01-02T03:04:00.000000", "2026-01-02T03:05:00.000000")
