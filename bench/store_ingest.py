"""The store's part of ``$ingest``: ``ResourceStore.transactions`` per window of mapped records.

    .venv/bin/python -m bench.store_ingest [--records 2000] [--database sqlite|postgres|DSN] [--profile first|repeat]

Maps ``--records`` synthetic referrals, case records and assessments once (as :mod:`bench.map`
writes them, with validation, not timed), builds each record's operations as ``$ingest`` does
(conditional creates on business identifiers, deterministic ids), then times only the store:
``transactions`` of each 64-record window into an empty database (``first``: every resource
created), then the same records again (``repeat``: every condition matches, nothing written).
``postgres`` starts a throwaway server (``tests/store/pg_server.py``). ``--profile`` prints the
cProfile of the first or the repeated ingest, to tell where the time goes on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

from adapter.api.ingest import _WINDOW, _operations
from adapter.mapping.engine import MappedRecord
from adapter.mapping.run import Summary, run
from adapter.mapping.spec import load
from adapter.store import Operation, ResourceStore, SQLiteStore
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator
from bench.map import write_inputs


def mapped_records(folder: Path, count: int) -> list[MappedRecord]:
    validator = ProfileValidator(bundled_packages())
    records: list[MappedRecord] = []
    for name, path in write_inputs(folder, count).items():
        summary = Summary(name, path.name)
        with path.open("rb") as handle:
            for batch in run(load(name), handle, validator, summary, batch_size=500):
                records.extend(record for record in batch.records if record.error is None and record.resources)
    return records


async def ingest(store: ResourceStore, windows: list[list[list[Operation]]]) -> tuple[float, int, int]:
    """Seconds spent in ``transactions``, resources created, records refused."""
    created = refused = 0
    started = time.perf_counter()
    for window in windows:
        for outcome in await store.transactions(window):
            if isinstance(outcome, Exception):
                refused += 1
            else:
                created += sum(1 for result in outcome if result.created and not result.matched)
    return time.perf_counter() - started, created, refused


async def measure(
    store: ResourceStore, records: list[MappedRecord], profile: str | None, window: int = _WINDOW
) -> dict[str, object]:
    groups = [_operations(record) for record in records]
    windows = [groups[start : start + window] for start in range(0, len(groups), window)]
    profiler = cProfile.Profile() if profile else None
    # The store works on its worker thread: the profiler is switched on and off there.
    worker = getattr(store, "_run", None)
    timings: list[tuple[float, int, int]] = []
    for phase in ("first", "repeat"):
        if profiler is not None and worker is not None and profile == phase:
            await worker(profiler.enable)
        timings.append(await ingest(store, windows))
        if profiler is not None and worker is not None and profile == phase:
            await worker(profiler.disable)
    (first, created, refused), (repeat, created_again, refused_again) = timings
    await store.close()
    assert refused == refused_again == 0 and created_again == 0, (refused, refused_again, created_again)
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
    resources = sum(len(group) for group in groups)
    return {
        "records": len(records),
        "resources": resources,
        "created": created,
        "first_records_per_s": round(len(records) / first),
        "first_ms_per_record": round(first * 1000 / len(records), 3),
        "repeat_records_per_s": round(len(records) / repeat),
        "repeat_ms_per_record": round(repeat * 1000 / len(records), 3),
    }


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="referrals (each with a case and an assessment)")
    parser.add_argument("--database", default="sqlite", help="sqlite (a temporary file), postgres, or a DSN")
    parser.add_argument("--window", type=int, default=_WINDOW, help="records per transactions() call")
    parser.add_argument("--runs", type=int, default=1, help="repeat the measurement on fresh databases")
    parser.add_argument("--profile", choices=["first", "repeat"], help="cProfile of one of the ingests, on stderr")
    options = parser.parse_args(arguments)
    server = None
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        records = mapped_records(folder, options.records)
        try:
            for run_number in range(options.runs):
                store: ResourceStore
                if options.database == "sqlite":
                    store = SQLiteStore(folder / f"bench-{run_number}.db")
                else:
                    from adapter.store.postgres import PostgresStore

                    dsn = options.database
                    if dsn == "postgres":
                        from tests.store import pg_server

                        server = server or pg_server.start(durable=True)  # as in production
                        dsn = server.dsn()
                        import psycopg

                        with psycopg.connect(dsn, autocommit=True) as conn:
                            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
                            conn.execute("CREATE SCHEMA public")
                    store = PostgresStore(dsn)
                figures = asyncio.run(
                    measure(store, records, options.profile if run_number == 0 else None, options.window)
                )
                print(json.dumps(figures))
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
