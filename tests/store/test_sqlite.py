"""What only the SQLite store promises: a file that survives reopening and a killed writer, WAL, locking."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from adapter.store import Conflict, Gone, Operation, SQLiteStore, VersionConflict

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


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


# The writer: 5,000 creates in one transaction. Each create serialises its resource with
# ``dumps``; the patched ``dumps`` says INSIDE after 4,000 of them (and, when asked, then waits
# to be killed), so the kill lands inside the transaction after many rows have been written.
WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    import adapter.store.sqlite as module
    from adapter.store import Operation, SQLiteStore

    path, pause = sys.argv[1], sys.argv[2] == "pause"
    real_dumps, calls = module.dumps, 0

    def dumps(resource):
        global calls
        calls += 1
        if calls == 4000:
            print("INSIDE", flush=True)
            if pause:
                time.sleep(60)
        return real_dumps(resource)

    module.dumps = dumps

    async def main():
        store = SQLiteStore(path)
        operations = [
            Operation.create({"resourceType": "Observation", "status": "final", "note": [{"text": "x" * 1000}]})
            for _ in range(5000)
        ]
        await store.transaction(operations)
        await store.close()
        print("DONE", flush=True)

    asyncio.run(main())
    """
)


def run_writer(path: Path, pause: bool) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "pause" if pause else "go"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines = [process.stdout.readline().strip()]
    return process, lines


@pytest.mark.parametrize("killed", [True, False], ids=["killed", "completed"])
async def test_a_writer_killed_mid_transaction_leaves_all_or_nothing(tmp_path: Path, killed: bool) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        before = await store.create({"resourceType": "Patient"})

    process, lines = run_writer(path, pause=killed)
    try:
        assert lines == ["INSIDE"]
        if killed:
            process.send_signal(signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines += out.split()

    if killed:
        assert process.returncode == -signal.SIGKILL
        assert lines == ["INSIDE"]
        # Uncommitted pages spilled into the WAL, so recovery really had something to discard.
        assert os.path.getsize(f"{path}-wal") > 1_000_000
    else:
        assert process.returncode == 0
        assert lines == ["INSIDE", "DONE"]

    async with SQLiteStore(path) as store:
        observations = await store.history("Observation")
        assert len(observations) == (0 if killed else 5000)
        assert await store.read("Patient", before["id"]) == before
        results = await store.transaction([Operation.create({"resourceType": "Patient"})])
        assert results[0].created is True
        assert len(await store.history()) == len(observations) + 2


async def test_a_store_that_cannot_open_raises_and_leaves_no_worker(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(sqlite3.OperationalError):
        SQLiteStore(tmp_path / "no-such-folder" / "store.db")
    assert not [t for t in threading.enumerate() if t.name.startswith("sqlite-store") and t.name not in before]
