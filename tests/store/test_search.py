"""Search, conditional operations and transactions with references: part of the ResourceStore
contract, run on every store (SQLite in memory, SQLite file, PostgreSQL).

The fixture's clock moves one second per write call from 2026-11-23T12:00:00.123Z, so
``_lastUpdated`` values are known.
"""

from __future__ import annotations

import asyncio
import hashlib
from decimal import Decimal
from typing import Any

import pytest

from adapter.errors import AdapterError
from adapter.search.query import parse_search
from adapter.store import Gone, Operation, OperationResult, ResourceStore, VersionConflict
from adapter.store._search_sql import KEY_CHARS

pytestmark = pytest.mark.anyio

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def person(nhs: str, family: str, given: str, birth: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"family": family, "given": [given]}],
        "birthDate": birth,
        **extra,
    }


def referral(patient_id: str, authored: str, status: str = "active", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": status,
        "intent": "order",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "871731000000106"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored,
        **extra,
    }


def score(patient_id: str, value: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "718426000"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": Decimal(value), "system": "http://unitsofmeasure.org", "code": "{score}"},
    }


async def ids(store: ResourceStore, type: str, *pairs: tuple[str, str]) -> list[str]:
    result = await store.search(parse_search(type, list(pairs)))
    assert result.total == len(result.resources) or result.search_id is not None
    return [resource["id"] for resource in result.resources]


@pytest.fixture
async def people(store: ResourceStore) -> dict[str, dict[str, Any]]:
    """Three patients (ids by name) with referrals and scores."""
    made = {
        "zoe": await store.create(person("9990000018", "O'Brien", "Zoë", "1950-03-04", gender="female")),
        "sam": await store.create(person("9990000026", "Smith", "Sam", "1980-11-23", gender="male")),
        "li": await store.create(person("9990000034", "Li", "Wei", "2001", gender="unknown")),
    }
    await store.create(referral(made["zoe"]["id"], "2026-01-10"))
    await store.create(referral(made["zoe"]["id"], "2026-03-10T09:30:00Z"))
    await store.create(referral(made["sam"]["id"], "2026-05-01", status="completed"))
    await store.create(score(made["zoe"]["id"], "38", "2026-01-12"))
    await store.create(score(made["zoe"]["id"], "51.0", "2026-06-30"))
    return made


async def test_tokens_match_code_system_and_code_or_system_alone(store: ResourceStore, people: dict[str, Any]) -> None:
    zoe = people["zoe"]["id"]
    assert await ids(store, "Patient", ("identifier", f"{NHS}|9990000018")) == [zoe]
    assert await ids(store, "Patient", ("identifier", "9990000018")) == [zoe]
    assert await ids(store, "Patient", ("identifier", "|9990000018")) == []  # it has a system
    assert len(await ids(store, "Patient", ("identifier", f"{NHS}|"))) == 3
    assert await ids(store, "Patient", ("identifier", "http://other|9990000018")) == []
    assert len(await ids(store, "ServiceRequest", ("status", "active"))) == 2
    # Comma: either value.
    assert len(await ids(store, "ServiceRequest", ("status", "active,completed"))) == 3
    # Two parameters: both.
    assert await ids(store, "Patient", ("gender", "female"), ("identifier", "9990000026")) == []


async def test_strings_match_the_start_ignoring_case_and_accents_or_exactly_or_anywhere(
    store: ResourceStore, people: dict[str, Any]
) -> None:
    zoe = people["zoe"]["id"]
    assert await ids(store, "Patient", ("name", "zoe")) == [zoe]
    assert await ids(store, "Patient", ("given", "ZO")) == [zoe]
    assert await ids(store, "Patient", ("family", "o'b")) == [zoe]
    assert await ids(store, "Patient", ("family", "brien")) == []
    assert await ids(store, "Patient", ("family:contains", "BRIEN")) == [zoe]
    assert await ids(store, "Patient", ("given:exact", "Zoë")) == [zoe]
    assert await ids(store, "Patient", ("given:exact", "zoë")) == []


