"""``POST [base]/$ingest?mapping=NAME``: map source records, validate them and store them.

Our operation (``conformance/OperationDefinition-ingest.json``). The body is the source data as the
mapping reads it (CSV, JSON, NDJSON or XML; the format comes from ``format``, else the
Content-Type, else the content). Each record is mapped and validated (:mod:`adapter.mapping`) and
stored in a transaction of its own: conditional creates on its business identifiers
(https://hl7.org/fhir/R4/http.html#ccreate), under its deterministic ids, so a record either is
stored whole or not at all, and posting the same data again stores nothing twice. A Provenance of
the request for everything stored is written last.

The answer is 200 with an OperationOutcome: one ``information`` issue with the counts, one
``error`` issue per rejected record (``expression`` ``record[12].nhs_number``), and ``information``
issues for unused source fields and defaults applied. A request that cannot be mapped at all (an
unknown mapping, unreadable input) is a 400.

The whole body is read into records before anything is stored, so unreadable input stores
nothing. A large request (:data:`_IN_PROCESS_BELOW` records or more; not XML) is mapped in the
services' worker processes (:class:`adapter.mapping.run.MappingPool`, ``SPFHIR_INGEST_PROCESSES``)
in chunks, while this process stores the chunks already mapped: mapping (pure Python) and storing
then run side by side instead of one after the other under one interpreter lock (#5). The answer
is the same either way. Should a worker fail, the records it had not returned are mapped here.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio.to_thread
from fastapi import Request, Response

from adapter.api.context import condition, services
from adapter.api.negotiation import read_body, render, response_format
from adapter.errors import AdapterError, InputError
from adapter.mapping.base import MappedResource
from adapter.mapping.engine import MappedRecord, Mapper
from adapter.mapping.run import Batches, MappingPool, Summary, can_cross, decode, provenance
from adapter.mapping.sources import RawRecord, read_records
from adapter.mapping.spec import MappingSpec, SourceFormat, load
from adapter.store import Operation, OperationResult, ResourceStore
from adapter.validation import Validator

__all__ = ["ingest"]

_MEDIA_FORMATS: dict[str, SourceFormat] = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/json": "json",
    "application/fhir+json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/fhir+ndjson": "ndjson",
    "application/xml": "xml",
    "text/xml": "xml",
}
_FORMATS = ("csv", "json", "ndjson", "xml")
#: Records stored at a time: each in its own transaction, committed together (one commit per window).
#: Ids are uuid5s, so every record's rows land on random pages of the indexes; the more records a
#: commit holds, the more of them share a page, which SQLite then writes to its WAL once. 256 rather
#: than 64: server CPU per record 1,115 -> 970 µs at 6,000 records of each (1,024: 948).
_WINDOW = 256
#: Records waiting that make the store take a window (but see :class:`_Storing`). At 20,000 records
#: of each: 128 rather than 256 left the store idle 1.1-1.3 s instead of 3.2 s while the worker was
#: behind on case records; taking whatever is waiting (windows of mostly 64-127 records) was no
#: faster and used 1-4% more server CPU.
_LEAST = _WINDOW // 2
#: Records mapped and waiting for the store beyond which mapping waits for it (memory stays bounded).
_BACKLOG = 2 * _WINDOW
#: Records the summary looks for differing duplicates among (as ``spfhir map`` does per Bundle).
_BATCH = 1000
#: Records sent to a worker at a time: storing starts after the first chunk is mapped (about 0.1 s),
#: and a chunk's round trip (about 1 ms) is lost in its mapping (1-2 ms a record).
_CHUNK = 64
#: Chunks in flight per worker process: enough that the worker keeps mapping while a whole window
#: is stored (_WINDOW / _CHUNK = 4 chunks), or it idles for most of each window: 2 gave 609 records/s
#: at 3,000 of each, 8 gave 830 (16: 813). (Measured while mapping still waited for each window to
#: be stored, which it no longer does: see :class:`_Storing`.) The pool is shared: another request's
#: first chunk waits behind up to 512 records (about half a second of mapping) instead of 128.
_AHEAD = 8
#: Smaller requests are mapped in this process: with one chunk there is nothing to store while
#: the worker maps. From two chunks on the worker pays (128 referrals: 265 ms instead of 424 ms).
_IN_PROCESS_BELOW = 2 * _CHUNK

_log = logging.getLogger("adapter.api")


def _operations(record: MappedRecord) -> list[Operation]:
    operations = []
    for item in record.resources:
        resource = item.resource
        type, id = resource["resourceType"], resource["id"]
        if_none_exist = condition(type, item.if_none_exist, "ifNoneExist") if item.if_none_exist else None
        operations.append(Operation.create(resource, id=id, if_none_exist=if_none_exist, full_url=f"urn:uuid:{id}"))
    return operations


def _read(spec: MappingSpec, body: bytes, fmt: SourceFormat | None) -> list[RawRecord]:
    return list(read_records(spec, io.BytesIO(body), format=fmt))


def _map_here(spec: MappingSpec, raws: list[RawRecord], validator: Validator) -> list[MappedRecord]:
    mapper = Mapper(spec, validator)
    return [mapper.map(raw) for raw in raws]


async def _map(
    spec: MappingSpec,
    raws: list[RawRecord],
    validator: Validator,
    pool: MappingPool | None,
    take: Callable[[list[MappedRecord], int], Awaitable[None]],
) -> None:
    """Map ``raws`` and hand the records to ``take`` in source order, a chunk at a time, with the
    number of records still to come: mapped by ``pool`` while ``take`` stores the chunks before,
    or all at once in this process."""
    if pool is None or len(raws) < _IN_PROCESS_BELOW or not can_cross(raws):
        await take(await anyio.to_thread.run_sync(_map_here, spec, raws, validator), 0)
        return
    chunks = [raws[start : start + _CHUNK] for start in range(0, len(raws), _CHUNK)]
    # Each chunk's future with the pool it was sent to: another request may have replaced a broken
    # pool since, and only the one that failed is to be discarded.
    pending: deque[tuple[Executor | None, asyncio.Future[bytes]]] = deque()
    try:
        for taken in range(len(chunks)):
            sent_to: Executor | None = None  # None: submit failed, and discarded its pool itself
            try:
                while taken + len(pending) < len(chunks) and len(pending) < pool.processes * _AHEAD:
                    sent = pool.submit(spec.name, chunks[taken + len(pending)])
                    pending.append((pool.executor, asyncio.wrap_future(sent)))
                sent_to, head = pending.popleft()
                records = await anyio.to_thread.run_sync(decode, await head)
            except Exception as exc:
                # A worker died (BrokenProcessPool) or raised: the records not yet taken are mapped
                # here, so none is lost or stored twice; an error of the records themselves is
                # then raised here as it would have been without workers.
                _log.warning("$ingest: a worker failed (%s: %s), mapping in this process", type(exc).__name__, exc)
                if isinstance(exc, BrokenProcessPool):
                    pool.discard(sent_to)
                for _, future in pending:
                    future.cancel()
                pending.clear()
                rest = [raw for chunk in chunks[taken:] for raw in chunk]
                await take(await anyio.to_thread.run_sync(_map_here, spec, rest, validator), 0)
                return
            await take(records, max(0, len(raws) - (taken + 1) * _CHUNK))
    finally:
        for _, future in pending:
            future.cancel()


def _prepared(record: MappedRecord) -> list[Operation] | AdapterError:
    """``record``'s operations, or why they cannot be made (a condition that does not parse)."""
    try:
        return _operations(record)
    except AdapterError as exc:
        return exc


