"""HTTP load benchmark of the FHIR REST API (``spfhir serve``), and of sekmet-fhir with the same load.

Run from the project root after ``scripts/setup`` (and ``scripts/install-postgres`` for PostgreSQL):

    .venv/bin/python -m bench.api                   # every configuration and scenario, about 5 minutes
    .venv/bin/python -m bench.api --markdown        # the same, printed as the docs/benchmarks.md table
    .venv/bin/python -m bench.api --store sqlite --workers 1 --no-sekmet --scenarios read,create --seconds 3

Configurations: our server on SQLite and on PostgreSQL with 1 and 2 uvicorn workers, and sekmet-fhir
(:mod:`bench.sekmet`: installed into its own virtualenv, ``.cache/sekmet-venv``, on first use). Each
server is a separate process started fresh on 127.0.0.1 with an empty database in a temp dir (one
throwaway PostgreSQL cluster, ``tests/store/pg_server.py``, with a new database per configuration),
and is stopped at the end, also on Ctrl-C or an error.

Each server is first seeded through its API (``--patients`` Patients with a 999-range NHS number, each
with ``--per-patient`` ServiceRequests). Then, for each scenario and number of concurrent clients:
``--warmup`` seconds unmeasured, then ``--seconds`` seconds measured, by asyncio + httpx in this process
for one client and in ``--processes`` generator processes (default 2, the clients split between them,
all starting at the same moment) for more. Each client is an ``httpx.AsyncClient`` with one keep-alive
connection and sends its next request as soon as the previous one is answered. Reported: successful
requests per second, p50 and p99 latency (ms, of successful requests), errors (any non-2xx answer or
transport error; the first one is shown), and the share of one core the load generator itself used.

The load generator is not free, and it shares the machine's two cores with the server. With httpx's
default transport (httpcore, h11, anyio) a request cost it about 0.5-0.6 ms of CPU, more than a read
costs our server, so at 16 clients it took about 1.4 of the 2 cores and the figures measured it as much
as the servers. It now runs httpx over :class:`bench._http.LeanTransport` (one keep-alive connection
per client, llhttp's parser from ``httptools``) on uvloop: about 0.2 ms per request, the same
``httpx.AsyncClient`` API and the same requests for every server. ``--transport httpcore`` measures
with httpx's default transport instead. The run first measures the generator's ceiling (the same
generator against a trivial HTTP server in another process) and prints it with the results; each cell
shows the generator's CPU share, and the server's CPU time per request (its process group, from
``/proc``; PostgreSQL's own processes are not counted), which other work on the machine disturbs much
less than the rates. One ``AsyncClient`` per client rather than one shared pool (httpcore's pool looks
at every connection on every request: 16 clients through one pool get about 40 % of the rate), and
``sniffio`` recorded as absent (see :data:`_SNIFFIO`), keep the httpcore transport as fast as it goes.

Scenarios:

- ``read``: ``GET Patient/<id>`` of a random seeded Patient;
- ``create``: ``POST Patient`` of a new Patient;
- ``search-patient``: ``GET ServiceRequest?patient=Patient/<id>``;
- ``search-nhs``: ``GET ServiceRequest?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|<nhs>``
  (a chained search);
- ``transaction``: ``POST [base]`` of a 1,000-entry transaction Bundle (250 Patients, 750
  ServiceRequests referring to them by ``urn:uuid:``), one request at a time, ``--transaction-runs``
  times; reported as the median seconds.

Before a scenario is measured one request checks the answer (status, and for searches that exactly
the seeded ServiceRequests of the patient come back). A scenario that fails that check is reported as
an error for our server, and as "unsupported" with the HTTP status for sekmet-fhir. The ratio column
is our best configuration against sekmet-fhir (throughput, or transaction time). The machine should
be otherwise idle: the run warns when the load average is above 0.5 at the start.

``--spfhir`` runs another build of our server, e.g. a patched tree exported with ``git archive``:
``--spfhir "env PYTHONPATH=/tmp/tree $PWD/.venv/bin/spfhir"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

import httpx
import orjson
from nhs_number.validate import calculate_checksum

from bench import sekmet
from bench._http import LeanTransport

try:
    import uvloop
except ImportError:  # the bench runs without it, on asyncio's own loop
    uvloop = None  # type: ignore[assignment]

#: httpcore (under httpx) tries ``import sniffio`` on every request; anyio 4 no longer installs sniffio,
#: and a failed import searches the whole of sys.path each time (about a third of the generator's CPU).
#: Recording it as absent makes the import fail at once, and httpcore then assumes asyncio, as it should.
_SNIFFIO = importlib.util.find_spec("sniffio") is not None
if not _SNIFFIO:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SPFHIR = ROOT / ".venv" / "bin" / "spfhir"

FHIR_JSON = "application/fhir+json"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

LOAD_SCENARIOS = ("read", "search-patient", "search-nhs", "create")
SCENARIOS = (*LOAD_SCENARIOS, "transaction")

#: Targets from the issue, checked at the highest concurrency measured (16 by default).
TARGET_RPS = {"read": 1500.0, "create": 500.0, "search-patient": 300.0, "search-nhs": 300.0}
TARGET_P99_MS = 50.0
TARGET_TRANSACTION_S = 2.0
TARGET_RATIO = 2.0


# -- test data -------------------------------------------------------------------------------------


def nhs_check_digit(nine_digits: str) -> int | None:
    """The NHS number Modulus 11 check digit of the first nine digits; None when no number can end them."""
    check = calculate_checksum(nine_digits)  # 10 is never a valid check digit
    return None if check is None or check == 10 else check


def nhs_numbers(start: int = 1) -> Iterator[str]:
    """Valid NHS numbers of the 999 test range from serial ``start`` on: 9990000018, 9990000026, ..."""
    for serial in range(start, 10**6):
        nine = f"999{serial:06d}"
        check = nhs_check_digit(nine)
        if check is not None:
            yield f"{nine}{check}"


def patient(nhs: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": NHS_SYSTEM, "value": nhs}],
        "name": [{"family": "Bench", "given": ["Test"]}],
        "gender": "unknown",
        "birthDate": "1970-01-01",
    }


def service_request(subject: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"text": "Social prescribing referral"},
        "subject": {"reference": subject},
    }


def transaction_bundle(size: int, numbers: Iterator[str]) -> dict[str, Any]:
    """A transaction of ``size`` POST entries: a quarter Patients, the rest ServiceRequests for them."""
    patients = max(1, size // 4)
    entries: list[dict[str, Any]] = []
    urns = [f"urn:uuid:{uuid.uuid4()}" for _ in range(patients)]
    for urn in urns:
        entries.append(
            {"fullUrl": urn, "resource": patient(next(numbers)), "request": {"method": "POST", "url": "Patient"}}
        )
    for i in range(size - patients):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": service_request(urns[i % patients]),
                "request": {"method": "POST", "url": "ServiceRequest"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass
class Seeded:
    """What the load scenarios pick from: seeded Patients as (id, NHS number), and the numbers left."""

    patients: list[tuple[str, str]]
    per_patient: int
    numbers: Iterator[str]


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Measurement:
    rate: float  # successful requests per second
    p50_ms: float
    p99_ms: float
    ok: int
    errors: int
    first_error: str | None
    client_cpu: float  # share of one core used by the generator process(es) while measuring
    #: CPU time the server's processes used per successful request while measuring (µs); None when not
    #: known. Less sensitive than the rates to other work on the machine.
    server_us: float | None = None
    latencies: list[float] = field(default_factory=list, repr=False)


@dataclass
class TransactionTiming:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Failed:
    reason: str
    unsupported: bool = False


Outcome = Measurement | TransactionTiming | Failed

#: A cell of the report: (scenario, concurrency); the transaction has concurrency 1.
Cell = tuple[str, int]


class ScenarioFailed(Exception):
    """A scenario's check request got a wrong answer; the message says what came back."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