async def test_search_values_are_data_never_sql_or_like_patterns(store: ResourceStore, people: dict[str, Any]) -> None:
    for value in ("%", "_", "' OR '1'='1", "'; DROP TABLE resources; --", "\\", "Sm_th", "S%"):
        assert await ids(store, "Patient", ("family", value)) == [], value
        assert await ids(store, "Patient", ("identifier", value)) == [], value
    await store.create(person("9990000042", "100%_real\\", "X", "1990"))
    assert len(await ids(store, "Patient", ("family", "100%_r"))) == 1
    assert len(await ids(store, "Patient", ("family", "100%_real\\"))) == 1
    assert len(await ids(store, "Patient")) == 4  # nothing was dropped


async def test_references_by_type_and_id_bare_id_and_type_modifier(
    store: ResourceStore, people: dict[str, Any]
) -> None:
    zoe = people["zoe"]["id"]
    by_type = await ids(store, "ServiceRequest", ("patient", f"Patient/{zoe}"))
    assert len(by_type) == 2
    assert await ids(store, "ServiceRequest", ("subject", zoe)) == by_type
    assert await ids(store, "ServiceRequest", ("subject:Patient", zoe)) == by_type
    assert await ids(store, "ServiceRequest", ("subject:Group", zoe)) == []
    assert await ids(store, "ServiceRequest", ("patient", "Patient/nobody")) == []


async def test_chains_find_a_persons_referrals_by_nhs_number_in_one_search(
    store: ResourceStore, people: dict[str, Any]
) -> None:
    expected = await ids(store, "ServiceRequest", ("patient", f"Patient/{people['zoe']['id']}"))
    assert await ids(store, "ServiceRequest", ("patient.identifier", f"{NHS}|9990000018")) == expected
    assert await ids(store, "ServiceRequest", ("subject:Patient.identifier", "9990000018")) == expected
    assert await ids(store, "ServiceRequest", ("subject:Patient.name", "zoe")) == expected
    assert await ids(store, "ServiceRequest", ("patient.identifier", f"{NHS}|9990000034")) == []
    # Two levels: observations of patients whose referrals... go through Patient here.
    observations = await ids(store, "Observation", ("subject:Patient.birthdate", "1950"))
    assert len(observations) == 2


async def test_dates_before_the_year_1000_sort_before_later_ones(store: ResourceStore) -> None:
    """Index rows compare as text: a year below 1000 must keep four digits ("0999", not "999",
    which sorted after "1500")."""
    old = await store.create(person("9990000018", "Ancient", "Ada", "0999-05-01"))
    late = await store.create(person("9990000026", "Later", "Lee", "1500-05-01"))
    assert await ids(store, "Patient", ("birthdate", "gt1000")) == [late["id"]]
    assert await ids(store, "Patient", ("birthdate", "lt1000")) == [old["id"]]
    assert await ids(store, "Patient", ("birthdate", "0999")) == [old["id"]]


async def test_dates_with_prefixes_and_partial_values(store: ResourceStore, people: dict[str, Any]) -> None:
    async def birth(value: str) -> set[str]:
        names = {people[key]["id"]: key for key in people}
        return {names[id] for id in await ids(store, "Patient", ("birthdate", value))}

    assert await birth("1950-03-04") == {"zoe"}
    assert await birth("1950") == {"zoe"}
    assert await birth("1950-03") == {"zoe"}
    assert await birth("2001-06-01") == set()  # "2001" is the whole year: not inside one day
    assert await birth("eq2001") == {"li"}
    assert await birth("ne1950") == {"sam", "li"}
    assert await birth("lt1980-11-23") == {"zoe"}
    assert await birth("le1980-11-23") == {"zoe", "sam"}
    assert await birth("gt1980-11-23") == {"li"}
    assert await birth("ge1980-11-23") == {"sam", "li"}
    assert await birth("sa1980") == {"li"}
    assert await birth("eb1980") == {"zoe"}
    # The year 2001 is a range: it reaches both before and after June, so it is "lt" and "gt"
    # June, but neither "starts after" nor "ends before" it.
    assert await birth("ge2001-06-01") == {"li"}
    assert await birth("gt2001-06-01") == {"li"}
    assert await birth("lt2001-06-01") == {"zoe", "sam", "li"}
    assert await birth("le2001-06-01") == {"zoe", "sam", "li"}
    assert await birth("sa2001-06-01") == set()
    assert await birth("eb2001-06-01") == {"zoe", "sam"}
    assert await birth("sa2000-12-31") == {"li"}
    assert await birth("ap1950-03-04") == {"zoe"}
    # A dateTime with a time zone is compared in UTC.
    authored = await ids(store, "ServiceRequest", ("authored", "2026-03-10T10:30:00+01:00"))
    assert len(authored) == 1
    assert len(await ids(store, "ServiceRequest", ("authored", "ge2026-03"))) == 2


