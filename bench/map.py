"""Mapping speed: synthetic referrals, case records and outcomes mapped, validated and ingested.

    .venv/bin/python -m bench.map [--records 100000] [--markdown]

Generates ``--records`` referrals (CSV, sp-referral) with, for every referral, a case record
(NDJSON, sp-case) and an assessment (CSV, sp-outcomes), all synthetic (NHS numbers from the 999 test
range with valid check digits), written to a temporary folder. Then measures, each in one process:

1. **mapping plus validation**: every record mapped by its mapping and every resource validated
   against R4 and its profiles (:func:`adapter.mapping.run.run`), records per second;
2. **peak memory** of ``spfhir map`` (a child process) on the whole referral file, written as NDJSON:
   bounded memory means it does not grow with the input;
3. **end-to-end ingest into SQLite**: the same files POSTed to ``$ingest`` in chunks of 2,000 records
   through the app ``spfhir serve`` runs (:func:`adapter.serve.build_app` with its start-up and
   shut-down, in process, no sockets) over a SQLite file store, records per second.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import resource as rusage
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

from adapter.mapping.run import Summary, run
from adapter.mapping.spec import load
from adapter.serve import build_app
from adapter.settings import Settings
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator
from bench.api import nhs_numbers

ROOT = Path(__file__).resolve().parents[1]
REASONS = ["Loneliness", "Low mood", "Debt", "Housing", "Bereavement", "Carer support", "Physical inactivity"]
GIVEN = ["Alex", "Sam", "Zoë", "Siobhán", "Ellis", "Priya", "Tomás", "Aoife"]
FAMILY = ["Smith", "O'Connor", "Núñez", "Khan", "Carmody", "Ó Briain", "Jones", "D'Arcy"]


def referrals(numbers: list[str]) -> Iterator[list[str]]:
    yield [
        "Referral ID",
        "NHS Number",
        "Forename",
        "Surname",
        "DOB",
        "Sex",
        "Postcode",
        "GP practice ODS code",
        "Referrer",
        "Referrer role",
        "Referrer organisation",
        "Referral date",
        "Reasons",
        "Urgency",
        "Consent",
        "Notes",
    ]
    for index, number in enumerate(numbers):
        practice = f"B{81000 + index % 400}"
        yield [
            f"REF-{index:07d}",
            number,
            GIVEN[index % len(GIVEN)],
            FAMILY[index % len(FAMILY)],
            f"{1 + index % 28:02d}/{1 + index % 12:02d}/{1940 + index % 60}",
            "F" if index % 2 else "M",
            "ZZ99 3AA",
            practice,
            f"Dr Referrer {index % 997}",
            "GP",
            practice,
            f"{1 + index % 28:02d}/{1 + index % 12:02d}/2024",
            ";".join(REASONS[(index + step) % len(REASONS)] for step in range(1 + index % 2)),
            "Urgent" if index % 10 == 0 else "Routine",
            "Y",
            f"Synthetic referral {index}",
        ]


def case(index: int, number: str) -> dict[str, object]:
    """A link worker case in the shape of ``mappings/sp-case/cases/full/input.json``."""
    month = 1 + index % 9
    return {
        "case_id": f"CASE-{index:07d}",
        "nhs_number": number,
        "referral_id": f"REF-{index:07d}",
        "link_worker": {"id": f"LW-{index % 50:02d}", "name": f"Link Worker {index % 50}"},
        "service_ods": "X26SP1",
        "status": "finished",
        "start_date": f"2024-{month:02d}-03",
        "end_date": f"2024-{month + 3:02d}-20",
        "closure_reason": "Goals achieved",
        "plan": {"description": "What matters to me: seeing people again.", "status": "Completed"},
        "contacts": [
            {"contact_id": f"C{step}", "date": f"2024-{month + step:02d}-10T10:30:00", "mode": mode}
            for step, mode in ((1, "Face to face"), (2, "Telephone"))
        ],
        "goals": [
            {
                "goal_id": "G1",
                "description": "Meet people twice a week.",
                "importance": 8,
                "confidence": 5,
                "status": "Active",
            }
        ],
        "activities": [
            {"activity_id": "A1", "category": "Physical activity", "provider": "Walking group", "status": "Completed"},
            {"activity_id": "A2", "category": "Befriending", "provider": "Age UK", "status": "In progress"},
        ],
    }


def assessments(numbers: list[str]) -> Iterator[list[str]]:
    """One WEMWBS total per person, in the shape of ``mappings/sp-outcomes/cases/totals/input.csv``."""
    yield ["assessment_id", "nhs_number", "tool", "date", "total", *(f"item_{n}" for n in range(1, 15)), "comment"]
    for index, number in enumerate(numbers):
        yield [f"ASM-{index:07d}", number, "WEMWBS", "17/01/2024", str(14 + index % 57), *([""] * 14), ""]


def write_inputs(folder: Path, count: int) -> dict[str, Path]:
    numbers = list(itertools.islice(nhs_numbers(), count))
    files = {
        "sp-referral": folder / "referrals.csv",
        "sp-case": folder / "cases.ndjson",
        "sp-outcomes": folder / "assessments.csv",
    }
    with files["sp-referral"].open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(referrals(numbers))
    with files["sp-case"].open("wb") as binary:
        for index, number in enumerate(numbers):
            binary.write(orjson.dumps(case(index, number)) + b"\n")
    with files["sp-outcomes"].open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(assessments(numbers))
    return files


def map_only(files: dict[str, Path], processes: int = 1) -> tuple[int, float]:
    validator = ProfileValidator(bundled_packages())
    records = 0
    started = time.perf_counter()
    for name, path in files.items():
        summary = Summary(name, path.name)
        with path.open("rb") as handle:
            for _ in run(load(name), handle, validator, summary, batch_size=500, processes=processes):
                pass
        assert summary.rejected == 0, summary.rejections[:3]
        records += summary.records
    return records, time.perf_counter() - started


def peak_memory_of_cli(path: Path, mapping: str, folder: Path) -> float:
    before = rusage.getrusage(rusage.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "spfhir"), "map", "-m", mapping, str(path), "-o", str(folder / "out.ndjson")],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    peak = rusage.getrusage(rusage.RUSAGE_CHILDREN).ru_maxrss
    return max(peak, before) / 1024


def _chunks(path: Path, size: int) -> Iterator[bytes]:
    """The file in pieces of ``size`` records (a CSV piece repeats the header)."""
    with path.open("rb") as handle:
        header = handle.readline() if path.suffix == ".csv" else b""
        lines: list[bytes] = []
        for line in handle:
            lines.append(line)
            if len(lines) == size:
                yield header + b"".join(lines)
                lines = []
        if lines:
            yield header + b"".join(lines)


def _head(path: Path, count: int) -> Path:
    """A copy of ``path`` with its first ``count`` records."""
    target = path.with_name(f"head-{path.name}")
    with path.open("rb") as source, target.open("wb") as out:
        for number, line in enumerate(source):
            if number >= count + (1 if path.suffix == ".csv" else 0):
                break
            out.write(line)
    return target


async def ingest(files: dict[str, Path], database: Path) -> tuple[int, float, float, int]:
    """Records ingested, seconds, this process's CPU seconds meanwhile (the server's; its mapping
    worker is another process), resources stored."""
    # The served app, start-up included: the collector's settings that ``spfhir serve`` makes for
    # its long-lived heap apply here too.
    app = build_app(Settings(database=f"sqlite:///{database}", max_body_bytes=200_000_000))
    media = {".csv": "text/csv", ".ndjson": "application/x-ndjson"}
    records = 0
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=None) as client,
    ):
        started, cpu = time.perf_counter(), time.process_time()
        for name, path in files.items():
            for body in _chunks(path, 2000):
                response = await client.post(
                    "/fhir/$ingest",
                    params={"mapping": name},
                    content=body,
                    headers={"Content-Type": media[path.suffix]},
                )
                response.raise_for_status()
                errors = [issue for issue in response.json()["issue"] if issue["severity"] == "error"]
                assert not errors, errors[:3]
                records += body.count(b"\n") - (1 if path.suffix == ".csv" else 0)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    with sqlite3.connect(database) as connection:  # counted in SQL: the history would not fit in memory
        stored = int(connection.execute("SELECT count(*) FROM resources").fetchone()[0])
    return records, elapsed, cpu, stored


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="referrals (each with a case and an assessment)")
    parser.add_argument(
        "--ingest-records", type=int, help="ingest only the first N records of each file (default: all)"
    )
    parser.add_argument("--processes", type=int, default=1, help="worker processes for the mapping figure")
    parser.add_argument("--only", choices=["sp-referral", "sp-case", "sp-outcomes"], help="one mapping only")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    options = parser.parse_args(arguments)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        files = write_inputs(folder, options.records)
        if options.only:
            files = {options.only: files[options.only]}
        mapped, map_seconds = map_only(files, options.processes)
        first, path = next(iter(files.items()))
        peak = peak_memory_of_cli(path, first, folder)
        if options.ingest_records:
            files = {name: _head(path, options.ingest_records) for name, path in files.items()}
        ingested, ingest_seconds, server_cpu, versions = asyncio.run(ingest(files, folder / "bench.db"))
    figures = {
        "records": mapped,
        "ingested_records": ingested,
        "map_validate_records_per_s": round(mapped / map_seconds),
        "map_processes": options.processes,
        "cli_peak_rss_mb": round(peak, 1),
        "ingest_records_per_s": round(ingested / ingest_seconds),
        "ingest_server_cpu_us_per_record": round(server_cpu / ingested * 1e6),
        "resources_stored": versions,
        "bench_peak_rss_mb": round(rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if options.markdown:
        print("| Figure | Value |\n|---|---|")
        for key, value in figures.items():
            print(f"| {key} | {value:,} |")
    else:
        json.dump(figures, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