#: A record with its operations, or why they cannot be made (:func:`_prepared`).
_Prepared = tuple[MappedRecord, list[Operation] | AdapterError]


async def _store(
    store: ResourceStore, window: list[_Prepared]
) -> list[tuple[MappedRecord, AdapterError | None, list[OperationResult]]]:
    """Store each record of ``window`` in a transaction of its own; the store commits the
    window's together."""
    groups = [item for _, item in window if not isinstance(item, AdapterError)]
    stored: list[list[OperationResult] | AdapterError]
    try:
        stored = await store.transactions(groups) if groups else []
    except AdapterError:
        # The shared commit failed as a whole (another writer held the store): each on its own.
        stored = []
        for operations in groups:
            try:
                stored.append(await store.transaction(operations))
            except AdapterError as exc:
                stored.append(exc)
    outcomes = iter(stored)
    results: list[tuple[MappedRecord, AdapterError | None, list[OperationResult]]] = []
    for record, item in window:
        outcome = item if isinstance(item, AdapterError) else next(outcomes)
        results.append((record, outcome, []) if isinstance(outcome, AdapterError) else (record, None, outcome))
    return results


class _Storing:
    """The records of one request as mapping hands them out: counted into the summary, and stored
    by a task of their own (:meth:`_store_all`), one window after the other, in order.

    Mapping never waits for the store unless :data:`_BACKLOG` records are waiting, so the worker
    is sent its next chunks while a window is stored. The store takes up to :data:`_WINDOW`
    records as soon as it is free and :data:`_LEAST` are waiting; it takes whatever is waiting
    for a request's first window (storing starts with the first chunk mapped, not after a
    window's worth: at 20,000 records of each that wait was about a tenth of the time) and once
    fewer than a window are still to be mapped (the request's tail, with the worker idle, is then
    what came while the window before was stored). A record's operations are made when it comes,
    on the event loop, while the store's thread writes (its conditions take about 35 µs of CPU to
    parse)."""

    def __init__(self, store: ResourceStore, summary: Summary) -> None:
        self.store = store
        self.summary = summary
        self.batches = Batches(summary, _BATCH)
        #: Resources created, and records stored.
        self.created = self.records = 0
        #: What was stored, under the id it has: a conditional create that matched a resource
        #: stored before keeps that resource's id.
        self.stored: list[MappedResource] = []
        #: Records mapped and not yet taken by the store, with their operations (:func:`_prepared`).
        self._waiting: list[_Prepared] = []
        # Refusals are counted after every record is: the rejections then list the mapping's
        # first, whether records were stored while others were still being mapped or not.
        self._refused: list[tuple[int, str]] = []
        #: Records still to be mapped, as the last take() said; None once no more will come.
        self._coming: int | None = 0
        self._first = True
        # Set when records come or no more will (the storing task waits for it), and when the
        # storing task takes records or ends (take() waits for it while the backlog is full).
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def take(self, records: list[MappedRecord], coming: int) -> None:
        """Count ``records`` (``coming`` more are still to be mapped) and hand the ones to store to
        the storing task; wait while :data:`_BACKLOG` records are waiting. Raises what the store
        raised."""
        for record in records:
            self.batches.add(record)
            if record.error is None and record.resources:
                self._waiting.append((record, _prepared(record)))
        self._coming = coming
        if self._task is None:
            self._task = asyncio.ensure_future(self._store_all())
        self._arrived.set()
        while len(self._waiting) >= _BACKLOG and not self._task.done():
            self._taken.clear()
            await self._taken.wait()
        if self._task.done():
            self._task.result()

    async def finish(self) -> None:
        """Store what is still waiting, then count the refusals."""
        await self._end()
        self.batches.rest()
        for number, reason in self._refused:
            self.summary.refuse(number, reason)

    async def settle(self) -> None:
        """On the way out of a failed request: what is waiting is dropped, and a window the store
        has started is finished, not abandoned."""
        self._waiting.clear()
        await self._end()

    async def _end(self) -> None:
        self._coming = None
        self._arrived.set()
        if self._task is not None:
            await self._task

    def _ready(self) -> bool:
        if not self._waiting:
            return False
        return self._first or self._coming is None or self._coming < _WINDOW or len(self._waiting) >= _LEAST

    async def _store_all(self) -> None:
        try:
            while self._waiting or self._coming is not None:
                if not self._ready():
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                self._first = False
                window = self._waiting[:_WINDOW]
                del self._waiting[:_WINDOW]
                self._taken.set()
                self._count(await _store(self.store, window))
        finally:
            self._taken.set()

    def _count(self, stored: list[tuple[MappedRecord, AdapterError | None, list[OperationResult]]]) -> None:
        for record, error, results in stored:
            if error is None:
                self.created += sum(1 for result in results if result.created and not result.matched)
                self.records += 1
                self.stored.extend(MappedResource({"resourceType": result.type, "id": result.id}) for result in results)
            else:
                self._refused.append((record.number, f"not stored: {error.message}"))