def describe(response: httpx.Response) -> str:
    excerpt = " ".join(response.text[:160].split())
    return f"HTTP {response.status_code}: {excerpt}"


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


#: base URL -> process group of the server answering there (each server runs in a session of its own).
SERVER_GROUPS: dict[str, int] = {}


def group_cpu_seconds(base: str) -> float | None:
    """User + system CPU seconds of the live processes in the process group of the server at ``base``
    (uvicorn's worker processes included; not PostgreSQL's backends, which run in their own group)."""
    group = SERVER_GROUPS.get(base)
    if group is None or not Path("/proc/self/stat").exists():
        return None
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the command (which may hold spaces) in parentheses: pgrp is the 3rd, utime and
            # stime the 12th and 13th (proc(5)).
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_us(base: str, before: float | None, measurement: Measurement) -> None:
    """Fill ``measurement.server_us`` from the server's CPU seconds ``before`` the measured load and now."""
    after = group_cpu_seconds(base)
    if before is not None and after is not None and measurement.ok:
        measurement.server_us = (after - before) / measurement.ok * 1e6


def clean_environment() -> dict[str, str]:
    """Our environment without settings for either server (``SPFHIR_*``, ``SEKMET_*``)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SPFHIR_", "SEKMET_"))}


class ServerProcess:
    """A server run as a child process in its own session, its output in ``log``.

    :meth:`stop` sends SIGTERM to the child's process group (uvicorn's worker processes included),
    waits, then SIGKILL.
    """

    def __init__(self, argv: list[str], cwd: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=clean_environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def last_log_line(self) -> str:
        """The last line the server wrote (for a crash: the exception), or "no output"."""
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return lines[-1].strip() if lines else "no output"

    def wait_ready(self, base_url: str, timeout: float = 90.0) -> None:
        """Poll ``[base]/metadata`` until it answers 200; RuntimeError if the process exits or times out."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"exited with code {self.process.returncode}: {self.last_log_line()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{base_url}/metadata").status_code == 200:
                        return
                time.sleep(0.2)
        raise RuntimeError(f"no answer from {base_url}/metadata in {timeout:.0f} s: {self.last_log_line()}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait)
                return


#: A server that answers every request with ``{}`` at once (an asyncio Protocol on uvloop, so that it
#: costs less than the generator): what the generator can do.
TRIVIAL_SERVER = """
import asyncio, sys
ANSWER = b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 2\\r\\n\\r\\n{}"
class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        requests = self.buffer.count(b"\\r\\n\\r\\n")  # the ceiling sends GETs only: no bodies
        if requests:
            self.buffer = self.buffer[self.buffer.rindex(b"\\r\\n\\r\\n") + 4 :]
            self.transport.write(ANSWER * requests)
async def main():
    server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
try:
    import uvloop
except ImportError:
    uvloop = None
(uvloop.run if uvloop else asyncio.run)(main())
"""


@dataclass(frozen=True)
class Target:
    """One server configuration measured."""

    kind: Literal["spfhir", "sekmet", "trivial"]
    store: str  # sqlite | postgres
    workers: int
    label: str


class Postgres:
    """One throwaway PostgreSQL cluster for the run, started on first use, one database per target."""

    def __init__(self) -> None:
        self._server: Any = None
        self._error: str | None = None
        self._databases = 0

    def new_database(self) -> str:
        """The URL of a new empty database; RuntimeError when no cluster can be started here."""
        if self._server is None and self._error is None:
            from tests.store import pg_server  # the tests' helper: initdb + pg_ctl on a free port

            try:
                # PostgreSQL's durable defaults (fsync, a WAL flush per commit), as in production.
                self._server = pg_server.start(durable=True)
            except pg_server.Unavailable as exc:
                self._error = str(exc)
        if self._error is not None:
            raise RuntimeError(f"PostgreSQL unavailable: {self._error}")
        import psycopg

        self._databases += 1
        name = f"bench_{self._databases}"
        with psycopg.connect(self._server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self._server.port}/{name}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@contextlib.contextmanager
def running(target: Target, postgres: Postgres, spfhir: list[str] | None = None) -> Iterator[str]:
    """Start ``target`` on a free port with an empty database; yields its FHIR base URL; stops it.

    ``spfhir`` is the command that runs our CLI (default ``.venv/bin/spfhir``).
    """
    folder = Path(tempfile.mkdtemp(prefix=f"bench-api-{target.kind}-"))
    server: ServerProcess | None = None
    try:
        port = free_port()
        if target.kind == "sekmet":
            argv = sekmet.command(sekmet.write_config(folder, port))
            base = f"http://127.0.0.1:{port}{sekmet.BASE_PATH}"
        elif target.kind == "trivial":
            argv = [sys.executable, "-c", TRIVIAL_SERVER, str(port)]
            base = f"http://127.0.0.1:{port}"
        else:
            database = f"sqlite:///{folder / 'bench.db'}" if target.store == "sqlite" else postgres.new_database()
            argv = [*(spfhir or [str(SPFHIR)]), "serve", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--database", database]
            argv += ["--workers", str(target.workers)]
            base = f"http://127.0.0.1:{port}/fhir"
        server = ServerProcess(argv, folder, folder / "server.log")
        server.wait_ready(base)
        SERVER_GROUPS[base] = server.process.pid
        yield base
    finally:
        SERVER_GROUPS.pop(base, None)
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# -- load ------------------------------------------------------------------------------------------

#: A request to send: method, URL relative to the base, body.
Request = tuple[str, str, bytes | None]


#: The generator's httpx transport: "lean" (:class:`bench._http.LeanTransport`) or "httpcore" (httpx's
#: default); set from ``--transport`` before any client is made (generator processes are forked).
TRANSPORT = "lean"


def make_client(base: str, connections: int = 1, timeout: float = 60.0) -> httpx.AsyncClient:
    transport = LeanTransport() if TRANSPORT == "lean" and connections == 1 else None
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=base, limits=limits, timeout=timeout, headers={"Accept": FHIR_JSON}, transport=transport
    )


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the generator's event loop: uvloop when installed (less CPU per request), else asyncio's."""
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)


@contextlib.asynccontextmanager
async def clients_of(base: str, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` clients of one connection each (see the module docstring for why not one pool)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(make_client(base)) for _ in range(count)]


async def send(client: httpx.AsyncClient, request: Request) -> httpx.Response:
    method, url, body = request
    headers = {"Content-Type": FHIR_JSON} if body is not None else None
    return await client.request(method, url, content=body, headers=headers)


async def create(client: httpx.AsyncClient, resource: dict[str, Any]) -> str:
    """POST ``resource``; its new id (from the body, else the Location header)."""
    response = await send(client, ("POST", f"/{resource['resourceType']}", orjson.dumps(resource)))
    if response.status_code != 201:
        raise ScenarioFailed(f"create {resource['resourceType']}: {describe(response)}", response.status_code)
    with contextlib.suppress(ValueError, KeyError):
        return str(response.json()["id"])
    return response.headers["location"].split("/_history")[0].rsplit("/", 1)[-1]


async def seed(base: str, patients: int, per_patient: int) -> Seeded:
    """Create the Patients and their ServiceRequests through the API, 8 requests at a time."""
    numbers = nhs_numbers()
    gate = asyncio.Semaphore(8)
    async with make_client(base, 8) as client:

        async def one(resource: dict[str, Any]) -> str:
            async with gate:
                return await create(client, resource)

        wanted = [next(numbers) for _ in range(patients)]
        ids = await asyncio.gather(*(one(patient(nhs)) for nhs in wanted))
        requests = [service_request(f"Patient/{pid}") for pid in ids for _ in range(per_patient)]
        await asyncio.gather(*(one(resource) for resource in requests))
    return Seeded(list(zip(ids, wanted, strict=True)), per_patient, numbers)


def request_maker(scenario: str, data: Seeded, rng: random.Random) -> Callable[[], Request]:
    """A function giving the next request of ``scenario``."""
    if scenario == "read":
        return lambda: ("GET", f"/Patient/{rng.choice(data.patients)[0]}", None)
    if scenario == "create":
        return lambda: ("POST", "/Patient", orjson.dumps(patient(next(data.numbers))))
    if scenario == "search-patient":
        return lambda: (
            "GET",
            "/ServiceRequest?" + urlencode({"patient": f"Patient/{rng.choice(data.patients)[0]}"}),
            None,
        )
    if scenario == "search-nhs":
        key = "patient.identifier"
        return lambda: (
            "GET",
            "/ServiceRequest?" + urlencode({key: f"{NHS_SYSTEM}|{rng.choice(data.patients)[1]}"}),
            None,
        )
    raise ValueError(f"unknown scenario {scenario!r}")


async def check(client: httpx.AsyncClient, scenario: str, data: Seeded) -> None:
    """One request of ``scenario`` whose answer is checked; ScenarioFailed says what was wrong."""
    pid, nhs = data.patients[0]
    if scenario == "read":
        response = await send(client, ("GET", f"/Patient/{pid}", None))
        if response.status_code != 200 or response.json().get("id") != pid:
            raise ScenarioFailed(describe(response), response.status_code)
    elif scenario == "create":
        await create(client, patient(next(data.numbers)))
    elif scenario in ("search-patient", "search-nhs"):
        query = (
            {"patient": f"Patient/{pid}"}
            if scenario == "search-patient"
            else {"patient.identifier": f"{NHS_SYSTEM}|{nhs}"}
        )
        response = await send(client, ("GET", "/ServiceRequest?" + urlencode(query), None))
        if response.status_code != 200:
            raise ScenarioFailed(describe(response), response.status_code)
        bundle = response.json()
        subjects = [
            entry.get("resource", {}).get("subject", {}).get("reference", "")
            for entry in bundle.get("entry", [])
            if entry.get("resource", {}).get("resourceType") == "ServiceRequest"
        ]
        right = len(subjects) == data.per_patient and all(s.endswith(f"Patient/{pid}") for s in subjects)
        if bundle.get("type") != "searchset" or not right:
            raise ScenarioFailed(
                f"wrong answer: expected {data.per_patient} ServiceRequests of Patient/{pid}, got {len(subjects)} "
                f"in a {bundle.get('resourceType')} of type {bundle.get('type')!r}"
            )


async def load(
    clients: list[httpx.AsyncClient], make: Callable[[], Request], seconds: float, keep: bool = False
) -> Measurement:
    """Each client sends requests from ``make``, one after the other, for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    stop_at = time.perf_counter() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        nonlocal errors, first_error
        while time.perf_counter() < stop_at:
            request = make()
            started = time.perf_counter()
            try:
                response = await send(client, request)
                failure = None if 200 <= response.status_code < 300 else describe(response)
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - started
            if failure is None:
                latencies.append(elapsed)
            else:
                errors += 1
                first_error = first_error or failure

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(client) for client in clients))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    latencies.sort()
    ms = [x * 1000 for x in latencies] or [math.nan]
    return Measurement(
        rate=len(latencies) / wall,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        ok=len(latencies),
        errors=errors,
        first_error=first_error,
        client_cpu=cpu / wall,
        latencies=latencies if keep else [],
    )