async def test_quantities_and_numbers_with_precision_and_prefixes(store: ResourceStore, people: dict[str, Any]) -> None:
    assert len(await ids(store, "Observation", ("value-quantity", "51"))) == 1
    assert len(await ids(store, "Observation", ("value-quantity", "51.0|http://unitsofmeasure.org|{score}"))) == 1
    assert len(await ids(store, "Observation", ("value-quantity", "51||{score}"))) == 1
    assert len(await ids(store, "Observation", ("value-quantity", "51||mg"))) == 0
    assert len(await ids(store, "Observation", ("value-quantity", "gt38"))) == 1
    assert len(await ids(store, "Observation", ("value-quantity", "ge38"))) == 2
    assert len(await ids(store, "Observation", ("value-quantity", "lt38"))) == 0
    # "38.4" means 38.35 to 38.45: 38 is outside; "4e1" means 35 to 45: 38 is inside.
    assert len(await ids(store, "Observation", ("value-quantity", "38.4"))) == 0
    assert len(await ids(store, "Observation", ("value-quantity", "4e1"))) == 1


async def test_id_last_updated_and_missing(store: ResourceStore, people: dict[str, Any]) -> None:
    zoe, sam = people["zoe"]["id"], people["sam"]["id"]
    assert sorted(await ids(store, "Patient", ("_id", f"{zoe},{sam}"))) == sorted([zoe, sam])
    # The clock gives 12:00:00.123 to the first write, 12:00:01.123 to the second...
    assert await ids(store, "Patient", ("_lastUpdated", "2026-11-23T12:00:00")) == [zoe]
    assert await ids(store, "Patient", ("_lastUpdated", "gt2026-11-23T12:00:00")) == [sam, people["li"]["id"]]
    assert await ids(store, "Patient", ("_lastUpdated", "lt2026-11-23T12:00:01")) == [zoe]
    assert len(await ids(store, "Patient", ("_lastUpdated", "2026-11-23"))) == 3
    await store.create({"resourceType": "Patient", "name": [{"family": "Nobirth"}]})
    assert len(await ids(store, "Patient", ("birthdate:missing", "true"))) == 1
    assert len(await ids(store, "Patient", ("birthdate:missing", "false"))) == 3


async def test_sort_ascending_descending_and_on_several_keys(store: ResourceStore, people: dict[str, Any]) -> None:
    by_birth = await ids(store, "Patient", ("_sort", "birthdate"))
    assert by_birth == [people["zoe"]["id"], people["sam"]["id"], people["li"]["id"]]
    assert await ids(store, "Patient", ("_sort", "-birthdate")) == by_birth[::-1]
    await store.create({"resourceType": "Patient", "gender": "female"})  # no birth date: last either way
    assert (await ids(store, "Patient", ("_sort", "-birthdate")))[:3] == by_birth[::-1]
    assert (await ids(store, "Patient", ("_sort", "birthdate")))[:3] == by_birth
    mixed = await ids(store, "Patient", ("_sort", "gender,-birthdate"))
    assert len(mixed) == 4
    # The two women (Zoë 1950, and the one without a birth date, who comes last) tie on gender.
    women = [id for id in mixed if (await store.read("Patient", id))["gender"] == "female"]
    assert women[0] == people["zoe"]["id"] and women[1] not in by_birth
    genders = [(await store.read("Patient", id))["gender"] for id in mixed]
    assert genders == sorted(genders)


