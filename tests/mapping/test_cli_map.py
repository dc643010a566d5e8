"""``spfhir map`` and ``spfhir unmap`` from the command line, and a run killed half-way then re-run
against a real ``spfhir serve``: every record stored exactly once."""

from __future__ import annotations

import csv
import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from bench.map import referrals
from tests.test_serve import ROOT, free_port, spfhir, stop, wait_until_up

CASES = ROOT / "mappings" / "sp-referral" / "cases"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from adapter.cli import main; main()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_map_list_names_every_mapping(tmp_path: Path) -> None:
    result = run("map", "--list", cwd=tmp_path)
    assert result.returncode == 0
    names = {line.split("\t")[0] for line in result.stdout.splitlines()}
    assert {"sp-referral", "sp-case", "sp-outcomes", "gpconnect-structured", "message-back-to-gp"} <= names


def test_map_writes_a_bundle_and_reports_rejections(tmp_path: Path) -> None:
    result = run("map", "-m", "sp-referral", str(CASES / "awkward" / "input.csv"), "-o", "out.json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # some records rejected
    assert "7 records read, 4 mapped, 3 rejected" in result.stderr
    assert "rejected record 5, nhs_number" in result.stderr
    assert "unused fields: Favourite colour (2), Shoe size (1)" in result.stderr
    bundle = orjson.loads((tmp_path / "out.json").read_bytes())
    assert bundle["type"] == "transaction"
    checked = run("validate", "out.json", "--format", "json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout


def test_map_to_ndjson_and_unmap_back(tmp_path: Path) -> None:
    source = CASES / "basic" / "input.csv"
    assert run("map", "-m", "sp-referral", str(source), "-o", "out.ndjson", cwd=tmp_path).returncode == 0
    lines = [orjson.loads(line) for line in (tmp_path / "out.ndjson").read_bytes().splitlines()]
    assert lines[-1]["resourceType"] == "Provenance"
    referral = next(line for line in lines if line["resourceType"] == "ServiceRequest")
    assert referral["subject"]["reference"].startswith("Patient/")  # NDJSON: Type/id references
    result = run("unmap", "-m", "sp-referral", "out.ndjson", "-o", "back.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with (tmp_path / "back.csv").open(encoding="utf-8-sig", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["nhs_number"] == "9990000018" and row["birth_date"] == "14/03/1958"
    assert row["reasons"] == "Loneliness or social isolation;Low mood, stress or anxiety"


def test_unmap_of_mappings_built_by_code_uses_their_flatten(tmp_path: Path) -> None:
    gp = ROOT / "mappings" / "gpconnect-structured" / "cases" / "full" / "input.json"
    assert run("map", "-m", "gpconnect-structured", str(gp), "-o", "gp.json", cwd=tmp_path).returncode == 0
    assert run("unmap", "-m", "gpconnect-structured", "gp.json", "-o", "gp.csv", cwd=tmp_path).returncode == 0
    with (tmp_path / "gp.csv").open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["resource_type"] for row in rows} >= {"Condition", "Observation", "AllergyIntolerance"}
    assert {row["nhs_number"] for row in rows} == {"9990000018"}
    case = ROOT / "mappings" / "message-back-to-gp" / "cases" / "closed-case" / "input.json"
    assert run("map", "-m", "message-back-to-gp", str(case), "-o", "letter.json", cwd=tmp_path).returncode == 0
    assert (tmp_path / "letter.html").read_text().startswith("<!DOCTYPE html>")
    assert run("unmap", "-m", "message-back-to-gp", "letter.json", "-o", "out.csv", cwd=tmp_path).returncode == 0
    with (tmp_path / "out.csv").open(encoding="utf-8-sig", newline="") as handle:
        wemwbs = [row for row in csv.DictReader(handle) if row["tool"] == "wemwbs"]
    assert [(row["first_score"], row["last_score"], row["change"]) for row in wemwbs] == [("38", "51", "+13")]


def test_map_writes_a_bundle_per_batch_into_a_folder(tmp_path: Path) -> None:
    source = tmp_path / "many.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(referrals(["9990000018", "9990000026", "9990000034"]))
    result = run("map", "-m", "sp-referral", str(source), "-o", "out/", "--batch-size", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["bundle-000001.json", "bundle-000002.json"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("map", "-m", "no-such", "x.csv"), "no mapping 'no-such'"),
        (("map", "-m", "sp-referral", "missing.csv"), "missing.csv"),
        (("map", "x.csv"), "--mapping"),
        (("map", "-m", "sp-referral", "bad.csv"), "names none of the fields"),
        (("unmap", "-m", "sp-referral", "x.csv", "-o", "y.csv"), "x.csv"),
        (("map", "-m", "sp-referral", "x.csv", "--encoding", "latin-9x"), "--encoding"),
        (("map", "-m", "sp-referral", "x.csv", "--delimiter", ";;"), "--delimiter"),
        (("map", "-m", "sp-referral", "x.csv", "--to-server", "http://[::1"), "--to-server"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    (tmp_path / "bad.csv").write_text("colour,size\nblue,6\n")
    (tmp_path / "x.csv").write_text("a\n")
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _count(base: str, type: str) -> int:
    answer = httpx.get(f"{base}/{type}", params={"_summary": "count"}, timeout=10)
    total: int = answer.json()["total"]
    return total


def test_a_run_killed_half_way_and_run_again_stores_every_record_once(tmp_path: Path) -> None:
    from bench.api import nhs_numbers

    records = 600
    source = tmp_path / "referrals.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(referrals(list(itertools.islice(nhs_numbers(), records))))
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    log = tmp_path / "server.log"
    server = spfhir("serve", "--database", f"sqlite:///{tmp_path}/db", "--port", str(port), log=log)
    try:
        wait_until_up(server, base, log)
        args = ("map", "-m", "sp-referral", str(source), "--to-server", base, "--batch-size", "20")
        mapper = spfhir(*args, log=tmp_path / "map1.log")
        deadline = time.monotonic() + 60
        while _count(base, "ServiceRequest") < records // 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        mapper.send_signal(signal.SIGKILL)
        mapper.wait()
        stored = _count(base, "ServiceRequest")
        assert 0 < stored < records, "the run should have been killed half-way"
        again = run(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert _count(base, "ServiceRequest") == records
        assert _count(base, "Patient") == records
        # Nothing was written twice: every referral and patient has one version only.
        for type in ("ServiceRequest", "Patient", "Task", "Consent"):
            history = httpx.get(f"{base}/{type}/_history", params={"_count": "5000"}, timeout=30).json()
            assert history["total"] == records, type
    finally:
        stop(server)


def test_mapping_in_worker_processes_gives_the_same_output(tmp_path: Path) -> None:
    from bench.api import nhs_numbers

    source = tmp_path / "referrals.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(referrals(list(itertools.islice(nhs_numbers(), 450))))
    one = run("map", "-m", "sp-referral", str(source), "-o", "one.ndjson", cwd=tmp_path)
    two = run("map", "-m", "sp-referral", str(source), "-o", "two.ndjson", "--processes", "2", cwd=tmp_path)
    assert one.returncode == two.returncode == 0, two.stderr
    assert one.stderr == two.stderr
    strip = [line for line in (tmp_path / "one.ndjson").read_bytes().splitlines() if b'"Provenance"' not in line]
    assert strip == [
        line for line in (tmp_path / "two.ndjson").read_bytes().splitlines() if b'"Provenance"' not in line
    ]