def _spread_worker(
    base: str,
    scenario: str,
    patients: list[tuple[str, str]],
    serial: int,
    clients: int,
    warmup: float,
    seconds: float,
    start_at: float,
    seed: int,
) -> tuple[list[float], int, str | None, float]:
    """One generator process: ``clients`` clients, warm up, wait for ``start_at``, measure ``seconds``."""

    async def run() -> tuple[list[float], int, str | None, float]:
        data = Seeded(patients, 0, nhs_numbers(serial))
        rng = random.Random(seed)
        make = request_maker(scenario, data, rng) if scenario != "ceiling" else (lambda: ("GET", "/", None))
        async with clients_of(base, clients) as pool:
            if warmup > 0:
                await load(pool, make, warmup)
            await asyncio.sleep(max(0.0, start_at - time.time()))
            measured = await load(pool, make, seconds, keep=True)
        return measured.latencies, measured.errors, measured.first_error, measured.client_cpu

    return run_loop(run())


def load_spread(base: str, scenario: str, data: Seeded, clients: int, options: Options) -> Measurement:
    """The load of ``clients`` clients from ``options.processes`` generator processes at once: one
    httpx process tops out at about 1,400 requests/s here, below what the server can answer."""
    import concurrent.futures
    import multiprocessing

    processes = max(1, min(options.processes, clients))
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    start_at = time.time() + options.warmup + 1.5
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        futures = [
            pool.submit(
                _spread_worker,
                base,
                scenario,
                data.patients,
                600_000 + i * 50_000,
                share,
                options.warmup,
                options.seconds,
                start_at,
                i,
            )
            for i, share in enumerate(shares)
        ]
        # The server's CPU over the measured seconds, which the generator processes start at start_at.
        time.sleep(max(0.0, start_at - time.time()))
        before = group_cpu_seconds(base)
        time.sleep(options.seconds)
        after = group_cpu_seconds(base)
        results = [future.result() for future in futures]
    latencies = sorted(x for result in results for x in result[0])
    ms = [x * 1000 for x in latencies] or [math.nan]
    errors = sum(result[1] for result in results)
    return Measurement(
        rate=len(latencies) / options.seconds,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        ok=len(latencies),
        errors=errors,
        first_error=next((r[2] for r in results if r[2]), None),
        client_cpu=sum(result[3] for result in results),
        server_us=None if before is None or after is None or not latencies else (after - before) / len(latencies) * 1e6,
    )