async def test_the_index_follows_updates_and_deletes(store: ResourceStore, people: dict[str, Any]) -> None:
    zoe = people["zoe"]
    await store.update({**zoe, "name": [{"family": "Ward", "given": ["Zoë"]}]})
    assert await ids(store, "Patient", ("family", "o'brien")) == []
    assert await ids(store, "Patient", ("family", "ward")) == [zoe["id"]]
    await store.delete("Patient", zoe["id"])
    assert await ids(store, "Patient", ("family", "ward")) == []
    assert await ids(store, "Patient", ("_id", zoe["id"])) == []
    assert await ids(store, "ServiceRequest", ("patient.identifier", "9990000018")) == []


async def test_summary_count_include_and_revinclude(store: ResourceStore, people: dict[str, Any]) -> None:
    zoe = people["zoe"]["id"]
    counted = await store.search(parse_search("ServiceRequest", [("_summary", "count")]))
    assert (counted.total, counted.resources) == (3, [])
    included = await store.search(
        parse_search("ServiceRequest", [("patient", zoe), ("_include", "ServiceRequest:patient")])
    )
    assert len(included.resources) == 2
    assert [(r["resourceType"], r["id"]) for r in included.included] == [("Patient", zoe)]  # once, not twice
    reverse = await store.search(
        parse_search(
            "Patient", [("_id", zoe), ("_revinclude", "ServiceRequest:subject"), ("_revinclude", "Observation:subject")]
        )
    )
    assert sorted(r["resourceType"] for r in reverse.included) == ["Observation"] * 2 + ["ServiceRequest"] * 2


async def test_pages_are_a_snapshot_that_data_changes_do_not_shift(store: ResourceStore) -> None:
    made = [
        await store.create({"resourceType": "Patient", "gender": "other", "birthDate": f"19{n:02d}"}) for n in range(7)
    ]
    first = await store.search(parse_search("Patient", [("_count", "3"), ("_sort", "birthdate")]))
    assert first.total == 7 and first.search_id is not None
    assert [r["id"] for r in first.resources] == [r["id"] for r in made[:3]]
    # Meanwhile: a new patient that sorts first, and one of the next page deleted.
    await store.create({"resourceType": "Patient", "gender": "other", "birthDate": "1850"})
    await store.delete("Patient", made[4]["id"])
    second = await store.search_page(first.search_id, 3, 3)
    assert [r["id"] for r in second.resources] == [made[3]["id"], made[5]["id"]]
    assert second.total == 7
    last = await store.search_page(first.search_id, 6, 3)
    assert [r["id"] for r in last.resources] == [made[6]["id"]]
    with pytest.raises(Gone):
        await store.search_page("no-such-search", 0, 3)


async def test_conditional_create_finds_none_one_or_several(store: ResourceStore, people: dict[str, Any]) -> None:
    condition = parse_search("Patient", [("identifier", f"{NHS}|9990000018")])
    [found] = await store.transaction(
        [Operation.create(person("9990000018", "X", "Y", "2000"), if_none_exist=condition)]
    )
    assert (found.matched, found.created, found.id) == (True, False, people["zoe"]["id"])
    assert found.resource == people["zoe"]  # unchanged
    new = parse_search("Patient", [("identifier", f"{NHS}|9990000050")])
    [made] = await store.transaction([Operation.create(person("9990000050", "New", "N", "2000"), if_none_exist=new)])
    assert (made.matched, made.created) == (False, True)
    several = parse_search("Patient", [("identifier", f"{NHS}|")])
    with pytest.raises(VersionConflict):
        await store.transaction([Operation.create(person("9990000069", "A", "B", "2000"), if_none_exist=several)])


