"""What only the SQLite store promises: a file that survives reopening and a killed writer, WAL, locking."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapter.store import Conflict, Gone, SQLiteStore, VersionConflict
from tests.store import killed_writer

pytestmark = pytest.mark.anyio


async def test_a_file_store_keeps_everything_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        kept = await store.create({"resourceType": "Observation", "valueQuantity": {"value": Decimal("0.40")}})
        updated, _ = await store.update({**kept, "status": "final"})
        gone = await store.create({"resourceType": "Patient"})
        await store.delete("Patient", gone["id"])
        history = await store.history()

    async with SQLiteStore(path) as reopened:
        assert await reopened.read("Observation", kept["id"]) == updated
        assert str((await reopened.vread("Observation", kept["id"], "1"))["valueQuantity"]["value"]) == "0.40"
        with pytest.raises(Gone):
            await reopened.read("Patient", gone["id"])
        assert await reopened.history() == history
        again, _ = await reopened.update(updated, if_match="2")
        assert again["meta"]["versionId"] == "3"

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("SELECT count(*) FROM history").fetchone() == (5,)


async def test_two_stores_on_one_file_cannot_both_win_the_same_if_match(tmp_path: Path) -> None:
    """Each store has its own connection and thread, so only BEGIN IMMEDIATE keeps them apart."""
    path = tmp_path / "store.db"
    stores = [SQLiteStore(path) for _ in range(4)]
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


async def test_a_writer_locked_out_past_the_busy_timeout_gets_conflict(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path, busy_timeout=0.1) as store:
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        with pytest.raises(Conflict):
            await store.update({"resourceType": "Patient", "id": "p1"})
        raw.execute("ROLLBACK")
        raw.close()
        _, created = await store.update({"resourceType": "Patient", "id": "p1"})
        assert created is True


async def test_a_writer_waits_for_another_writer_and_then_writes(tmp_path: Path) -> None:
    """The store retries BEGIN IMMEDIATE itself (its connection's busy timeout is 0): a write that
    meets another writer's transaction waits for it and then succeeds, with nothing lost."""
    path = tmp_path / "store.db"
    async with SQLiteStore(path, busy_timeout=5.0) as store:
        await store.update({"resourceType": "Patient", "id": "p1"})
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("UPDATE resources SET last_updated = last_updated WHERE id = 'p1'")
        asyncio.get_running_loop().call_later(0.3, lambda: (raw.execute("COMMIT"), raw.close()))
        started = time.monotonic()
        results = await asyncio.gather(*(store.update({"resourceType": "Patient", "id": f"q{n}"}) for n in range(5)))
        assert time.monotonic() - started >= 0.25  # it did wait for the other writer
        assert [created for _, created in results] == [True] * 5
        assert len(await store.history("Patient")) == 6


async def test_an_in_memory_store_starts_empty_each_time() -> None:
    async with SQLiteStore(":memory:") as first:
        await first.update({"resourceType": "Patient", "id": "p1"})
    async with SQLiteStore(":memory:") as second:
        assert await second.history() == []


async def test_a_closed_store_refuses_work() -> None:
    store = SQLiteStore(":memory:")
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        await store.read("Patient", "p1")


@pytest.mark.parametrize("killed", [True, False], ids=["killed", "completed"])
async def test_a_writer_killed_mid_transaction_leaves_all_or_nothing(tmp_path: Path, killed: bool) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        before = await store.create({"resourceType": "Patient"})

    process, lines = killed_writer.start(f"sqlite:///{path}", pause=killed)
    assert lines == ["INSIDE"]
    if killed:
        process.send_signal(signal.SIGKILL)
    lines = killed_writer.finish(process, lines, timeout=60)

    if killed:
        assert process.returncode == -signal.SIGKILL
        assert lines == ["INSIDE"]
        # Uncommitted pages spilled into the WAL, so recovery really had something to discard.
        assert os.path.getsize(f"{path}-wal") > 1_000_000
    else:
        assert process.returncode == 0
        assert lines == ["INSIDE", "DONE"]

    async with SQLiteStore(path) as store:
        await killed_writer.check_all_or_nothing(store, before, killed)


async def test_a_store_that_cannot_open_raises_and_leaves_no_worker(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(sqlite3.OperationalError):
        SQLiteStore(tmp_path / "no-such-folder" / "store.db")
    assert not [t for t in threading.enumerate() if t.name.startswith("sqlite-store") and t.name not in before]


async def test_a_database_without_a_current_index_is_reindexed_on_open(tmp_path: Path) -> None:
    """A file written before the index existed (or by another INDEX_VERSION) becomes searchable."""

    from adapter.search.query import parse_search

    path = tmp_path / "old.db"
    async with SQLiteStore(path) as store:
        made = await store.create({"resourceType": "Patient", "name": [{"family": "Older"}]})
    with sqlite3.connect(path) as raw:
        raw.execute("DELETE FROM sp_string")
        raw.execute("DELETE FROM store_meta")
    async with SQLiteStore(path) as reopened:
        found = await reopened.search(parse_search("Patient", [("family", "old")]))
        assert [r["id"] for r in found.resources] == [made["id"]]


@pytest.mark.parametrize(("synchronous", "level"), [("NORMAL", 1), ("FULL", 2)])
async def test_the_durability_level_is_the_one_asked_for(tmp_path: Path, synchronous: Any, level: int) -> None:
    async with SQLiteStore(tmp_path / "s.db", synchronous=synchronous) as store:
        assert await store._run(lambda: store._conn.execute("PRAGMA synchronous").fetchone()[0]) == level


async def test_writes_are_checkpointed_off_the_write_path(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)  # a fresh connection's default
        before = path.stat().st_size
        for number in range(30):
            await store.create({"resourceType": "Patient", "id": f"p{number}", "gender": "other"})
        # Far below the writer's own checkpoint mark (and SQLite's default 1,000 pages): only the
        # checkpoint thread can have copied these commits from the WAL into the database file.
        for _ in range(100):
            if path.stat().st_size > before:
                break
            await asyncio.sleep(0.02)
        assert path.stat().st_size > before
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as raw:
            assert raw.execute("SELECT count(*) FROM resources").fetchone() == (30,)
        assert any(thread.name == "sqlite-checkpoint" for thread in threading.enumerate())
    # Closing stops the thread.
    assert not any(thread.name == "sqlite-checkpoint" for thread in threading.enumerate())
