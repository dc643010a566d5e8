"""The ResourceStore contract: one suite, run against every implementation by the ``store`` fixture.

The fixture's clock moves one second per write call, starting at 2026-11-23T12:00:00.123456Z.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from adapter.errors import InputError
from adapter.fhir.json_format import dumps
from adapter.search.query import parse_search
from adapter.store import Conflict, Gone, NotFound, Operation, ResourceStore, VersionConflict

pytestmark = pytest.mark.anyio


def patient(name: str = "Ada", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": name}], **extra}


def observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "meta": {"profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Observation"]},
        "status": "final",
        "code": {"text": "Wellbeing score — WEMWBS"},
        "valueQuantity": {"value": Decimal("0.40"), "unit": "ratio"},
        "component": [{"code": {"text": "a"}, "valueQuantity": {"value": Decimal("150.000")}}],
        "_status": {"extension": [{"url": "http://example.org/x", "valueBoolean": True}]},
    }


def versions(entries: Any) -> list[tuple[str, str, str, bool]]:
    return [(e.type, e.id, e.version_id, e.deleted) for e in entries]


async def test_create_assigns_id_version_and_last_updated(store: ResourceStore) -> None:
    given = patient(id="chosen-by-client", meta={"versionId": "9", "tag": [{"code": "t"}]})
    before = copy.deepcopy(given)

    first = await store.create(given)
    second = await store.create(patient())

    assert uuid.UUID(first["id"]).version == 4
    assert first["id"] != "chosen-by-client"  # create ignores a client id (http.html#create)
    assert first["id"] != second["id"]
    assert first["meta"] == {"versionId": "1", "lastUpdated": "2026-11-23T12:00:00.123Z", "tag": [{"code": "t"}]}
    assert second["meta"]["lastUpdated"] == "2026-11-23T12:00:01.123Z"
    assert first["name"] == [{"family": "Ada"}]
    assert given == before  # the caller's dict is not changed


async def test_read_returns_exactly_what_was_stored(store: ResourceStore) -> None:
    created = await store.create(observation())

    read = await store.read("Observation", created["id"])

    assert read == created
    assert read == {**observation(), "id": created["id"], "meta": {**observation()["meta"], **created["meta"]}}
    value = read["valueQuantity"]["value"]
    assert isinstance(value, Decimal) and str(value) == "0.40"
    assert b'"value":0.40' in dumps(read)
    assert b'"value":150.000' in dumps(read)
    assert dumps(read) == dumps(created)


async def test_returned_resources_do_not_alias_stored_state(store: ResourceStore) -> None:
    created = await store.create(patient())
    created["name"][0]["family"] = "Changed"
    read = await store.read("Patient", created["id"])
    read["name"].append({"family": "Other"})

    assert (await store.read("Patient", created["id"]))["name"] == [{"family": "Ada"}]


async def test_update_bumps_version_and_keeps_history(store: ResourceStore) -> None:
    created = await store.create(patient("Ada"))

    updated, was_created = await store.update({**created, "name": [{"family": "Byron"}]})

    assert was_created is False
    assert updated["id"] == created["id"]
    assert updated["meta"]["versionId"] == "2"
    assert updated["meta"]["lastUpdated"] > created["meta"]["lastUpdated"]
    assert (await store.read("Patient", created["id"]))["name"] == [{"family": "Byron"}]
    old = await store.vread("Patient", created["id"], "1")
    assert old == created
    assert await store.vread("Patient", created["id"], "2") == updated


async def test_vread_of_a_version_that_does_not_exist_is_not_found(store: ResourceStore) -> None:
    created = await store.create(patient())
    for version in ("2", "0", "abc"):
        with pytest.raises(NotFound):
            await store.vread("Patient", created["id"], version)
    with pytest.raises(NotFound):
        await store.vread("Patient", "no-such-id", "1")


async def test_if_match_must_name_the_current_version(store: ResourceStore) -> None:
    created = await store.create(patient())

    second, _ = await store.update(created, if_match="1")
    third, _ = await store.update(second, if_match='W/"2"')  # the ETag form as sent in If-Match
    with pytest.raises(VersionConflict) as error:
        await store.update({**created, "name": [{"family": "Lost"}]}, if_match="2")

    assert third["meta"]["versionId"] == "3"
    assert error.value.status == 412 and error.value.issue_code == "conflict"
    current = await store.read("Patient", created["id"])
    assert current == third
    assert len(await store.history("Patient", created["id"])) == 3


async def test_update_with_a_client_id_creates(store: ResourceStore) -> None:
    first, created = await store.update(patient(id="client-1"))
    second, created_again = await store.update(patient("Byron", id="client-1"))

    assert created is True and created_again is False
    assert (first["id"], first["meta"]["versionId"]) == ("client-1", "1")
    assert second["meta"]["versionId"] == "2"
    assert await store.read("Patient", "client-1") == second


async def test_if_match_on_a_resource_that_does_not_exist_fails_and_creates_nothing(store: ResourceStore) -> None:
    with pytest.raises(VersionConflict):
        await store.update(patient(id="client-2"), if_match="1")
    with pytest.raises(NotFound):
        await store.read("Patient", "client-2")


async def test_update_needs_a_valid_id_and_a_resource_type(store: ResourceStore) -> None:
    for bad in (patient(), patient(id="has space"), patient(id="x" * 65), {"id": "p1", "name": []}):
        with pytest.raises(InputError):
            await store.update(bad)
    with pytest.raises(InputError):
        await store.create({"name": []})
    assert await store.history() == []


async def test_delete_then_read_is_gone_and_history_shows_the_delete(store: ResourceStore) -> None:
    created = await store.create(patient())
    pid = created["id"]

    await store.delete("Patient", pid)

    with pytest.raises(Gone) as error:
        await store.read("Patient", pid)
    assert error.value.status == 410 and error.value.issue_code == "deleted"
    with pytest.raises(Gone):
        await store.vread("Patient", pid, "2")
    assert await store.vread("Patient", pid, "1") == created
    entries = await store.history("Patient", pid)
    assert versions(entries) == [("Patient", pid, "2", True), ("Patient", pid, "1", False)]
    assert entries[0].resource is None and entries[0].last_updated == "2026-11-23T12:00:01.123Z"
    assert entries[1].resource == created

    await store.delete("Patient", pid)  # deleting a deleted resource changes nothing
    assert len(await store.history("Patient", pid)) == 2

    revived, was_created = await store.update(patient("Back", id=pid))
    assert was_created is True
    assert revived["meta"]["versionId"] == "3"
    assert await store.read("Patient", pid) == revived


async def test_delete_respects_if_match(store: ResourceStore) -> None:
    created = await store.create(patient())
    with pytest.raises(VersionConflict):
        await store.delete("Patient", created["id"], if_match="2")
    assert await store.read("Patient", created["id"]) == created
    await store.delete("Patient", created["id"], if_match='W/"1"')
    with pytest.raises(Gone):
        await store.read("Patient", created["id"])


async def test_unknown_resources_are_not_found(store: ResourceStore) -> None:
    await store.update(patient(id="known"))
    with pytest.raises(NotFound) as error:
        await store.read("Patient", "unknown")
    assert error.value.status == 404 and error.value.issue_code == "not-found"
    with pytest.raises(NotFound):
        await store.read("Observation", "known")  # ids are per type
    with pytest.raises(NotFound):
        await store.delete("Patient", "unknown")
    assert await store.history("Patient", "unknown") == []


async def test_history_levels_order_since_and_count(store: ResourceStore) -> None:
    a = await store.create(patient())  # 12:00:00
    b = await store.create(observation())  # 12:00:01
    a2, _ = await store.update(a)  # 12:00:02
    await store.delete("Observation", b["id"])  # 12:00:03
    a_id, b_id = a["id"], b["id"]

    system = await store.history()
    assert versions(system) == [
        ("Observation", b_id, "2", True),
        ("Patient", a_id, "2", False),
        ("Observation", b_id, "1", False),
        ("Patient", a_id, "1", False),
    ]
    assert [e.last_updated[11:19] for e in system] == ["12:00:03", "12:00:02", "12:00:01", "12:00:00"]
    assert system[1].resource == a2
    assert versions(await store.history("Patient")) == [("Patient", a_id, "2", False), ("Patient", a_id, "1", False)]
    assert versions(await store.history("Observation", b_id)) == [
        ("Observation", b_id, "2", True),
        ("Observation", b_id, "1", False),
    ]

    since = datetime.fromisoformat(a2["meta"]["lastUpdated"])  # at or after: a2 is included
    assert versions(await store.history(since=since)) == versions(system[:2])
    assert versions(await store.history("Patient", since=since)) == versions(system[1:2])
    assert versions(await store.history(count=3)) == versions(system[:3])
    assert versions(await store.history(since=since, count=1)) == versions(system[:1])
    assert await store.history(count=0) == []


async def test_transaction_applies_all_operations(store: ResourceStore) -> None:
    existing = await store.create(patient())
    doomed = await store.create(patient("Doomed"))

    results = await store.transaction(
        [
            Operation.create(observation()),
            Operation.update({**existing, "active": True}, if_match="1"),
            Operation.update(patient(id="new-by-client")),
            Operation.delete("Patient", doomed["id"]),
        ]
    )

    assert [(r.type, r.version_id, r.created) for r in results] == [
        ("Observation", "1", True),
        ("Patient", "2", False),
        ("Patient", "1", True),
        ("Patient", "2", False),
    ]
    assert results[3].resource is None
    assert results[2].id == "new-by-client"
    stamps = {r.resource["meta"]["lastUpdated"] for r in results[:3] if r.resource}
    assert len(stamps) == 1  # one transaction, one instant
    assert await store.read("Observation", results[0].id) == results[0].resource
    assert (await store.read("Patient", existing["id"]))["active"] is True
    with pytest.raises(Gone):
        await store.read("Patient", doomed["id"])


async def test_transaction_is_all_or_nothing(store: ResourceStore) -> None:
    existing = await store.create(patient())
    other = await store.create(patient("Other"))
    before = await store.history()

    with pytest.raises(VersionConflict):
        await store.transaction(
            [
                Operation.create(observation()),
                Operation.update({**existing, "active": False}),
                Operation.update(other, if_match="5"),
                Operation.create(observation()),
            ]
        )

    assert await store.history() == before
    assert await store.history("Observation") == []
    assert await store.read("Patient", existing["id"]) == existing


async def test_transaction_with_one_resource_twice_fails_whole(store: ResourceStore) -> None:
    with pytest.raises(Conflict) as error:
        await store.transaction([Operation.update(patient(id="twice")), Operation.delete("Patient", "twice")])
    assert error.value.status == 409
    with pytest.raises(NotFound):
        await store.read("Patient", "twice")


async def test_transactions_each_group_all_or_nothing_committed_together(store: ResourceStore) -> None:
    existing = await store.create(patient())
    same = parse_search("Patient", [("identifier", "https://fhir.nhs.uk/Id/nhs-number|9990000018")])
    nhs = [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}]

    outcomes = await store.transactions(
        [
            [Operation.create(patient("First", identifier=nhs), if_none_exist=same), Operation.create(observation())],
            # Fails on its second operation: its first is rolled back with it, and only it.
            [Operation.create(observation()), Operation.update(existing, if_match="7")],
            # Sees the first group's Patient: the condition matches and nothing is created.
            [Operation.create(patient("Again", identifier=nhs), if_none_exist=same)],
            [Operation.update({**existing, "active": True}, if_match="1")],
        ]
    )

    first, failed, again, updated = outcomes
    assert not isinstance(first, Exception) and [r.created for r in first] == [True, True]
    assert isinstance(failed, VersionConflict) and failed.operation == 1
    assert not isinstance(again, Exception) and again[0].matched and again[0].id == first[0].id
    assert not isinstance(updated, Exception) and updated[0].version_id == "2"
    assert [r.id for r in await store.history("Observation")] == [first[1].id]
    assert len(await store.history("Patient")) == 3  # existing v1 and v2, and the first group's
    # One commit: every change made by the call carries one instant.
    assert first[0].resource is not None and updated[0].resource is not None
    assert first[0].resource["meta"]["lastUpdated"] == updated[0].resource["meta"]["lastUpdated"]


async def test_concurrent_updates_with_the_same_if_match_one_wins(store: ResourceStore) -> None:
    created = await store.create(patient())

    outcomes = await asyncio.gather(
        *(store.update({**created, "name": [{"family": f"Writer {n}"}]}, if_match="1") for n in range(8)),
        return_exceptions=True,
    )

    winners = [o for o in outcomes if isinstance(o, tuple)]
    assert len(winners) == 1
    assert all(isinstance(o, VersionConflict) for o in outcomes if not isinstance(o, tuple))
    assert await store.read("Patient", created["id"]) == winners[0][0]
    assert [e.version_id for e in await store.history("Patient", created["id"])] == ["2", "1"]


async def test_concurrent_single_writes_are_committed_together_and_each_gets_its_own_outcome(
    store: ResourceStore,
) -> None:
    """Creates, updates and deletes that arrive together share one database transaction (group
    commit), yet each succeeds or fails on its own: the update that loses the If-Match race gets
    VersionConflict and changes nothing, and everything else is stored once."""
    patient = await store.create({"resourceType": "Patient"})
    doomed = await store.create({"resourceType": "Patient"})
    written: list[int] = []
    write_groups = store._write_groups  # type: ignore[attr-defined]

    def counting(groups: list[list[Operation]]) -> Any:
        written.append(len(groups))
        return write_groups(groups)

    store._write_groups = counting  # type: ignore[attr-defined]
    outcomes = await asyncio.gather(
        *(
            store.create({"resourceType": "Observation", "status": "final", "code": {"text": str(n)}})
            for n in range(20)
        ),
        store.update({**patient, "gender": "female"}, if_match="1"),
        store.update({**patient, "gender": "male"}, if_match="1"),
        store.delete("Patient", doomed["id"]),
        return_exceptions=True,
    )
    assert any(size > 1 for size in written), written  # some were committed together
    created = outcomes[:20]
    assert all(isinstance(item, dict) for item in created), created
    assert len({item["id"] for item in created}) == 20  # type: ignore[index]
    for n, item in enumerate(created):
        assert (await store.read("Observation", item["id"]))["code"] == {"text": str(n)}  # type: ignore[index]
    first, second, deleted = outcomes[20:]
    assert isinstance(first, tuple) and first[0]["gender"] == "female"
    assert isinstance(second, VersionConflict)
    assert deleted is None
    assert [entry.version_id for entry in await store.history("Patient", patient["id"])] == ["2", "1"]
    assert (await store.read("Patient", patient["id"]))["gender"] == "female"
    with pytest.raises(Gone):
        await store.read("Patient", doomed["id"])


async def test_a_large_transaction_is_searchable_and_in_history_order(store: ResourceStore) -> None:
    """Enough rows that PostgreSQL writes the history and the index by COPY: every resource is
    found by each of its indexed values, and the history keeps the transaction's order."""
    operations = [
        Operation.create(
            {
                "resourceType": "Patient",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": f"999{n:07d}"}],
                "name": [{"family": f"Family{n}", "given": ["Given"]}],
                "birthDate": f"19{n % 100:02d}-01-01",
            }
        )
        for n in range(120)
    ]
    results = await store.transaction(operations)
    ids = [result.id for result in results]
    for n in (0, 57, 119):
        pairs = [("identifier", f"https://fhir.nhs.uk/Id/nhs-number|999{n:07d}")]
        found = await store.search(parse_search("Patient", pairs))
        assert [resource["id"] for resource in found.resources] == [ids[n]]
        found = await store.search(
            parse_search("Patient", [("family", f"Family{n}"), ("birthdate", f"19{n % 100:02d}")])
        )
        assert [resource["id"] for resource in found.resources] == [ids[n]]
    assert [entry.id for entry in await store.history("Patient")] == ids[::-1]