async def test_conditional_update_updates_the_match_or_creates(store: ResourceStore, people: dict[str, Any]) -> None:
    condition = parse_search("Patient", [("identifier", f"{NHS}|9990000026")])
    changed = person("9990000026", "Smith", "Samuel", "1980-11-23")
    [result] = await store.transaction([Operation.update(changed, condition=condition)])
    assert (result.id, result.version_id, result.created) == (people["sam"]["id"], "2", False)
    fresh = parse_search("Patient", [("identifier", f"{NHS}|9990000077")])
    [created] = await store.transaction([Operation.update(person("9990000077", "Z", "Z", "1999"), condition=fresh)])
    assert created.created and created.version_id == "1"


async def test_concurrent_conditional_creates_make_one_resource(store: ResourceStore) -> None:
    condition = parse_search("Patient", [("identifier", f"{NHS}|9990000085")])
    results = await asyncio.gather(
        *(
            store.transaction([Operation.create(person("9990000085", "Twin", str(n), "2000"), if_none_exist=condition)])
            for n in range(5)
        )
    )
    assert sum(1 for [result] in results if result.created) == 1
    assert len({result.id for [result] in results}) == 1
    assert len(await ids(store, "Patient", ("identifier", "9990000085"))) == 1


async def test_a_transaction_rewrites_full_url_references_to_the_ids_it_assigns(store: ResourceStore) -> None:
    results = await store.transaction(
        [
            Operation.create(
                referral("placeholder", "2026-11-01") | {"subject": {"reference": "urn:uuid:p1"}},
                full_url="urn:uuid:sr",
            ),
            Operation.create(person("9990000093", "Urn", "U", "1970"), full_url="urn:uuid:p1"),
        ]
    )
    patient_id = results[1].id
    stored = await store.read("ServiceRequest", results[0].id)
    assert stored["subject"] == {"reference": f"Patient/{patient_id}"}
    assert await ids(store, "ServiceRequest", ("patient.identifier", "9990000093")) == [results[0].id]


def noise(seed: str, length: int, wide: bool = False) -> str:
    """``length`` characters that do not compress (hex digits of chained SHA-256, or with ``wide``
    CJK ideographs of four bytes each in UTF-8), so that PostgreSQL cannot squeeze them into an
    index row either; search leaves both unchanged when it normalises."""
    digest, text = seed.encode(), ""
    while len(text) < length:
        digest = hashlib.sha256(digest).digest()
        text += "".join(chr(0x20000 + byte * 97) for byte in digest) if wide else digest.hex()
    return text[:length]