async def time_transactions(base: str, data: Seeded, size: int, runs: int) -> TransactionTiming:
    """POST ``runs`` transactions of ``size`` entries one after the other; each answer is checked."""
    seconds: list[float] = []
    async with make_client(base, 1, timeout=600.0) as client:
        for _ in range(runs):
            body = orjson.dumps(transaction_bundle(size, data.numbers))
            started = time.perf_counter()
            response = await send(client, ("POST", base, body))  # [base] itself: httpx would add a "/"
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise ScenarioFailed(describe(response), response.status_code)
            answer = response.json()
            entries = answer.get("entry", [])
            created = sum(1 for e in entries if str(e.get("response", {}).get("status", "")).startswith("201"))
            if answer.get("type") != "transaction-response" or created != size:
                raise ScenarioFailed(
                    f"wrong answer: a {answer.get('type')!r} Bundle with {created} of {size} entries 201 Created"
                )
            seconds.append(elapsed)
    return TransactionTiming(seconds)


# -- one target ------------------------------------------------------------------------------------


@dataclass
class Options:
    scenarios: list[str]
    concurrency: list[int]
    seconds: float
    warmup: float
    patients: int
    per_patient: int
    transaction_size: int
    transaction_runs: int
    processes: int = 1


Report = Callable[[Target, Cell, Outcome], None]


