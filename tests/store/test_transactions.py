"""``ResourceStore.transactions`` on windows of conditional creates (what ``$ingest`` stores, #5),
on every store: the SQL stores answer such a window from a few statements and write it in one go
(``_Window`` in :mod:`adapter.store.sql`), and must give exactly what the groups one by one give.
"""

from __future__ import annotations

from typing import Any

import pytest

from adapter.errors import AdapterError
from adapter.search.query import parse_search
from adapter.store import Conflict, Operation, OperationResult, ResourceStore, SQLiteStore, VersionConflict
from tests.store.conftest import FakeClock

pytestmark = pytest.mark.anyio

NHS = "https://fhir.nhs.uk/Id/nhs-number"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"


def person(id: str | None, *identifiers: tuple[str | None, str], **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", **extra}
    if identifiers:
        resource["identifier"] = [{"system": system, "value": value} for system, value in identifiers]
        for item in resource["identifier"]:
            if item["system"] is None:
                del item["system"]
    if id is not None:
        resource["id"] = id
    return resource


def create(resource: dict[str, Any], condition: str | None = None) -> Operation:
    """A create as ``$ingest`` makes it: under the resource's id, with a fullUrl, conditional on ``condition``."""
    type, id = resource["resourceType"], resource.get("id")
    query = None if condition is None else parse_search(type, [tuple(condition.split("=", 1))], strict=True)  # type: ignore[list-item]
    return Operation.create(resource, id=id, if_none_exist=query, full_url=None if id is None else f"urn:uuid:{id}")


def referring(id: str, patient: str) -> Operation:
    return create(
        {"resourceType": "Observation", "id": id, "status": "final", "subject": {"reference": f"urn:uuid:{patient}"}}
    )


def summary(outcome: list[OperationResult] | AdapterError) -> Any:
    """What a group's outcome says, without the store's timestamps."""
    if isinstance(outcome, AdapterError):
        return type(outcome).__name__, outcome.operation
    return [(r.type, r.id, r.version_id, r.created, r.matched) for r in outcome]


async def test_a_later_group_of_a_window_sees_what_an_earlier_one_stored(store: ResourceStore) -> None:
    outcomes = await store.transactions(
        [
            [create(person("p-a", (NHS, "9990000018")), f"identifier={NHS}|9990000018"), referring("o-1", "p-a")],
            # The same person under another id: matches p-a, and the Observation refers to p-a.
            [create(person("p-a2", (NHS, "9990000018")), f"identifier={NHS}|9990000018"), referring("o-2", "p-a2")],
            # p-a exists by now: an unconditional create of it fails, with the rest of its group.
            [referring("o-3", "p-a"), create(person("p-a"))],
            # Without an id (a new uuid4), then found by the next group.
            [create(person(None, (NHS, "9990000026")), f"identifier={NHS}|9990000026")],
            [create(person("p-b", (NHS, "9990000026")), f"identifier={NHS}|9990000026")],
        ]
    )

    first, again, failed, fresh, found = outcomes
    assert summary(first) == [("Patient", "p-a", "1", True, False), ("Observation", "o-1", "1", True, False)]
    assert summary(again) == [("Patient", "p-a", "1", False, True), ("Observation", "o-2", "1", True, False)]
    assert not isinstance(again, AdapterError) and again[0].resource == await store.read("Patient", "p-a")
    assert (await store.read("Observation", "o-2"))["subject"] == {"reference": "Patient/p-a"}
    assert isinstance(failed, Conflict) and failed.operation == 1
    assert not isinstance(fresh, AdapterError) and fresh[0].created
    assert summary(found) == [("Patient", fresh[0].id, "1", False, True)]
    assert sorted(e.id for e in await store.history("Observation")) == ["o-1", "o-2"]
    assert len(await store.history("Patient")) == 2


async def test_a_group_whose_condition_matches_two_fails_alone(store: ResourceStore) -> None:
    await store.create(person(None, (NHS, "9990000034")))
    await store.create(person(None, (NHS, "9990000034")))

    outcomes = await store.transactions(
        [
            [create(person("p-d", (NHS, "9990000042")), f"identifier={NHS}|9990000042")],
            [
                create(
                    {"resourceType": "Organization", "id": "org", "identifier": [{"system": ODS, "value": "B81001"}]}
                ),
                create(person("p-c", (NHS, "9990000034")), f"identifier={NHS}|9990000034"),
            ],
            # A group does not see itself: both are created, under their own ids...
            [
                create(person("p-e1", (NHS, "9990000050")), f"identifier={NHS}|9990000050"),
                create(person("p-e2", (NHS, "9990000050")), f"identifier={NHS}|9990000050"),
            ],
            # ...so that a later group's condition matches two.
            [create(person("p-e3", (NHS, "9990000050")), f"identifier={NHS}|9990000050")],
            [create(person("p-d2", (NHS, "9990000042")), f"identifier={NHS}|9990000042")],
        ]
    )

    stored, refused, both, ambiguous, matched = outcomes
    assert summary(stored) == [("Patient", "p-d", "1", True, False)]
    assert isinstance(refused, VersionConflict) and refused.status == 412 and refused.operation == 1
    assert await store.history("Organization") == []
    assert [r.id for r in both] == ["p-e1", "p-e2"]  # type: ignore[union-attr]
    assert isinstance(ambiguous, VersionConflict) and ambiguous.operation == 0
    assert summary(matched) == [("Patient", "p-d", "1", False, True)]
    assert len(await store.history("Patient")) == 5


# Conditions of every shape a window answers (system|code, |code, bare code, ORed codes, codes that
# differ only in case), and one it leaves to the general path (system|).
CONDITIONS = [
    f"identifier={NHS}|A",
    "identifier=|A",
    "identifier=A",
    f"identifier={NHS}|B,{NHS}|C",
    f"identifier={NHS}|a",
    "identifier=other|A",
]


def groups_of_every_shape(with_system_only: bool) -> list[list[Operation]]:
    identities: list[tuple[str | None, str]] = [(NHS, "A"), (None, "A"), ("other", "A"), (NHS, "B"), (NHS, "C")]
    groups: list[list[Operation]] = []
    number = 0
    for round in range(2):
        for identity in identities:
            for condition in CONDITIONS:
                number += 1
                groups.append([create(person(f"p{number}", identity, gender="unknown"), condition)])
            if round == 0:
                groups.append([create(person(f"u{number}", identity))])
    if with_system_only:
        groups.append([create(person("s1", (NHS, "Z")), f"identifier={NHS}|")])
    return groups


@pytest.mark.parametrize("with_system_only", [False, True], ids=["window", "general"])
async def test_a_window_answers_as_its_groups_one_by_one(store: ResourceStore, with_system_only: bool) -> None:
    groups = groups_of_every_shape(with_system_only)
    reference = SQLiteStore(":memory:", clock=FakeClock())
    try:
        expected: list[Any] = []
        for group in groups:
            try:
                expected.append(summary(await reference.transaction(group)))
            except AdapterError as exc:
                expected.append(summary(exc))
        outcomes = [summary(outcome) for outcome in await store.transactions(groups)]
        assert outcomes == expected
        for type in ("Patient",):
            mine = await store.search(parse_search(type, [("_count", "1000")]))
            theirs = await reference.search(parse_search(type, [("_count", "1000")]))
            assert sorted(r["id"] for r in mine.resources) == sorted(r["id"] for r in theirs.resources)
        assert sum(isinstance(outcome, tuple) for outcome in outcomes) > 5  # conflicts as well as matches
    finally:
        await reference.close()


async def test_a_system_that_is_not_text_is_left_to_the_database(store: ResourceStore) -> None:
    """A window that meets what it cannot compare as the database would (a number as a system)
    is decided group by group instead, with the same outcome."""
    outcomes = await store.transactions(
        [
            [create(person("n1", ("5", "X")))],
            [create({"resourceType": "Patient", "id": "n2", "identifier": [{"system": 5, "value": "X"}]})],
            [create(person("n3", ("5", "X")), "identifier=5|X")],
        ]
    )
    assert summary(outcomes[0]) == [("Patient", "n1", "1", True, False)]
    assert summary(outcomes[1]) == [("Patient", "n2", "1", True, False)]
    # Both are stored with the system "5": the condition matches two.
    assert isinstance(outcomes[2], VersionConflict)


def test_rewriting_references_copies_only_the_way_to_what_changes() -> None:
    """A transaction's fullUrl references become Type/id wherever they are (nested in arrays and
    extensions); the input is left as it was, and what does not change is shared, not copied."""
    from adapter.store._common import rewrite_references

    mapping = {"urn:uuid:a": "Patient/1", "urn:uuid:b": "Practitioner/2"}
    untouched = {"coding": [{"system": "s", "code": "urn:uuid:a"}]}  # a code, not a reference
    resource = {
        "resourceType": "Observation",
        "code": untouched,
        "subject": {"reference": "urn:uuid:a"},
        "performer": [{"reference": "Organization/3"}, {"reference": "urn:uuid:b", "display": "Dr B"}],
        "extension": [{"url": "u", "valueReference": {"reference": "urn:uuid:b"}}],
        "note": [[{"reference": "urn:uuid:a"}]],  # not FHIR, but any JSON is walked
        "status": "final",
    }
    before = repr(resource)
    out = rewrite_references(resource, mapping)
    assert repr(resource) == before
    assert out["subject"] == {"reference": "Patient/1"}
    assert out["performer"] == [{"reference": "Organization/3"}, {"reference": "Practitioner/2", "display": "Dr B"}]
    assert out["performer"][0] is resource["performer"][0]
    assert out["extension"][0]["valueReference"] == {"reference": "Practitioner/2"}
    assert out["note"] == [[{"reference": "Patient/1"}]]
    assert out["code"] is untouched and out["status"] == "final"
    unchanged = {"resourceType": "Patient", "link": [{"other": {"reference": "Patient/9"}}]}
    assert rewrite_references(unchanged, mapping) is unchanged
