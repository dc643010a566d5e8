"""A writer process for the "killed mid-transaction" tests of every store.

Run as ``python tests/store/killed_writer.py DATABASE_URL pause|go``: it opens the store for the URL
(``adapter.settings.open_store``) and applies 5,000 creates in one transaction. The store gathers the
rows and writes each table with one batch; the patched batch writer prints INSIDE once the resources
and history tables have been written (and with ``pause`` then waits to be killed), so the kill lands
inside the transaction after 10,000 rows have been written and before the index rows.
The helpers below start it and check the store afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CREATES = 5000
# Pause after this many 5,000-row batches (resources, then history).
SIGNAL_AFTER_TABLES = 2


def start(database: str, pause: bool) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the writer and wait for its INSIDE line; returns the process and the lines so far."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), database, "pause" if pause else "go"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, [process.stdout.readline().strip()]


def finish(process: subprocess.Popen[str], lines: list[str], timeout: float) -> list[str]:
    """Wait for the writer to end (killing it if it outlives the timeout); all its lines."""
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return lines + out.split()


async def check_all_or_nothing(store: Any, before: dict[str, Any], killed: bool) -> None:
    """The store holds all of the writer's transaction or none of it, and still works."""
    observations = await store.history("Observation")
    assert len(observations) == (0 if killed else CREATES)
    assert await store.read("Patient", before["id"]) == before
    from adapter.store import Operation

    results = await store.transaction([Operation.create({"resourceType": "Patient"})])
    assert results[0].created is True
    assert len(await store.history()) == len(observations) + 2


def _main(database: str, pause: bool) -> None:
    from adapter.settings import open_store
    from adapter.store import Operation

    store = open_store(database)
    # Both stores write each table with one _execute_all call (PostgreSQL's own: arrays of rows).
    kind = type(store)
    real_execute_all, calls = kind._execute_all, 0

    def execute_all(self: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        nonlocal calls
        real_execute_all(self, sql, rows)
        if len(rows) == CREATES:
            calls += 1
            if calls == SIGNAL_AFTER_TABLES:
                print("INSIDE", flush=True)
                if pause:
                    time.sleep(60)

    kind._execute_all = execute_all  # type: ignore[method-assign]

    async def run() -> None:
        operations = [
            Operation.create({"resourceType": "Observation", "status": "final", "note": [{"text": "x" * 1000}]})
            for _ in range(CREATES)
        ]
        await store.transaction(operations)
        await store.close()
        print("DONE", flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2] == "pause")