def cells(options: Options) -> list[Cell]:
    out = [(s, c) for s in LOAD_SCENARIOS if s in options.scenarios for c in options.concurrency]
    return out + ([("transaction", 1)] if "transaction" in options.scenarios else [])


async def measure_target(target: Target, base: str, options: Options, report: Report) -> None:
    """Seed ``base`` then measure every selected cell; each result goes to ``report`` as it comes."""
    rng = random.Random(1)
    try:
        data = await seed(base, options.patients, options.per_patient)
    except (ScenarioFailed, httpx.HTTPError) as exc:
        for cell in cells(options):
            report(target, cell, Failed(f"seeding failed: {exc}"))
        return
    failed: dict[str, Failed] = {}

    def failure(exc: Exception) -> Failed:
        status = exc.status if isinstance(exc, ScenarioFailed) else None
        if target.kind == "sekmet" and status is not None and status >= 400:
            return Failed(f"unsupported (HTTP {status})", unsupported=True)
        return Failed(str(exc) if isinstance(exc, ScenarioFailed) else f"{type(exc).__name__}: {exc}")

    for scenario, clients in cells(options):
        outcome: Outcome
        if scenario in failed:
            outcome = failed[scenario]
        elif scenario == "transaction":
            try:
                outcome = await time_transactions(base, data, options.transaction_size, options.transaction_runs)
            except Exception as exc:  # any failure (bad JSON, missing keys, ...) is this cell's result
                outcome = failure(exc)
        else:
            async with clients_of(base, clients) as pool:
                try:
                    await check(pool[0], scenario, data)
                except Exception as exc:  # as above: reported, and the scenario skipped at other concurrencies
                    outcome = failed[scenario] = failure(exc)
                else:
                    if options.processes > 1 and clients > 1:
                        outcome = await asyncio.to_thread(load_spread, base, scenario, data, clients, options)
                    else:
                        make = request_maker(scenario, data, rng)
                        if options.warmup > 0:
                            await load(pool, make, options.warmup)
                        before = group_cpu_seconds(base)
                        outcome = await load(pool, make, options.seconds)
                        server_us(base, before, outcome)
        report(target, (scenario, clients), outcome)


