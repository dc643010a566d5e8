"""What only the PostgreSQL store promises: data that survives reconnecting, exact JSON text next to
``jsonb``, locking between separate stores, and a killed writer leaving nothing behind.

Runs on the session's throwaway cluster (``postgres_dsn`` in conftest); skipped when there is none.
"""

from __future__ import annotations

import asyncio
import signal
import time
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("psycopg", reason="psycopg is not installed")

import psycopg

from adapter.errors import InputError
from adapter.search.query import parse_search
from adapter.store import Conflict, Gone, NotFound, Operation, VersionConflict
from adapter.store._search_sql import KEY_CHARS
from adapter.store.postgres import INDEX_DEFINITIONS, PostgresStore
from adapter.store.sql import Steps
from tests.store import killed_writer

pytestmark = pytest.mark.anyio


async def test_everything_survives_reconnecting(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn) as store:
        kept = await store.create({"resourceType": "Observation", "valueQuantity": {"value": Decimal("0.40")}})
        updated, _ = await store.update({**kept, "status": "final"})
        gone = await store.create({"resourceType": "Patient"})
        await store.delete("Patient", gone["id"])
        history = await store.history()

    async with PostgresStore(postgres_dsn) as reopened:
        assert await reopened.read("Observation", kept["id"]) == updated
        assert str((await reopened.vread("Observation", kept["id"], "1"))["valueQuantity"]["value"]) == "0.40"
        with pytest.raises(Gone):
            await reopened.read("Patient", gone["id"])
        assert await reopened.history() == history
        again, _ = await reopened.update(updated, if_match="2")
        assert again["meta"]["versionId"] == "3"

    with psycopg.connect(postgres_dsn) as raw:
        assert raw.execute("SELECT count(*) FROM history").fetchone() == (5,)
        # The exact text is kept for reads; the jsonb copy is there to query (numerically).
        text, value, deleted_content = raw.execute(
            "SELECT h.json, (h.content->'valueQuantity'->>'value')::numeric, d.content"
            " FROM history h, history d"
            " WHERE h.id = %s AND h.version = 1 AND d.id = %s AND d.deleted",
            (kept["id"], gone["id"]),
        ).fetchone() or (None, None, None)
        assert '"value":0.40' in text
        assert value == Decimal("0.40") and deleted_content is None
        assert raw.execute(
            "SELECT count(*) FROM resources WHERE content @> %s::jsonb", ('{"status": "final"}',)
        ).fetchone() == (1,)


async def test_two_stores_cannot_both_win_the_same_if_match(postgres_dsn: str) -> None:
    """Each store has its own connection, so only the per-resource lock keeps them apart."""
    stores = [PostgresStore(postgres_dsn) for _ in range(4)]
    try:
        for round in range(20):
            resource, _ = await stores[0].update({"resourceType": "Patient", "id": f"p{round}"})
            outcomes = await asyncio.gather(
                *(store.update({**resource, "gender": str(n)}, if_match="1") for n, store in enumerate(stores)),
                return_exceptions=True,
            )
            assert sum(isinstance(o, tuple) for o in outcomes) == 1, outcomes
            assert all(isinstance(o, tuple | VersionConflict) for o in outcomes), outcomes
            assert [e.version_id for e in await stores[1].history("Patient", f"p{round}")] == ["2", "1"]
    finally:
        for store in stores:
            await store.close()


