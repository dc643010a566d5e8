"""``spfhir serve`` end to end: a real uvicorn process over SQLite with the demo data set."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapter.serve import app_factory

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
FHIR_JSON = "application/fhir+json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spfhir(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "from adapter.cli import main; main()", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until_up(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{base}/metadata", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the server did not answer /fhir/metadata within {START_TIMEOUT} s: {log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM; uvicorn shuts down gracefully and then re-raises the signal, so the code is 0 or -SIGTERM."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("the server did not exit on SIGTERM")
    return process.returncode


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    port = free_port()
    log = tmp_path / "server.log"
    process = spfhir(
        "serve", "--database", f"sqlite:///{tmp_path}/db", "--host", "127.0.0.1", "--port", str(port), "--demo", log=log
    )
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        wait_until_up(process, base, log)
        yield base, process, log
    finally:
        stop(process)


def test_serve_with_demo_data(server: tuple[str, subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    base, process, log = server
    with httpx.Client(base_url=base, timeout=10.0, headers={"Accept": FHIR_JSON}) as client:
        metadata = client.get("/metadata").json()
        assert metadata["resourceType"] == "CapabilityStatement"
        assert metadata["fhirVersion"] == "4.0.1"

        patient = client.get("/Patient/demo-patient-1")
        assert patient.status_code == 200
        assert patient.headers["ETag"] == 'W/"1"'
        body = patient.json()
        assert body["identifier"][0] == {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}
        assert body["meta"]["versionId"] == "1"
        assert client.get("/CarePlan/demo-careplan-1").status_code == 200

        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "718426000"}]},
            "subject": {"reference": "Patient/demo-patient-2"},
            "effectiveDateTime": "2026-05-01T10:00:00Z",
            "valueInteger": 47,
        }
        created = client.post("/Observation", json=observation, headers={"Content-Type": FHIR_JSON})
        assert created.status_code == 201, created.text
        assert created.headers["ETag"] == 'W/"1"'
        location = created.headers["Location"]
        new_id = created.json()["id"]
        assert location.endswith(f"/Observation/{new_id}/_history/1")
        assert "/fhir/Observation/" in location

        read_back = client.get(f"/Observation/{new_id}")
        assert read_back.status_code == 200
        assert read_back.headers["ETag"] == 'W/"1"'
        assert read_back.json()["valueInteger"] == 47
        assert read_back.json()["subject"] == {"reference": "Patient/demo-patient-2"}

        invalid = client.post(
            "/Observation", json={**observation, "status": "done"}, headers={"Content-Type": FHIR_JSON}
        )
        assert invalid.status_code in (400, 422)
        assert invalid.json()["resourceType"] == "OperationOutcome"

    assert stop(process) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log.read_text()
    assert '"GET /fhir' not in log.read_text()  # no access log by default (SPFHIR_ACCESS_LOG)

    # A restart with --demo again leaves the demo resources at version 1 (idempotent loading).
    port = free_port()
    log = tmp_path / "restart.log"
    again = spfhir("serve", "--database", f"sqlite:///{tmp_path}/db", "--port", str(port), "--demo", log=log)
    try:
        base = f"http://127.0.0.1:{port}/fhir"
        wait_until_up(again, base, log)
        history = httpx.get(f"{base}/Patient/demo-patient-1/_history", timeout=10.0).json()
        assert history["resourceType"] == "Bundle"
        assert len(history["entry"]) == 1
        assert httpx.get(f"{base}/Observation/{new_id}", timeout=10.0).status_code == 200  # kept in the file
    finally:
        assert stop(again) in (0, -signal.SIGTERM)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from adapter.cli import main; main()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ("mysql://localhost/fhir", "unsupported database URL"),
        ("sqlite:relative.db", "unsupported database URL"),
        ("sqlite:///no/such/folder/db", "cannot open SQLite database"),
    ],
)
def test_bad_database_is_one_line_and_exit_2(database: str, message: str) -> None:
    result = run_cli("serve", "--database", database, "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--database", f"sqlite:///{tmp_path}/db", "--port", str(port))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_memory_database_cannot_be_shared_by_workers() -> None:
    result = run_cli("serve", "--database", "sqlite://:memory:", "--workers", "2", "--port", str(free_port()))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "--workers 1" in result.stderr


def test_app_factory_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPFHIR_DATABASE", "sqlite://:memory:")
    monkeypatch.setenv("SPFHIR_DEMO", "true")
    monkeypatch.setenv("SPFHIR_MAX_BODY_BYTES", "2000")
    import gc

    threshold = gc.get_threshold()
    with TestClient(app_factory()) as client:  # the lifespan loads the demo data into the memory store
        # Start-up moved the loaded model out of the collector's way (gc.freeze).
        assert gc.get_freeze_count() > 0
        response = client.get("/fhir/Patient/demo-patient-3")
        assert response.status_code == 200
        assert response.json()["identifier"][0]["value"] == "9990000034"
        big = {"resourceType": "Basic", "code": {"text": "x" * 5000}}
        too_big = client.post("/fhir/Basic", json=big, headers={"Content-Type": FHIR_JSON})
        assert too_big.status_code == 413
    gc.unfreeze()  # leave the test process as it was
    gc.set_threshold(*threshold)


def test_an_independent_fhir_client(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    """fhirpy (a FHIR client from PyPI, not ours) reads, creates, reads back and updates."""
    fhirpy = pytest.importorskip("fhirpy")
    base, _process, _log = server
    client = fhirpy.SyncFHIRClient(base)

    patient = client.reference("Patient", "demo-patient-2").to_resource()
    assert patient["identifier"][0]["value"] == "9990000026"
    assert patient["meta"]["versionId"] == "1"

    observation = client.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://snomed.info/sct", "code": "718426000"}]},
        subject={"reference": "Patient/demo-patient-2"},
        valueInteger=50,
    )
    observation.save()  # POST
    assert observation["meta"]["versionId"] == "1"
    read_back = client.reference("Observation", observation["id"]).to_resource()
    assert read_back["valueInteger"] == 50

    observation["valueInteger"] = 52
    observation.save()  # PUT
    assert observation["meta"]["versionId"] == "2"
    assert client.reference("Observation", observation["id"]).to_resource()["valueInteger"] == 52

    # Search as a client does it: a person's referrals by NHS number in one call, and paging.
    referrals = (
        client.resources("ServiceRequest")
        .search(**{"patient.identifier": "https://fhir.nhs.uk/Id/nhs-number|9990000018"})
        .fetch_all()
    )
    assert referrals and all(r["subject"]["reference"] == "Patient/demo-patient-1" for r in referrals)
    patients = client.resources("Patient").limit(1).fetch_all()  # follows the next links
    assert sorted(p["id"] for p in patients) == ["demo-patient-1", "demo-patient-2", "demo-patient-3"]
    assert client.resources("Observation").search(patient="demo-patient-1").count() == 2  # WEMWBS 38 and 51
    assert client.resources("Observation").search(patient="demo-patient-2").count() == 1  # the one made above


def test_the_listening_socket_is_tcp_so_keep_alive_requests_do_not_stall() -> None:
    """asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP; without it every
    keep-alive request after the first waits for the client's delayed ACK (~40 ms)."""
    import socket as sockets

    from adapter.serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == sockets.IPPROTO_TCP and sock.type == sockets.SOCK_STREAM
    finally:
        sock.close()