async def measure_ceiling(base: str, options: Options) -> dict[int, Measurement]:
    """The generator against :data:`TRIVIAL_SERVER` at each concurrency: the most it can measure."""
    ceiling: dict[int, Measurement] = {}
    for count in options.concurrency:
        if options.processes > 1 and count > 1:
            empty = Seeded([], 0, iter(()))
            ceiling[count] = await asyncio.to_thread(load_spread, base, "ceiling", empty, count, options)
            continue
        async with clients_of(base, count) as pool:

            def make() -> Request:
                return ("GET", "/", None)

            if options.warmup > 0:
                await load(pool, make, options.warmup)
            ceiling[count] = await load(pool, make, options.seconds)
    return ceiling


# -- output ----------------------------------------------------------------------------------------


def show(outcome: Outcome | None, markdown: bool = False) -> str:
    """One cell as text."""
    if outcome is None:
        return "–"
    if isinstance(outcome, Failed):
        reason = " ".join(outcome.reason.split())
        reason = reason if len(reason) <= 200 else reason[:199] + "…"
        return reason if outcome.unsupported else f"error: {reason}"
    if isinstance(outcome, TransactionTiming):
        runs = ", ".join(f"{s:.2f}" for s in outcome.seconds)
        return f"{outcome.median:.2f} s (runs {runs})"
    if outcome.ok == 0:
        return f"error: all {outcome.errors} requests failed; first: {outcome.first_error}"
    if markdown:
        text = f"{outcome.rate:,.0f}/s · {outcome.p50_ms:.1f} / {outcome.p99_ms:.1f} ms"
    else:
        text = f"{outcome.rate:8,.0f} req/s  p50 {outcome.p50_ms:6.1f} ms  p99 {outcome.p99_ms:6.1f} ms"
        text += f"  client CPU {outcome.client_cpu:4.0%}"
        if outcome.server_us is not None:
            text += f"  server CPU {outcome.server_us:5.0f} µs/req"
    if outcome.errors:
        text += f"{' ·' if markdown else ''} {outcome.errors} errors (first: {outcome.first_error})"
    return text


def ratio(results: dict[Target, dict[Cell, Outcome]], cell: Cell) -> str:
    """Our best configuration against sekmet-fhir for ``cell``, e.g. ``2.4x (SQLite, 2 workers)``."""
    theirs = next((r.get(cell) for t, r in results.items() if t.kind == "sekmet"), None)
    ours = [(t, r.get(cell)) for t, r in results.items() if t.kind == "spfhir"]
    if isinstance(theirs, TransactionTiming):
        timed = [(o.median, t) for t, o in ours if isinstance(o, TransactionTiming)]
        if timed:
            best, target = min(timed, key=lambda x: x[0])
            return f"{theirs.median / best:.1f}x ({target.label})"
    if isinstance(theirs, Measurement) and theirs.ok:
        rates = [(o.rate, t) for t, o in ours if isinstance(o, Measurement) and o.ok]
        if rates:
            best_rate, target = max(rates, key=lambda x: x[0])
            return f"{best_rate / theirs.rate:.1f}x ({target.label})"
    return "–"


