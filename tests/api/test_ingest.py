"""``POST /fhir/$ingest?mapping=NAME``: map, validate and store source records, one transaction each."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapter.api import create_app
from adapter.api import ingest as ingest_module
from adapter.errors import InputError
from adapter.mapping.ids import deterministic_id, identity
from adapter.mapping.run import MappingPool
from adapter.mapping.sources import RawRecord
from adapter.search.query import parse_search
from adapter.store import Conflict, OperationResult, SQLiteStore
from bench.api import nhs_numbers
from tests.api.conftest import FHIR_JSON, patient

pytestmark = pytest.mark.anyio

CASES = Path(__file__).resolve().parents[2] / "mappings" / "sp-referral" / "cases"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


async def _ingest(client: httpx.AsyncClient, body: bytes, media: str = "text/csv", **params: str) -> httpx.Response:
    return await client.post(
        "/fhir/$ingest", params={"mapping": "sp-referral", **params}, content=body, headers={"Content-Type": media}
    )


async def _count(store: SQLiteStore, type: str, **criteria: str) -> int:
    result = await store.search(parse_search(type, [*criteria.items(), ("_count", "100")]))
    return result.total


async def test_ingest_stores_every_resource_of_a_record(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    response = await _ingest(client, (CASES / "basic" / "input.csv").read_bytes())
    assert response.status_code == 200, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "1 records, 1 stored, 0 rejected; 8 resources created" in outcome["issue"][0]["diagnostics"]
    patient_id = deterministic_id("Patient", identity(NHS, "9990000018"))
    stored = await store.read("Patient", patient_id)
    assert stored["name"][0]["family"] == "Carmody"
    referral = (await store.search(parse_search("ServiceRequest", [("subject", f"Patient/{patient_id}")]))).resources
    assert len(referral) == 1
    assert referral[0]["requester"]["reference"].startswith("PractitionerRole/")
    task = (await store.search(parse_search("Task", [("focus", f"ServiceRequest/{referral[0]['id']}")]))).resources
    assert len(task) == 1 and task[0]["for"]["reference"] == f"Patient/{patient_id}"
    provenance = (await store.search(parse_search("Provenance", [("target", f"Patient/{patient_id}")]))).resources
    assert len(provenance) == 1


async def test_ingesting_the_same_records_again_changes_nothing(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    body = (CASES / "awkward" / "input.csv").read_bytes()
    first = await _ingest(client, body)
    history = await store.history()
    second = await _ingest(client, body)
    assert first.status_code == second.status_code == 200
    assert "0 resources created" in second.json()["issue"][0]["diagnostics"]
    assert len(await store.history()) == len(history)
    # A person referred twice is one Patient; a duplicated row is one referral.
    assert await _count(store, "Patient", identifier=f"{NHS}|9990000026") == 1
    assert await _count(store, "ServiceRequest") == 3


async def test_rejected_records_are_listed_with_their_field(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    response = await _ingest(client, (CASES / "awkward" / "input.csv").read_bytes())
    issues = response.json()["issue"]
    errors = {issue["expression"][0]: issue["diagnostics"] for issue in issues if issue["severity"] == "error"}
    assert set(errors) == {"record[5].nhs_number", "record[6].birth_date", "record[7].reasons"}
    assert "Modulus 11" in errors["record[5].nhs_number"]
    unused = [issue for issue in issues if issue["expression"] == ["record.Shoe size"]]
    assert unused and "not used" in unused[0]["diagnostics"]
    assert await _count(store, "Patient", identifier=f"{NHS}|9990000042") == 0


async def test_a_record_the_store_refuses_leaves_nothing_of_it(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    # Two patients already share the NHS number: the conditional create of the record's Patient
    # matches both (412), so none of that record may be stored, and the other records still are.
    for _ in range(2):
        await client.post("/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON})
    rows = (CASES / "basic" / "input.csv").read_text().splitlines()
    other = rows[1].replace("REF-0001", "REF-0009").replace("999 000 0018", "9990000026")
    response = await _ingest(client, "\n".join([rows[0], rows[1], other]).encode())
    errors = [issue for issue in response.json()["issue"] if issue["severity"] == "error"]
    assert [issue["expression"] for issue in errors] == [["record[1]"]]
    assert "not stored" in errors[0]["diagnostics"]
    assert (
        await _count(store, "ServiceRequest", identifier="https://sp-fhir-adapter.org/fhir/Id/referral-id|REF-0001")
        == 0
    )
    assert await _count(store, "Consent") == 1
    assert (
        await _count(store, "ServiceRequest", identifier="https://sp-fhir-adapter.org/fhir/Id/referral-id|REF-0009")
        == 1
    )


async def test_records_are_stored_one_by_one_when_the_shared_commit_is_refused(
    client: httpx.AsyncClient, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(groups: Any) -> Any:
        raise Conflict("the store is locked by another writer")

    monkeypatch.setattr(store, "transactions", refused)
    rows = (CASES / "basic" / "input.csv").read_text().splitlines()
    other = rows[1].replace("REF-0001", "REF-0009").replace("999 000 0018", "9990000026")
    response = await _ingest(client, "\n".join([rows[0], rows[1], other]).encode())
    assert response.status_code == 200, response.text
    assert "2 records, 2 stored, 0 rejected" in response.json()["issue"][0]["diagnostics"]
    assert await _count(store, "ServiceRequest") == 2
    assert await _count(store, "Patient", identifier=f"{NHS}|9990000026") == 1


async def test_xml_and_json_sources(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    xml = await _ingest(client, (CASES / "xml" / "input.xml").read_bytes(), "application/xml")
    json = await _ingest(client, (CASES / "json" / "input.json").read_bytes(), "application/json")
    assert xml.status_code == json.status_code == 200
    assert await _count(store, "ServiceRequest") == 2


@pytest.mark.parametrize(
    ("params", "body", "expression"),
    [
        ({"mapping": "no-such-mapping"}, b"a,b\n", "mapping"),
        ({"mapping": "message-back-to-gp"}, b"{}", "mapping"),
        ({"format": "yaml"}, b"a,b\n", "format"),
        ({}, b"  ", "record"),
    ],
)
async def test_bad_requests_are_400_with_an_expression(
    client: httpx.AsyncClient, params: dict[str, str], body: bytes, expression: str
) -> None:
    response = await _ingest(client, body, **params)
    assert response.status_code == 400, response.text
    issue = response.json()["issue"][0]
    assert issue["expression"] == [expression]


async def test_a_csv_that_names_no_field_is_400(client: httpx.AsyncClient) -> None:
    response = await _ingest(client, b"colour,size\nblue,6\n")
    assert response.status_code == 400
    assert "header" in response.json()["issue"][0]["expression"][0]


async def test_a_gp_connect_record_is_ingested_as_r4(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    record = CASES.parent.parent / "gpconnect-structured" / "cases" / "full" / "input.json"
    response = await client.post(
        "/fhir/$ingest",
        params={"mapping": "gpconnect-structured"},
        content=record.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert not [issue for issue in response.json()["issue"] if issue["severity"] == "error"]
    patient_id = deterministic_id("Patient", identity(NHS, "9990000018"))
    conditions = (await store.search(parse_search("Condition", [("subject", f"Patient/{patient_id}")]))).resources
    assert len(conditions) == 2
    assert {c["clinicalStatus"]["coding"][0]["code"] for c in conditions} == {"active", "resolved"}


async def test_the_provenance_targets_what_was_stored_even_when_it_matched(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    created = await client.post(
        "/fhir/Patient",
        json=patient(identifier=[{"system": NHS, "value": "9990000018"}]),
        headers={"Content-Type": FHIR_JSON},
    )
    existing = created.json()["id"]
    await _ingest(client, (CASES / "basic" / "input.csv").read_bytes())
    [provenance] = (await store.search(parse_search("Provenance", []))).resources
    targets = {target["reference"] for target in provenance["target"]}
    assert f"Patient/{existing}" in targets
    for reference in targets:
        type, id = reference.split("/")
        await store.read(type, id)  # every target exists


async def test_a_source_unreadable_half_way_stores_nothing(client: httpx.AsyncClient, store: SQLiteStore) -> None:
    # More records than are mapped and stored at a time before the broken line.
    rows = [
        f'{{"assessment_id": "A{n}", "nhs_number": "9990000018", "tool": "PAM", "date": "17/01/2024", "total": "2"}}'
        for n in range(100)
    ]
    response = await client.post(
        "/fhir/$ingest",
        params={"mapping": "sp-outcomes"},
        content="\n".join([*rows, '{"assessment_id": "broken']).encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["expression"] == ["record[101]"]
    assert await _count(store, "Observation") == 0
    good = await client.post(
        "/fhir/$ingest",
        params={"mapping": "sp-outcomes"},
        content="\n".join(rows).encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert good.status_code == 200 and await _count(store, "Observation") == 100


async def test_rejections_beyond_the_listed_ones_are_counted(
    client: httpx.AsyncClient, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setattr(sys.modules["adapter.mapping.run"], "MAX_REJECTIONS", 2)
    rows = (CASES / "awkward" / "input.csv").read_bytes()  # 3 bad rows
    issues = (await _ingest(client, rows)).json()["issue"]
    errors = [issue["diagnostics"] for issue in issues if issue["severity"] == "error"]
    assert len(errors) == 3 and errors[-1] == "1 more rejected records are not listed"


# -- mapping in worker processes (#5) -----------------------------------------------------------


@pytest.fixture(scope="module")
def mapping_pool() -> Iterator[MappingPool]:
    """One worker process for the module's tests: starting one takes about a second."""
    pool = MappingPool(1, nice=10)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks, store windows, summary batches and the in-process limit cut small, so that a few
    hundred records cross several of each."""
    monkeypatch.setattr(ingest_module, "_CHUNK", 16)
    monkeypatch.setattr(ingest_module, "_WINDOW", 24)
    monkeypatch.setattr(ingest_module, "_LEAST", 12)
    monkeypatch.setattr(ingest_module, "_BACKLOG", 48)
    monkeypatch.setattr(ingest_module, "_BATCH", 50)
    monkeypatch.setattr(ingest_module, "_IN_PROCESS_BELOW", 32)


def _awkward_referrals(count: int) -> bytes:
    """``count`` referrals with what the answer reports: rejected rows (bad date, unknown reason),
    an unused column, people referred again with another postcode (differences), and a person
    whose NHS number two stored Patients share (refused by the store)."""
    rows = (CASES / "awkward" / "input.csv").read_text().splitlines()
    numbers = list(itertools.islice(nhs_numbers(), 40))
    lines = [rows[0]]
    for n in range(count):
        cells = rows[1].split(",")
        cells[0], cells[1] = f"REF-{n:05d}", numbers[n % len(numbers)]
        cells[6] = "ZZ99 3AB" if n % 3 else "ZZ99 3AD"
        if n % 17 == 5:
            cells[4] = "31/02/1980"
        if n % 23 == 7:
            cells[11] = "Knitting"
        if n % 29 == 3:
            cells[1] = "9990000018"
        cells[13] = str(n % 5) if n % 4 == 0 else ""
        lines.append(",".join(cells))
    return "\n".join(lines).encode()


async def _ingest_into(app: FastAPI, store: SQLiteStore, body: bytes) -> tuple[list[dict[str, Any]], list[Any]]:
    """The answer's issues and what the store holds (but for what differs by time) after ``body``."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        # Two Patients with 9990000018: the store refuses the records of that person.
        created = [
            (await client.post("/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON})).json()["id"]
            for _ in range(2)
        ]
        response = await _ingest(client, body)
    assert response.status_code == 200, response.text
    contents = []
    for entry in await store.history():
        if entry.id in created:
            continue
        resource = dict(entry.resource or {})
        resource.pop("meta", None)
        resource.pop("recorded", None)  # when the Provenance was written
        contents.append((entry.type, entry.id, entry.version_id, resource))
    return response.json()["issue"], sorted(contents, key=lambda item: (item[0], item[1], item[2]))


async def _in_process_and_pooled(
    body: bytes, pool: MappingPool, monkeypatch: pytest.MonkeyPatch, *, only_the_worker: bool = True
) -> tuple[Any, Any]:
    """The issues and store contents after ingesting ``body`` mapped in this process, and with ``pool``."""
    alone, pooled = SQLiteStore(":memory:"), SQLiteStore(":memory:")
    try:
        expected = await _ingest_into(create_app(alone, max_body_bytes=1_000_000, ingest_processes=0), alone, body)
        if only_the_worker:

            def nowhere(*args: Any) -> Any:
                raise AssertionError("mapped in this process, not by the worker")

            monkeypatch.setattr(ingest_module, "_map_here", nowhere)
        found = await _ingest_into(create_app(pooled, max_body_bytes=1_000_000, mapping_pool=pool), pooled, body)
        return expected, found
    finally:
        await alone.close()
        await pooled.close()


async def test_the_worker_gives_the_answer_and_resources_mapping_here_gives(
    mapping_pool: MappingPool, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, found = await _in_process_and_pooled(_awkward_referrals(300), mapping_pool, monkeypatch)
    issues, contents = expected
    # The input has all that the answer reports, over several chunks and summary batches.
    assert "300 records" in issues[0]["diagnostics"]
    assert {issue["severity"] for issue in issues} == {"information", "error", "warning"}
    assert any("not stored" in issue["diagnostics"] for issue in issues)
    assert any(issue["expression"] == ["record.Shoe size"] for issue in issues)
    assert len(contents) > 300
    assert found == expected


async def test_a_small_request_is_mapped_in_this_process(
    mapping_pool: MappingPool, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[int] = []
    submit = mapping_pool.submit

    def counted(name: str, raws: Iterable[RawRecord]) -> Future[bytes]:
        submitted.append(1)
        return submit(name, raws)

    monkeypatch.setattr(mapping_pool, "submit", counted)
    expected, found = await _in_process_and_pooled(
        _awkward_referrals(31), mapping_pool, monkeypatch, only_the_worker=False
    )
    assert found == expected and not submitted


async def test_the_setting_turns_the_workers_off(monkeypatch: pytest.MonkeyPatch, store: SQLiteStore) -> None:
    from adapter.serve import build_app
    from adapter.settings import Settings

    monkeypatch.setenv("SPFHIR_INGEST_PROCESSES", "0")
    assert Settings().ingest_processes == 0
    app = build_app(Settings(database="sqlite://:memory:"))
    await app.state.services.store.close()
    assert app.state.services.mapping_pool is None
    assert create_app(store).state.services.mapping_pool is not None  # by default, one process
    # Workers could not map with a validator of the caller's: the app maps in this process.
    given = create_app(store, profile_validator=app.state.services.profile_validator)
    assert given.state.services.mapping_pool is None


def test_the_workers_stop_with_the_app() -> None:
    from fastapi.testclient import TestClient

    store = SQLiteStore(":memory:")
    app = create_app(store)
    pool = app.state.services.mapping_pool
    assert pool is not None
    with TestClient(app):
        assert pool.submit("sp-outcomes", []).result(timeout=60) is not None
        assert pool._executor is not None
        processes = list(pool._executor._processes.values())
    assert pool._executor is None and processes and not any(process.is_alive() for process in processes)
    asyncio.run(store.close())


class _Dying(MappingPool):
    """A pool whose worker is killed once ``after`` chunks were submitted."""

    def __init__(self, after: int) -> None:
        super().__init__(1)
        self.after = after
        self.submitted = 0

    def submit(self, name: str, raws: Iterable[RawRecord]) -> Future[bytes]:
        future = super().submit(name, raws)
        self.submitted += 1
        if self.submitted == self.after:
            future.result()  # the worker has started and mapped this chunk
            assert self._executor is not None
            for process in list(self._executor._processes.values()):
                os.kill(process.pid, signal.SIGKILL)
        return future


async def test_a_worker_killed_half_way_loses_nothing_and_stores_nothing_twice(
    small_chunks: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pool = _Dying(after=4)
    try:
        expected, found = await _in_process_and_pooled(
            _awkward_referrals(200), pool, monkeypatch, only_the_worker=False
        )
        assert pool.submitted >= 4
        assert "BrokenProcessPool" in caplog.text  # and the records it had not returned were mapped here
        assert found == expected
        # The broken pool was dropped: the next request starts a new worker.
        pool.after = 0
        assert pool.submit("sp-referral", []).result(timeout=60)
    finally:
        pool.close()


def test_a_late_discard_of_a_broken_pool_leaves_the_new_one_running() -> None:
    """Two requests learn that a worker died, each from its own futures: the first discards the
    broken pool and the next submit starts a new one; the second, learning late, names the broken
    pool and must not stop the new one (#5)."""
    pool = MappingPool(1)
    try:
        assert pool.submit("sp-outcomes", []).result(timeout=60) is not None
        broken = pool.executor
        assert broken is not None
        for process in list(broken._processes.values()):  # type: ignore[attr-defined]
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            pool.submit("sp-outcomes", []).result(timeout=60)
        pool.discard(broken)  # the first request (or submit itself, finding the pool broken)
        assert pool.executor is None
        working = pool.submit("sp-outcomes", [])  # another request starts a new pool
        fresh = pool.executor
        assert fresh is not None and fresh is not broken
        pool.discard(broken)  # the late one
        pool.discard(None)
        assert pool.executor is fresh
        assert working.result(timeout=60) is not None
        assert pool.submit("sp-outcomes", []).result(timeout=60) is not None and pool.executor is fresh
    finally:
        pool.close()


def _basic_records(start: int, count: int) -> list[Any]:
    from adapter.mapping.base import MappedResource
    from adapter.mapping.engine import MappedRecord

    return [
        MappedRecord(n, [MappedResource({"resourceType": "Basic", "id": f"b{n}"})]) for n in range(start, start + count)
    ]


class _SlowStore:
    """A store whose ``transactions`` take ``seconds`` each (its thread at work, the loop free),
    recording the size of each window and the records it was handed."""

    def __init__(self, seconds: float = 0.0, fail_at: int | None = None) -> None:
        self.seconds = seconds
        self.fail_at = fail_at
        self.windows: list[int] = []
        self.ids: list[str] = []
        self.busy = False

    async def transactions(self, groups: list[Any]) -> list[Any]:
        self.busy = True
        try:
            if self.fail_at is not None and len(self.windows) == self.fail_at:
                raise OSError("disk full")
            self.windows.append(len(groups))
            self.ids += [group[0].id for group in groups]
            await asyncio.sleep(self.seconds)
            return [[OperationResult("Basic", group[0].id, "1", True, group[0].resource)] for group in groups]
        finally:
            self.busy = False


def _storing(store: _SlowStore, monkeypatch: pytest.MonkeyPatch, window: int = 8, least: int = 4) -> Any:
    from adapter.mapping.run import Summary

    monkeypatch.setattr(ingest_module, "_WINDOW", window)
    monkeypatch.setattr(ingest_module, "_LEAST", least)
    monkeypatch.setattr(ingest_module, "_BACKLOG", 2 * window)
    return ingest_module._Storing(store, Summary("sp-referral", "test"))  # type: ignore[arg-type]


def test_storing_starts_with_the_first_chunk_then_waits_for_enough_until_the_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's first chunk is stored as soon as it comes (the store does not wait for a
    window's worth to be mapped); after that the store takes a window once _LEAST records are
    waiting; once fewer than a window are still to be mapped it takes whatever is waiting, so the
    request's tail (storing after the last chunk is mapped, with the worker idle) is one chunk."""
    store = _SlowStore()
    storing = _storing(store, monkeypatch)

    async def run() -> None:
        # 24 records in chunks of 3, each followed by a pause (the worker mapping the next chunk)
        # in which the store, which takes no time here, writes whatever it is ready to take.
        for start in range(0, 24, 3):
            await storing.take(_basic_records(start, 3), 24 - start - 3)
            await asyncio.sleep(0.01)
        await storing.finish()

    asyncio.run(run())
    # 3 at once; 3 waiting is under _LEAST (4), 6 is not; from 6 still to come (under a window of
    # 8) on, each chunk as it comes.
    assert store.windows == [3, 6, 6, 3, 3, 3]
    assert store.ids == [f"b{n}" for n in range(24)]
    assert storing.records == 24


def test_mapping_goes_on_while_a_window_is_stored_and_windows_grow_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """take() returns while the store writes (the worker gets its next chunks meanwhile); what
    comes in the meantime is stored next, a window of at most _WINDOW records at a time, in order."""
    store = _SlowStore(seconds=0.05)
    storing = _storing(store, monkeypatch)
    taken_while_busy = 0

    async def run() -> None:
        nonlocal taken_while_busy
        for start in range(0, 45, 3):
            await storing.take(_basic_records(start, 3), 45 - start - 3)
            taken_while_busy += store.busy
            await asyncio.sleep(0.01)
        await storing.finish()

    asyncio.run(run())
    assert store.windows[0] == 3
    assert max(store.windows) == 8 and all(size <= 8 for size in store.windows)
    assert store.ids == [f"b{n}" for n in range(45)]
    # Most chunks came while a window was being stored, and were taken without waiting for it.
    assert taken_while_busy >= 10
    assert storing.records == 45


def test_mapping_waits_for_the_store_once_the_backlog_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays bounded: with _BACKLOG records waiting, take() waits until the store takes some."""
    release = asyncio.Event()

    class Blocked(_SlowStore):
        async def transactions(self, groups: list[Any]) -> list[Any]:
            await release.wait()
            return await super().transactions(groups)

    store = Blocked()
    storing = _storing(store, monkeypatch)  # a backlog of 16

    async def run() -> None:
        await storing.take(_basic_records(0, 3), 100)  # the first window: the store is now blocked
        await asyncio.sleep(0.01)
        for start in range(3, 18, 3):  # 15 waiting: under the backlog
            await asyncio.wait_for(storing.take(_basic_records(start, 3), 100), 1)
        blocked = asyncio.ensure_future(storing.take(_basic_records(18, 3), 100))  # 18 waiting
        await asyncio.sleep(0.05)
        assert not blocked.done()
        release.set()
        await asyncio.wait_for(blocked, 1)
        await storing.finish()

    asyncio.run(run())
    assert store.ids == [f"b{n}" for n in range(21)]


def test_a_store_failure_reaches_the_request_and_nothing_after_it_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's error (not a refusal of records: the disk, say) ends the request with it; the
    windows before it count, nothing waiting is written after it."""
    store = _SlowStore(fail_at=1)
    storing = _storing(store, monkeypatch)

    async def run() -> None:
        try:
            for start in range(0, 24, 3):
                await storing.take(_basic_records(start, 3), 24 - start - 3)
                await asyncio.sleep(0.01)
            await storing.finish()
        finally:
            await storing.settle()

    with pytest.raises(OSError, match="disk full"):
        asyncio.run(run())
    assert store.windows == [3]
    assert storing.records == 3


def test_settling_a_failed_request_finishes_the_window_being_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the way out of a failed request, the window the store has started is finished, not
    abandoned (its records are counted and go into the Provenance); records still waiting are not
    stored."""
    store = _SlowStore(seconds=0.05)
    storing = _storing(store, monkeypatch)

    async def run() -> None:
        await storing.take(_basic_records(0, 3), 100)
        await asyncio.sleep(0.01)  # the store has taken the first chunk
        await storing.take(_basic_records(3, 6), 100)
        await storing.settle()

    asyncio.run(run())
    assert store.windows == [3]
    assert storing.records == storing.created == 3
    assert [item.resource["id"] for item in storing.stored] == ["b0", "b1", "b2"]


def test_a_window_is_prepared_while_the_one_before_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operations of the next window are made while the store writes the window before, and
    the windows are still stored one after the other, in order."""
    from adapter.mapping.base import MappedResource
    from adapter.mapping.engine import MappedRecord
    from adapter.mapping.run import Summary

    monkeypatch.setattr(ingest_module, "_WINDOW", 2)
    monkeypatch.setattr(ingest_module, "_LEAST", 2)
    events: list[str] = []
    prepare = ingest_module._prepared

    def prepared(record: MappedRecord) -> Any:
        events.append(f"prepare {record.number}")
        return prepare(record)

    monkeypatch.setattr(ingest_module, "_prepared", prepared)

    class Store:
        async def transactions(self, groups: list[Any]) -> list[Any]:
            first = groups[0][0].id
            events.append(f"store {first}")
            await asyncio.sleep(0.05)  # the store's thread at work; the event loop is free
            events.append(f"stored {first}")
            return [[] for _ in groups]

    storing = ingest_module._Storing(Store(), Summary("sp-referral", "test"))  # type: ignore[arg-type]
    records = [MappedRecord(n, [MappedResource({"resourceType": "Basic", "id": f"b{n}"})]) for n in range(4)]

    async def run() -> None:
        await storing.take(records[:2], 2)
        await asyncio.sleep(0.01)  # waiting for the worker's next chunk
        await storing.take(records[2:], 0)
        await storing.finish()

    asyncio.run(run())
    assert events == [
        "prepare 0",
        "prepare 1",
        "store b0",
        "prepare 2",
        "prepare 3",
        "stored b0",
        "store b2",
        "stored b2",
    ]
    assert storing.records == 4


async def test_a_record_whose_condition_cannot_be_made_is_refused_alone(
    client: httpx.AsyncClient, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    operations = ingest_module._operations

    def failing(record: Any) -> Any:
        if record.number == 1:
            raise InputError("ifNoneExist: not a search", expression="ifNoneExist")
        return operations(record)

    monkeypatch.setattr(ingest_module, "_operations", failing)
    one_by_one: list[Any] = []
    transaction = store.transaction

    async def alone(operations: Any) -> Any:
        one_by_one.append(operations)
        return await transaction(operations)

    monkeypatch.setattr(store, "transaction", alone)
    rows = (CASES / "basic" / "input.csv").read_text().splitlines()
    other = rows[1].replace("REF-0001", "REF-0009").replace("999 000 0018", "9990000026")
    response = await _ingest(client, "\n".join([rows[0], rows[1], other]).encode())
    errors = [issue for issue in response.json()["issue"] if issue["severity"] == "error"]
    assert [(issue["expression"], issue["diagnostics"]) for issue in errors] == [
        (["record[1]"], "not stored: ifNoneExist: not a search")
    ]
    assert await _count(store, "ServiceRequest") == 1
    # The other record went with the window, not to a transaction of its own (only the run's
    # Provenance is written by store.transaction).
    assert [operations[0].type for operations in one_by_one] == ["Provenance"]