def _outcome(summary: Summary, created: int, stored: int) -> dict[str, Any]:
    issues: list[dict[str, Any]] = [
        {
            "severity": "information",
            "code": "informational",
            "diagnostics": (
                f"mapping {summary.mapping}: {summary.records} records, {stored} stored, {summary.rejected} rejected; "
                f"{created} resources created, the others already present"
            ),
            "expression": ["record"],
        }
    ]
    for item in summary.rejections:
        issues.append(
            {"severity": "error", "code": "invalid", "diagnostics": item.reason, "expression": [item.expression]}
        )
    if summary.rejected > len(summary.rejections):
        issues.append(
            {
                "severity": "error",
                "code": "too-costly",
                "diagnostics": f"{summary.rejected - len(summary.rejections)} more rejected records are not listed",
                "expression": ["record"],
            }
        )
    for text in summary.differences:
        issues.append({"severity": "warning", "code": "conflict", "diagnostics": text, "expression": ["record"]})
    for name, count in sorted(summary.unused.items()):
        issues.append(
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"source field {name!r} is not used by the mapping ({count} records)",
                "expression": [f"record.{name}"],
            }
        )
    for name, count in sorted(summary.defaults.items()):
        issues.append(
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"default applied to {name!r} ({count} records)",
                "expression": [f"record.{name}"],
            }
        )
    return {"resourceType": "OperationOutcome", "issue": issues}