def target_checks(results: dict[Target, dict[Cell, Outcome]], options: Options) -> list[str]:
    """The issue's targets for each of our configurations, one line per scenario: met or not, and why."""
    top = max(options.concurrency)
    theirs = next((r for t, r in results.items() if t.kind == "sekmet"), {})
    lines: list[str] = []
    for target, result in results.items():
        if target.kind != "spfhir":
            continue
        lines.append(f"{target.label}:")
        for scenario, want in TARGET_RPS.items():
            got, other = result.get((scenario, top)), theirs.get((scenario, top))
            if got is None:
                continue
            wanted = f">= {want:,.0f}/s with p99 < {TARGET_P99_MS:.0f} ms at {top} clients"
            if isinstance(other, Measurement) and other.ok:
                wanted += f", >= {TARGET_RATIO:g}x sekmet's {other.rate:,.0f}/s"
            if not isinstance(got, Measurement) or not got.ok:
                lines.append(f"  {scenario}: NOT met (no measurement; want {wanted})")
                continue
            met = got.rate >= want and got.p99_ms < TARGET_P99_MS and not got.errors
            if isinstance(other, Measurement) and other.ok:
                met = met and got.rate >= TARGET_RATIO * other.rate
            errors = f", {got.errors} errors" if got.errors else ""
            verdict = "met" if met else "NOT met"
            lines.append(f"  {scenario}: {verdict} ({got.rate:,.0f}/s, p99 {got.p99_ms:.0f} ms{errors}; want {wanted})")
        timing, other_timing = result.get(("transaction", 1)), theirs.get(("transaction", 1))
        if timing is None:
            continue
        wanted = f"< {TARGET_TRANSACTION_S:g} s"
        if isinstance(other_timing, TransactionTiming):
            wanted += f", <= 1/{TARGET_RATIO:g} of sekmet's {other_timing.median:.2f} s"
        if isinstance(timing, TransactionTiming):
            met = timing.median < TARGET_TRANSACTION_S
            if isinstance(other_timing, TransactionTiming):
                met = met and other_timing.median >= TARGET_RATIO * timing.median
            lines.append(f"  transaction: {'met' if met else 'NOT met'} ({timing.median:.2f} s; want {wanted})")
        else:
            lines.append(f"  transaction: NOT met (no measurement; want {wanted})")
    return lines


def ceiling_line(ceiling: dict[int, Measurement]) -> str:
    rates = ", ".join(f"{m.rate:,.0f}/s at {n} client{'s' if n > 1 else ''}" for n, m in ceiling.items())
    return f"load generator ceiling (same generator, trivial HTTP server): {rates or 'not measured'}"


def environment(sekmet_version: str | None, load_average: float) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ours_fast = all(importlib.util.find_spec(m) for m in ("uvloop", "httptools"))
    stack = f"our server on {'uvloop + httptools' if ours_fast else 'asyncio + h11'}"
    if sekmet_version:
        theirs_fast = sekmet.fast_http_stack()
        stack += f", sekmet-fhir {sekmet_version} on {'uvloop + httptools' if theirs_fast else 'asyncio + h11'}"
    return (
        f"Python {platform.python_version()}, {platform.platform(terse=True)}, {cpu}, {os.cpu_count()} cores, "
        f"load average {load_average:.2f} at start; httpx {httpx.__version__} load generator ({TRANSPORT} transport"
        f"{', uvloop' if uvloop is not None else ''}); {stack}"
    )


def print_text(results: dict[Target, dict[Cell, Outcome]], options: Options, env: str, ceiling: str) -> None:
    print(env)
    print(f"{options.seconds:g} s per cell after {options.warmup:g} s warm-up; latencies of successful requests")
    print(ceiling)
    has_sekmet = any(t.kind == "sekmet" for t in results)
    width = max(len(t.label) for t in results)
    for cell in cells(options):
        scenario, clients = cell
        print(f"\n{scenario}" + ("" if scenario == "transaction" else f", {clients} client(s)"))
        for target, result in results.items():
            print(f"  {target.label:<{width}}  {show(result.get(cell))}")
        if has_sekmet and any(t.kind == "spfhir" for t in results):
            print(f"  {'ours/sekmet':<{width}}  {ratio(results, cell)}")
    checks = target_checks(results, options)
    if checks:
        print("\ntargets (issue):", *checks, sep="\n  ")