async def test_two_stores_creating_one_client_id_are_serialised(postgres_dsn: str) -> None:
    stores = [PostgresStore(postgres_dsn) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(
            *(
                store.update({"resourceType": "Patient", "id": "same", "gender": str(n)})
                for n, store in enumerate(stores)
            )
        )
        assert sorted(r["meta"]["versionId"] for r, _ in outcomes) == ["1", "2", "3", "4"]
        assert [created for r, created in outcomes if r["meta"]["versionId"] == "1"] == [True]
    finally:
        for store in stores:
            await store.close()


async def test_stores_ingesting_the_same_window_create_each_resource_once(postgres_dsn: str) -> None:
    """Windows of conditional creates (``$ingest``) on separate stores: the criteria locks, all
    taken before the window reads anything, keep two of them from both finding nothing and both
    creating, even without client ids (each store would create its own uuid4)."""
    nhs = "https://fhir.nhs.uk/Id/nhs-number"

    def window(round: int) -> list[list[Operation]]:
        return [
            [
                Operation.create(
                    {"resourceType": "Patient", "identifier": [{"system": nhs, "value": f"{round}-{n}"}]},
                    if_none_exist=parse_search("Patient", [("identifier", f"{nhs}|{round}-{n}")]),
                )
            ]
            for n in range(8)
        ]

    stores = [PostgresStore(postgres_dsn) for _ in range(4)]
    try:
        for round in range(5):
            outcomes = await asyncio.gather(*(store.transactions(window(round)) for store in stores))
            created = [
                r for groups in outcomes for group in groups if isinstance(group, list) for r in group if r.created
            ]
            assert len(created) == 8, outcomes
            ids = {r.id for groups in outcomes for group in groups if isinstance(group, list) for r in group}
            assert len(ids) == 8
        with psycopg.connect(postgres_dsn) as raw:
            assert raw.execute("SELECT count(*) FROM resources WHERE type = 'Patient'").fetchone() == (40,)
    finally:
        for store in stores:
            await store.close()


async def test_a_writer_locked_out_past_the_lock_timeout_gets_conflict(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn, lock_timeout=0.1) as store:
        await store.update({"resourceType": "Patient", "id": "p1"})
        with psycopg.connect(postgres_dsn) as raw:
            raw.execute("SELECT pg_advisory_xact_lock(hashtextextended('Patient/p1', 0))")
            with pytest.raises(Conflict):
                await store.update({"resourceType": "Patient", "id": "p1"})
            raw.rollback()
        updated, created = await store.update({"resourceType": "Patient", "id": "p1"})
        assert (updated["meta"]["versionId"], created) == ("2", False)


async def test_a_cancelled_call_leaves_a_usable_store(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn) as store:
        await store.update({"resourceType": "Patient", "id": "p1"})
        with psycopg.connect(postgres_dsn) as raw:
            raw.execute("SELECT pg_advisory_xact_lock(hashtextextended('Patient/p1', 0))")
            waiting = asyncio.ensure_future(store.update({"resourceType": "Patient", "id": "p1"}))
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            raw.rollback()
        assert (await store.read("Patient", "p1"))["meta"]["versionId"] == "1"
        updated, _ = await store.update({"resourceType": "Patient", "id": "p1"})
        assert updated["meta"]["versionId"] == "2"


async def test_a_closed_store_refuses_work(postgres_dsn: str) -> None:
    store = PostgresStore(postgres_dsn)
    with pytest.raises(NotFound):
        await store.read("Patient", "p1")  # connects
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        await store.read("Patient", "p1")


def writer_backends(dsn: str) -> list[tuple[str, int]]:
    """Other sessions' state and how many rows their open transaction has written so far."""
    with psycopg.connect(dsn) as raw:
        rows = raw.execute(
            "SELECT state, pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
        return [(str(state), int(pid)) for state, pid in rows]


def in_transaction(dsn: str) -> bool:
    """Whether another session has an open transaction."""
    with psycopg.connect(dsn) as raw:
        row = raw.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND backend_type = 'client backend' AND xact_start IS NOT NULL"
        ).fetchone()
        return bool(row and row[0])


@pytest.mark.parametrize("killed", [True, False], ids=["killed", "completed"])
async def test_a_writer_killed_mid_transaction_leaves_all_or_nothing(postgres_dsn: str, killed: bool) -> None:
    async with PostgresStore(postgres_dsn) as store:
        before = await store.create({"resourceType": "Patient"})

    parts = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
    url = f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    process, lines = killed_writer.start(url, pause=killed)
    assert lines == ["INSIDE"]
    if killed:
        # The writer sits inside its transaction with 5,000 resources and 5,000 versions sent (in a
        # pipeline, so the server may still be working on them: active, or idle in transaction).
        assert [state in ("active", "idle in transaction") for state, _ in writer_backends(postgres_dsn)] == [True]
        assert in_transaction(postgres_dsn)
        process.send_signal(signal.SIGKILL)
    lines = killed_writer.finish(process, lines, timeout=120)

    if killed:
        assert process.returncode == -signal.SIGKILL
        assert lines == ["INSIDE"]
        # The server sees the connection drop and rolls the transaction back.
        deadline = time.monotonic() + 30
        while writer_backends(postgres_dsn) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer_backends(postgres_dsn) == []
    else:
        assert process.returncode == 0
        assert lines == ["INSIDE", "DONE"]

    async with PostgresStore(postgres_dsn) as store:
        await killed_writer.check_all_or_nothing(store, before, killed)


async def test_reads_overlap_on_a_pool_of_connections(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn, readers=3) as store:
        patient = await store.create({"resourceType": "Patient", "gender": "female"})

        def slow_read() -> Steps[int]:
            # A read that holds its pooled connection for 0.4 s, as a slow query would.
            rows = yield "SELECT count(*) FROM pg_sleep(0.4), resources WHERE id = ?", [patient["id"]]
            return int(rows[0][0])

        started = time.monotonic()
        found = await asyncio.gather(*(store._on_reader(slow_read) for _ in range(3)))
        elapsed = time.monotonic() - started
        assert found == [1, 1, 1]
        # One connection would take 1.2 s; three overlap.
        assert elapsed < 1.0, elapsed
        searched = await store.search(parse_search("Patient", [("gender", "female")]))
        assert [resource["id"] for resource in searched.resources] == [patient["id"]]


async def test_a_reader_connection_the_server_dropped_is_replaced(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn) as store:
        patient = await store.create({"resourceType": "Patient", "gender": "male"})
        assert (await store.read("Patient", patient["id"]))["gender"] == "male"
        with psycopg.connect(postgres_dsn, autocommit=True) as raw:
            # Every other session of this database goes, the pooled readers among them (as after
            # a server restart or an idle timeout); the worker's own connection is dropped too.
            raw.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        time.sleep(0.2)
        assert (await store.read("Patient", patient["id"]))["gender"] == "male"
        found = await store.search(parse_search("Patient", [("gender", "male")]))
        assert [resource["id"] for resource in found.resources] == [patient["id"]]
        # And writes still work: the worker replaces its connection on the next call.
        assert (await store.create({"resourceType": "Patient"}))["meta"]["versionId"] == "1"


async def test_a_bulk_write_leaves_the_planner_statistics_up_to_date(postgres_dsn: str) -> None:
    """Tables filled since their last ANALYZE are analyzed soon after the write, on the store's
    statistics thread, not up to a minute later by autovacuum: without statistics the planner took
    them as nearly empty and scanned them."""
    patients = [Operation.create({"resourceType": "Patient", "identifier": [{"value": f"p{n}"}]}) for n in range(600)]

    def analyzed() -> dict[str, float]:
        # Manual ANALYZE only (autovacuum's would set last_autoanalyze).
        with psycopg.connect(postgres_dsn) as raw:
            return dict(
                raw.execute(
                    "SELECT s.relname, c.reltuples FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
                    " WHERE s.last_analyze IS NOT NULL AND s.schemaname = 'public'"
                ).fetchall()
            )

    async with PostgresStore(postgres_dsn) as store:
        await store.transaction(patients[:100])
        await asyncio.sleep(0.3)
        assert analyzed() == {}  # 100 versions: not yet looked at
        await store.transaction(patients[100:])
        deadline = time.monotonic() + 10
        while "sp_token" not in analyzed() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tables = analyzed()
    # The tables the write filled, with what the planner now knows of them.
    assert tables.get("resources") == 600 and tables.get("history") == 600
    assert tables.get("sp_token", 0) >= 600


async def test_a_write_the_database_refuses_fails_alone_among_writes_committed_together(postgres_dsn: str) -> None:
    """PostgreSQL refuses one name (a CHECK constraint another session puts on the string index
    for the test); the creates committed together with it are written one by one after the shared
    transaction fails, and only it fails."""
    async with PostgresStore(postgres_dsn) as store:
        with psycopg.connect(postgres_dsn, autocommit=True) as other:
            other.execute("ALTER TABLE sp_string ADD CONSTRAINT refuse_one_name CHECK (exact <> 'Refused')")
            try:
                busy = asyncio.ensure_future(store._run(time.sleep, 0.2))  # the creates queue up behind it
                await asyncio.sleep(0.01)
                outcomes = await asyncio.gather(
                    *(store.create({"resourceType": "Patient", "name": [{"family": f"Good{n}"}]}) for n in range(5)),
                    store.create({"resourceType": "Patient", "name": [{"family": "Refused"}]}),
                    busy,
                    return_exceptions=True,
                )
            finally:
                other.execute("ALTER TABLE sp_string DROP CONSTRAINT refuse_one_name")
        assert all(isinstance(outcome, dict) for outcome in outcomes[:5]), outcomes
        assert isinstance(outcomes[5], psycopg.errors.CheckViolation), outcomes[5]
        assert len(await store.history("Patient")) == 5
        # Without the constraint the same create is written.
        assert (await store.create({"resourceType": "Patient", "name": [{"family": "Refused"}]}))["meta"]
        assert len(await store.history("Patient")) == 6


async def test_a_database_with_whole_value_indexes_gets_bounded_ones_once_at_start_up(postgres_dsn: str) -> None:
    """A database created before index definitions 2 indexes whole token codes and strings, which
    PostgreSQL cannot do beyond about 2,700 bytes: opening it replaces those two indexes (once)
    and leaves the index rows as they are."""
    names = ("sp_token_value", "sp_string_value")
    long = "".join(map(str, range(3000)))  # 10,890 characters that do not compress to 2,700 bytes

    def indexes(raw: psycopg.Connection[tuple[Any, ...]]) -> dict[str, tuple[int, str]]:
        rows = raw.execute(
            "SELECT c.relname, c.oid, pg_get_indexdef(c.oid) FROM pg_class c WHERE c.relname = ANY(%s)", (list(names),)
        ).fetchall()
        return {str(name): (int(oid), str(definition)) for name, oid, definition in rows}

    async with PostgresStore(postgres_dsn) as store:
        older = await store.create(
            {"resourceType": "Patient", "name": [{"family": "Older"}], "identifier": [{"value": "o1"}]}
        )
    with psycopg.connect(postgres_dsn, autocommit=True) as raw:
        for name, (table, column) in zip(names, [("sp_token", "code"), ("sp_string", "norm")], strict=True):
            raw.execute(f"DROP INDEX {name}")
            raw.execute(f"CREATE INDEX {name} ON {table} (type, param, {column})")
        raw.execute("DELETE FROM store_meta WHERE key = 'index_definitions'")
        rows = raw.execute("SELECT ctid FROM sp_string UNION ALL SELECT ctid FROM sp_token ORDER BY 1").fetchall()

    async with PostgresStore(postgres_dsn) as store:
        assert [r["id"] for r in (await store.search(parse_search("Patient", [("family", "old")]))).resources] == [
            older["id"]
        ]
        made = await store.create(
            {"resourceType": "Patient", "name": [{"family": long}], "identifier": [{"value": long}]}
        )
        assert [r["id"] for r in (await store.search(parse_search("Patient", [("identifier", long)]))).resources] == [
            made["id"]
        ]
    with psycopg.connect(postgres_dsn, autocommit=True) as raw:
        replaced = indexes(raw)
        assert f'"left"(code, {KEY_CHARS}) COLLATE "C"' in replaced["sp_token_value"][1]
        assert f'"left"(norm, {KEY_CHARS}) COLLATE "C"' in replaced["sp_string_value"][1]
        assert raw.execute("SELECT value FROM store_meta WHERE key = 'index_definitions'").fetchone() == (
            INDEX_DEFINITIONS,
        )
        # The rows written before are where they were: not reindexed.
        assert (
            raw.execute(
                "SELECT ctid FROM sp_string WHERE id = %s UNION ALL SELECT ctid FROM sp_token WHERE id = %s ORDER BY 1",
                (older["id"], older["id"]),
            ).fetchall()
            == rows
        )
    async with PostgresStore(postgres_dsn) as store:
        await store.read("Patient", made["id"])
    with psycopg.connect(postgres_dsn, autocommit=True) as raw:
        assert indexes(raw) == replaced  # the same indexes: not dropped and created again


async def test_a_string_with_u0000_is_refused_with_its_path(postgres_dsn: str) -> None:
    """R4's string regex admits U+0000, PostgreSQL cannot store it: a 400 naming the element."""
    async with PostgresStore(postgres_dsn) as store:
        with pytest.raises(InputError) as error:
            await store.create({"resourceType": "Patient", "name": [{"given": ["Ann", "A\u0000B"]}]})
        assert error.value.expression == "Patient.name[0].given[1]"
        assert await store.history("Patient") == []


async def test_a_transaction_names_the_operation_whose_resource_cannot_be_stored(postgres_dsn: str) -> None:
    """An error raised while writing (not planning) an operation carries that operation's index."""
    async with PostgresStore(postgres_dsn) as store:
        operations = [
            Operation.create({"resourceType": "Patient", "name": [{"family": "Ann"}]}),
            Operation.create({"resourceType": "Patient", "name": [{"family": "Bea"}]}),
            Operation.create({"resourceType": "Patient", "name": [{"family": "C\u0000"}]}),
        ]
        with pytest.raises(InputError) as error:
            await store.transaction(operations)
        assert error.value.operation == 2 and error.value.expression == "Patient.name[0].family"
        assert await store.history("Patient") == []


async def test_writes_whose_callers_gave_up_are_not_written(postgres_dsn: str) -> None:
    """Two updates committed together wait for another session's lock; both callers are
    cancelled, which interrupts the transaction: neither is written afterwards."""
    async with PostgresStore(postgres_dsn, lock_timeout=30) as store:
        with psycopg.connect(postgres_dsn) as other:
            other.execute("SELECT pg_advisory_xact_lock(hashtextextended('Patient/x', 0))")
            busy = asyncio.ensure_future(store._run(time.sleep, 0.2))
            await asyncio.sleep(0.01)
            writes = [asyncio.ensure_future(store.update({"resourceType": "Patient", "id": id})) for id in "xy"]
            await busy
            await asyncio.sleep(0.3)  # both now wait in one transaction for the lock of Patient/x
            for write in writes:
                write.cancel()
            for write in writes:
                with pytest.raises(asyncio.CancelledError):
                    await write
            other.rollback()
        await asyncio.sleep(0.3)
        for id in "xy":
            with pytest.raises(NotFound):
                await store.read("Patient", id)
        updated, created = await store.update({"resourceType": "Patient", "id": "x"})
        assert created and updated["meta"]["versionId"] == "1"