async def ingest(request: Request) -> Response:
    """``POST [base]/$ingest``"""
    fmt = response_format(request)
    name = request.query_params.get("mapping")
    if not name:
        raise InputError("$ingest needs the mapping parameter: $ingest?mapping=sp-referral", expression="mapping")
    spec = load(name)
    if spec.output != "transaction":
        raise InputError(f"mapping {name!r} makes a document, which $ingest does not store", expression="mapping")
    source_format = request.query_params.get("format")
    if source_format is not None and source_format not in _FORMATS:
        raise InputError(f"format {source_format!r} is not one of {', '.join(_FORMATS)}", expression="format")
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    chosen: SourceFormat | None = source_format or _MEDIA_FORMATS.get(media)  # type: ignore[assignment]
    found = services(request)
    body = await read_body(request, found.max_body_bytes)
    if not body.strip():
        raise InputError("the request has no body: the source records are required", expression="record")
    summary = Summary(spec.name, "$ingest")
    raws = await anyio.to_thread.run_sync(_read, spec, body, chosen)
    storing = _Storing(found.store, summary)
    try:
        await _map(spec, raws, found.profile_validator, found.mapping_pool, storing.take)
        await storing.finish()
    finally:
        await storing.settle()
    stored = storing.stored
    if stored:
        unique = list({item.resource["id"]: item for item in stored}.values())
        # The resources are stored under these ids (a matched create's is the resource's it matched).
        trail = provenance(spec, f"$ingest?mapping={spec.name}", unique, stored=True).resource
        await found.store.transaction(
            [
                Operation.create(
                    trail, id=trail["id"], if_none_exist=condition("Provenance", f"_id={trail['id']}", "_id")
                )
            ]
        )
    return render(_outcome(summary, storing.created, storing.records), fmt, 200)