def print_markdown(results: dict[Target, dict[Cell, Outcome]], options: Options, env: str, ceiling: str) -> None:
    has_ratio = any(t.kind == "sekmet" for t in results) and any(t.kind == "spfhir" for t in results)
    header = ["scenario", "clients", *(t.label for t in results)] + (["ours/sekmet (best)"] if has_ratio else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cell in cells(options):
        scenario, clients = cell
        row = [scenario, "1 (serial)" if scenario == "transaction" else str(clients)]
        row += [show(result.get(cell), markdown=True).replace("|", "\\|") for result in results.values()]
        row += [ratio(results, cell)] if has_ratio else []
        print("| " + " | ".join(row) + " |")
    print(
        f"\nreq/s · p50 / p99 latency; {options.seconds:g} s per cell after {options.warmup:g} s warm-up; "
        f"transaction: median of {options.transaction_runs} runs of {options.transaction_size:,} entries; "
        f"{ceiling}."
    )
    print(f"\n{env}")


# -- main ------------------------------------------------------------------------------------------


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", default="sqlite,postgres", help="our server's stores (default sqlite,postgres)")
    parser.add_argument("--workers", default="1,2", help="our server's worker counts (default 1,2)")
    parser.add_argument("--no-ours", action="store_true", help="do not measure our server")
    parser.add_argument("--no-sekmet", action="store_true", help="do not measure sekmet-fhir")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    parser.add_argument("--concurrency", default="1,16", help="concurrent clients (default 1,16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell (default 1)")
    parser.add_argument("--patients", type=int, default=200, help="seeded Patients (default 200)")
    parser.add_argument("--per-patient", type=int, default=3, help="seeded ServiceRequests per Patient (default 3)")
    parser.add_argument("--transaction-size", type=int, default=1000, help="entries per transaction (default 1000)")
    parser.add_argument("--transaction-runs", type=int, default=3, help="transactions timed (default 3)")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="load generator processes for more than one client (default 2; one httpx process tops out"
        " near 1,400 requests/s on this machine)",
    )
    parser.add_argument(
        "--transport",
        choices=("lean", "httpcore"),
        default="lean",
        help="the generator's httpx transport: lean (bench/_http.py, about a third of the CPU per request) or"
        " httpcore (httpx's default); default lean",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/benchmarks.md")
    parser.add_argument(
        "--spfhir",
        default=str(SPFHIR),
        help="command that runs our CLI, split like a shell would, with absolute paths (default .venv/bin/spfhir); "
        "e.g. 'env PYTHONPATH=/tmp/other-tree /abs/.venv/bin/spfhir' to measure another tree",
    )
    args = parser.parse_args(argv)
    unknown = set(parse_list(args.scenarios)) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if set(parse_list(args.store)) - {"sqlite", "postgres"}:
        parser.error("--store takes sqlite, postgres or both")
    return args


def targets_of(args: argparse.Namespace) -> list[Target]:
    targets: list[Target] = []
    if not args.no_ours:
        for store in parse_list(args.store):
            for workers in (int(w) for w in parse_list(args.workers)):
                name = "SQLite" if store == "sqlite" else "PostgreSQL"
                label = f"{name}, {workers} worker{'s' if workers > 1 else ''}"
                targets.append(Target("spfhir", store, workers, label))
    if not args.no_sekmet:
        targets.append(Target("sekmet", "sqlite", 1, f"sekmet-fhir {sekmet.VERSION}"))
    return targets


def main(argv: list[str] | None = None) -> int:
    global TRANSPORT
    args = parse_args(argv)
    TRANSPORT = args.transport
    options = Options(
        scenarios=[s for s in SCENARIOS if s in parse_list(args.scenarios)],
        concurrency=sorted({int(c) for c in parse_list(args.concurrency)}),
        seconds=args.seconds,
        warmup=args.warmup,
        patients=args.patients,
        per_patient=args.per_patient,
        transaction_size=args.transaction_size,
        transaction_runs=args.transaction_runs,
        processes=args.processes,
    )
    targets = targets_of(args)
    if not targets:
        print("nothing to measure", file=sys.stderr)
        return 2
    results: dict[Target, dict[Cell, Outcome]] = {t: {} for t in targets}

    def report(target: Target, cell: Cell, outcome: Outcome) -> None:
        results[target][cell] = outcome
        scenario, clients = cell
        where = scenario if scenario == "transaction" else f"{scenario}, {clients} client(s)"
        print(f"[{target.label}] {where}: {show(outcome)}", file=sys.stderr, flush=True)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    load_average = os.getloadavg()[0]
    if load_average > 0.5:
        print(f"warning: the machine is busy (load average {load_average:.2f}): figures will be low", file=sys.stderr)
    sekmet_version: str | None = None
    ceiling: dict[int, Measurement] = {}
    postgres = Postgres()
    started = time.monotonic()
    interrupted = False
    try:
        with running(Target("trivial", "none", 1, "trivial server"), postgres) as base:
            ceiling = run_loop(measure_ceiling(base, options))
        print(ceiling_line(ceiling), file=sys.stderr, flush=True)
        for target in targets:
            try:
                if target.kind == "sekmet":
                    sekmet_version = sekmet.ensure_installed()
                with running(target, postgres, shlex.split(args.spfhir)) as base:
                    print(f"[{target.label}] serving {base}", file=sys.stderr, flush=True)
                    run_loop(measure_target(target, base, options, report))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                for cell in cells(options):
                    report(target, cell, Failed(f"server did not start: {exc}"))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping the servers; the results so far follow", file=sys.stderr)
    finally:
        postgres.stop()
    print(f"total time {time.monotonic() - started:.0f} s", file=sys.stderr)
    env = environment(sekmet_version, load_average)
    if args.markdown:
        print_markdown(results, options, env, ceiling_line(ceiling))
        checks = target_checks(results, options)
        if checks:
            print("targets (issue):", *checks, sep="\n  ", file=sys.stderr)
    else:
        print_text(results, options, env, ceiling_line(ceiling))
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