#: Longer than what PostgreSQL's indexes hold of a value: values that differ only after it share
#: their index key, and only the whole value tells them apart.
SHARED = noise("shared", KEY_CHARS // 2, wide=True) + noise("shared", KEY_CHARS)
LONG_A = SHARED + noise("a", 5000 - len(SHARED))
LONG_B = SHARED + noise("b", 5000 - len(SHARED))


async def test_a_5000_character_name_is_stored_and_found_whole_or_by_its_start(store: ResourceStore) -> None:
    """Regression (#3): PostgreSQL refused a name longer than its B-tree index allows (a 500)."""
    a = await store.create(person("9990000018", LONG_A, "Ann", "1950"))
    assert await store.read("Patient", a["id"]) == a
    assert await ids(store, "Patient", ("family", LONG_A)) == [a["id"]]
    assert await ids(store, "Patient", ("family", LONG_A[:100])) == [a["id"]]
    assert await ids(store, "Patient", ("family", LONG_A[: KEY_CHARS + 100])) == [a["id"]]
    assert await ids(store, "Patient", ("family:exact", LONG_A)) == [a["id"]]
    assert await ids(store, "Patient", ("family:contains", LONG_A[4000:4100])) == [a["id"]]
    # Another long name with the same first KEY_CHARS (and more) characters is another name.
    assert await ids(store, "Patient", ("family", LONG_B)) == []
    assert await ids(store, "Patient", ("family", SHARED + LONG_B[len(SHARED)])) == []
    assert await ids(store, "Patient", ("family:exact", LONG_B)) == []
    b = await store.create(person("9990000026", LONG_B, "Bea", "1960"))
    assert await ids(store, "Patient", ("family", LONG_B)) == [b["id"]]
    assert await ids(store, "Patient", ("family", LONG_A[:KEY_CHARS])) == [a["id"], b["id"]]
    assert await ids(store, "Patient", ("family", SHARED)) == [a["id"], b["id"]]
    assert await ids(store, "Patient", ("family", SHARED + LONG_A[len(SHARED)])) == [a["id"]]


async def test_a_long_identifier_and_uri_are_stored_and_found_by_token(store: ResourceStore) -> None:
    a = await store.create(person(LONG_A, "Long", "Ann", "1950"))
    assert await ids(store, "Patient", ("identifier", LONG_A)) == [a["id"]]
    assert await ids(store, "Patient", ("identifier", f"{NHS}|{LONG_A}")) == [a["id"]]
    assert await ids(store, "Patient", ("identifier", LONG_B)) == []
    assert await ids(store, "Patient", ("identifier", LONG_A[:KEY_CHARS])) == []  # a token is matched whole
    url = "https://example.org/fhir/ValueSet/" + LONG_A
    value_set = await store.create({"resourceType": "ValueSet", "status": "active", "url": url})
    assert await ids(store, "ValueSet", ("url", url)) == [value_set["id"]]
    assert await ids(store, "ValueSet", ("url", "https://example.org/fhir/ValueSet/" + LONG_B)) == []
    # A reference that is no Type/id is matched by its whole text (not held by any index).
    reference = "https://example.org/fhir/Patient/" + LONG_A
    observation = await store.create(score("x", "40", "2026-01-12") | {"subject": {"reference": reference}})
    assert await ids(store, "Observation", ("subject", reference)) == [observation["id"]]
    assert await ids(store, "Observation", ("subject", "https://example.org/fhir/Patient/" + LONG_B)) == []


async def test_conditional_creates_on_a_long_identifier_tell_values_with_one_start_apart(store: ResourceStore) -> None:
    """$ingest's window of conditional creates reads its conditions in one statement per parameter."""

    def create(value: str, family: str) -> list[Operation]:
        condition = parse_search("Patient", [("identifier", f"{NHS}|{value}")])
        return [Operation.create(person(value, family, "G", "2000"), if_none_exist=condition)]

    def only(group: list[OperationResult] | AdapterError) -> OperationResult:
        assert isinstance(group, list), group
        return group[0]

    [a] = map(only, await store.transactions([create(LONG_A, "First")]))
    [b] = map(only, await store.transactions([create(LONG_B, "Other")]))  # LONG_A is another value
    again_a, again_b = map(only, await store.transactions([create(LONG_A, "Again"), create(LONG_B, "Again")]))
    assert a.created and b.created and a.id != b.id
    assert (again_a.matched, again_a.id) == (True, a.id)
    assert (again_b.matched, again_b.id) == (True, b.id)
    [single] = await store.transaction(create(LONG_B, "Single"))
    assert (single.matched, single.id) == (True, b.id)


async def test_a_prefix_ending_in_the_last_code_points_finds_only_its_names(store: ResourceStore) -> None:
    """A prefix search is a range on PostgreSQL: up to the next code point after the prefix's last
    (U+D7FF is followed by U+E000, past the surrogates), or past U+10FFFF to the one before it."""
    hangul = await store.create(person("9990000018", "x\ud7ffa", "A", "1950"))
    private = await store.create(person("9990000026", "x\ue000a", "B", "1950"))
    last = await store.create(person("9990000034", "x\U0010ffffa", "C", "1950"))
    after = await store.create(person("9990000042", "y", "D", "1950"))
    assert await ids(store, "Patient", ("family", "x\ud7ff")) == [hangul["id"]]
    assert await ids(store, "Patient", ("family", "x\ue000")) == [private["id"]]
    assert await ids(store, "Patient", ("family", "x\U0010ffff")) == [last["id"]]
    assert await ids(store, "Patient", ("family", "x")) == [hangul["id"], private["id"], last["id"]]
    assert len(await ids(store, "Patient", ("family", ""))) == 4
    assert await ids(store, "Patient", ("family", "y")) == [after["id"]]
