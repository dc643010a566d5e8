"""A mapping run: stream records from a source, map them, and hand out transaction Bundles.

Records are read and mapped one at a time and grouped into batches of ``batch_size`` records; each
batch becomes one transaction Bundle (conditional creates on business identifiers, so a batch sent
twice stores nothing twice, https://hl7.org/fhir/R4/http.html#ccreate) with a Provenance of the run
for its resources (https://hl7.org/fhir/R4/provenance.html). Only the current batch is in memory.

The :class:`Summary` counts records mapped and rejected (record number, field, reason), resources,
unused source fields and defaults applied; :class:`Batches` fills it, whoever maps the records.

:class:`MappingPool` maps in worker processes (``spfhir map --processes``, and large ``$ingest``
requests while the server stores): records cross as plain tuples and come back pickled, each
worker loading the profiles once.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import pickle
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from lxml import etree

from adapter import software_version
from adapter.errors import InputError
from adapter.mapping.base import MappedResource, MappingError
from adapter.mapping.engine import MappedRecord, Mapper, transaction_entry
from adapter.mapping.ids import NAMESPACE
from adapter.mapping.sources import RawRecord, read_records
from adapter.mapping.spec import MappingSpec, SourceFormat
from adapter.validation import Validator

__all__ = ["Batch", "Batches", "MappingPool", "Rejection", "Summary", "can_cross", "decode", "provenance", "run"]

#: Rejections kept in the summary; beyond it they are only counted (bounded memory).
MAX_REJECTIONS = 1000


@dataclass(frozen=True, slots=True)
class Rejection:
    record: int
    field: str | None
    reason: str

    @property
    def expression(self) -> str:
        return f"record[{self.record}]" + (f".{self.field}" if self.field else "")


@dataclass(slots=True)
class Summary:
    mapping: str
    source: str
    records: int = 0
    mapped: int = 0
    rejected: int = 0
    resources: int = 0
    batches: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    #: Resources that records of one batch gave differently under one identity (the first is kept).
    differing: int = 0
    differences: list[str] = field(default_factory=list)
    unused: Counter[str] = field(default_factory=Counter)
    defaults: Counter[str] = field(default_factory=Counter)

    def add(self, result: MappedRecord) -> None:
        self.records += 1
        # Counter.update is costly even with nothing to count, and most records have no unused field.
        if result.unused:
            self.unused.update(result.unused)
        if result.defaults:
            self.defaults.update(item.split("=", 1)[0] for item in result.defaults)
        if result.error is not None:
            self._reject(Rejection(result.number, result.error.field, result.error.message))
        else:
            self.mapped += 1

    def refuse(self, number: int, reason: str) -> None:
        """A mapped record that its target (the store, a server) then refused."""
        self.mapped -= 1
        self._reject(Rejection(number, None, reason))

    def _reject(self, rejection: Rejection) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REJECTIONS:
            self.rejections.append(rejection)

    def as_json(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "source": self.source,
            "records": self.records,
            "mapped": self.mapped,
            "rejected": self.rejected,
            "resources": self.resources,
            "bundles": self.batches,
            "rejections": [
                {"record": item.record, "field": item.field, "reason": item.reason} for item in self.rejections
            ],
            "differing": self.differences,
            "unused_fields": dict(sorted(self.unused.items())),
            "defaults_applied": dict(sorted(self.defaults.items())),
        }


@dataclass(slots=True)
class Batch:
    """The records of one batch and their resources, each resource once (first record wins)."""

    index: int
    records: list[MappedRecord]
    resources: list[MappedResource]

    def bundle(self, spec: MappingSpec, source: str, recorded: str | None = None) -> dict[str, Any]:
        """The batch as a transaction Bundle, its Provenance last."""
        entries = [transaction_entry(item) for item in self.resources]
        if self.resources:
            entries.append(transaction_entry(provenance(spec, source, self.resources, recorded)))
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def provenance(
    spec: MappingSpec,
    source: str,
    resources: Iterable[MappedResource],
    recorded: str | None = None,
    *,
    stored: bool = False,
) -> MappedResource:
    """The Provenance of a mapping run for ``resources``: which mapping made them from which source.

    Its id is a uuid5 of the mapping and of the resources' ids, so mapping the same data again
    gives the same Provenance, written by id (``PUT``): a re-run adds no new Provenance, but a new
    version of it, whose ``recorded`` says when the batch was sent again. (``$ingest`` creates it
    only when absent.) Its targets are the resources' ``urn:uuid:`` fullUrls, or with ``stored``
    (the resources are stored under these ids already) their ``Type/id``.
    """
    ids = hashlib.sha256()
    targets = []
    for item in resources:
        resource_id = item.resource["id"]
        ids.update(resource_id.encode())
        target = f"{item.resource['resourceType']}/{resource_id}" if stored else f"urn:uuid:{resource_id}"
        targets.append({"reference": target})
    id = str(uuid.uuid5(NAMESPACE, f"Provenance?mapping={spec.name}&resources={ids.hexdigest()}"))
    resource = {
        "resourceType": "Provenance",
        "id": id,
        "target": targets,
        "recorded": recorded or datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                            "display": "Assembler",
                        }
                    ]
                },
                "who": {"display": f"sp-fhir-adapter {software_version()}, mapping {spec.name}"},
            }
        ],
        "entity": [{"role": "source", "what": {"display": source}}],
    }
    return MappedResource(resource)


#: Records the command line sends to a worker process at a time, and chunks in flight per process.
_CHUNK = 200
_IN_FLIGHT = 3

#: A source record as it crosses to a worker process: (number, data, extra, error) of a
#: :class:`RawRecord`; plain tuples pickle in a fraction of the time dataclasses take.
PlainRaw = tuple[int, Any, list[str], str | None]

#: The validator of a worker process (made once by :func:`_start_worker`), and its mappers by name.
_validator: Validator | None = None
_mappers: dict[str, Mapper] = {}


def _start_worker(defaults: dict[str, list[str]] | None, nice: int) -> None:
    """Initializer of a worker process: the profile validator, loaded once for the process's life."""
    global _validator
    import os

    if nice:
        os.nice(nice)

    from adapter.validation.bundled import bundled_packages
    from adapter.validation.profiles import ProfileValidator

    _validator = ProfileValidator(bundled_packages(), defaults=defaults)
    # The loaded profiles are millions of long-lived objects: out of the collector's sight, each
    # collection walks only what a chunk allocates.
    from adapter.memory import settle_for_mapping

    settle_for_mapping()


def _map_chunk(name: str, raws: list[PlainRaw]) -> bytes:
    """Map ``raws`` with the mapping ``name`` (in a worker process): the records as plain tuples
    (see :func:`_plain`), pickled here so that the receiver unpickles them when it chooses."""
    assert _validator is not None, "a worker process starts with _start_worker"
    mapper = _mappers.get(name)
    if mapper is None:
        from adapter.mapping.spec import load

        mapper = _mappers[name] = Mapper(load(name), _validator)
    return pickle.dumps([_plain(mapper.map(RawRecord(*raw))) for raw in raws], protocol=pickle.HIGHEST_PROTOCOL)


def _plain(record: MappedRecord) -> tuple[Any, ...]:
    error = record.error
    return (
        record.number,
        [(item.resource, item.if_none_exist, item.key) for item in record.resources],
        None if error is None else (error.message, error.record, error.field),
        record.unused,
        record.defaults,
    )


def decode(data: bytes) -> list[MappedRecord]:
    """The records a worker process mapped (:meth:`MappingPool.submit`), in source order."""
    from adapter.memory import collection_paused

    # Thousands of fresh dicts, all kept: with the collector on, they trigger collections that walk
    # them and this process's heap, which cost six times the unpickling itself (#5).
    with collection_paused():
        return [
            MappedRecord(
                number,
                [MappedResource(resource, if_none_exist, key) for resource, if_none_exist, key in resources],
                None if error is None else MappingError(error[0], record=error[1], field=error[2]),
                unused,
                defaults,
            )
            for number, resources, error, unused, defaults in pickle.loads(data)
        ]


def can_cross(raws: list[RawRecord]) -> bool:
    """Whether records can be sent to a worker process: XML elements cannot be pickled."""
    return not raws or not isinstance(raws[0].data, etree._Element)


class MappingPool:
    """Worker processes that map and validate records, for a process that stores them meanwhile.

    The processes start on the first :meth:`submit` (``forkserver``: a fresh interpreter whatever
    threads the caller runs; ``fork`` would copy the server's threads' locks mid-use), each loading
    the bundled profiles once, with ``defaults`` (type -> profile URLs) for resources that declare
    none, and a mapper per mapping on its first chunk; ``nice`` lowers their priority (``os.nice``).
    After a worker dies, :meth:`discard` of the broken pool (:attr:`executor` when the failed work
    was sent) drops it; the next :meth:`submit` starts a new one. :meth:`close` stops the processes.
    """

    def __init__(self, processes: int, defaults: dict[str, list[str]] | None = None, *, nice: int = 0) -> None:
        self.processes = processes
        self._defaults = defaults
        self._nice = nice
        self._executor: ProcessPoolExecutor | None = None

    @property
    def executor(self) -> Executor | None:
        """The pool :meth:`submit` sends work to now (None before the first, and after a discard):
        what to :meth:`discard` when work sent now fails."""
        return self._executor

    def submit(self, name: str, raws: Iterable[RawRecord]) -> Future[bytes]:
        """Map ``raws`` with the mapping ``name``; the future's result is for :func:`decode`.
        Raises BrokenProcessPool when the pool has broken (and discards it)."""
        executor = self._executor
        if executor is None:
            executor = self._executor = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_start_worker,
                initargs=(self._defaults, self._nice),
            )
        plain = [(raw.number, raw.data, raw.extra, raw.error) for raw in raws]
        try:
            return executor.submit(_map_chunk, name, plain)
        except BrokenProcessPool:
            self.discard(executor)
            raise

    def discard(self, broken: Executor | None) -> None:
        """Forget ``broken``, a pool whose worker died (its futures have failed already), unless it
        was replaced already: requests learn of a dead worker each from their own futures, and the
        last to learn must not stop the new pool that another has started since (#5)."""
        executor = self._executor
        if executor is None or broken is not executor:
            return
        self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker processes, dropping the work not started."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _chunks(raws: Iterator[RawRecord]) -> Iterator[list[RawRecord]]:
    while chunk := list(itertools.islice(raws, _CHUNK)):
        yield chunk


def _mapped(
    spec: MappingSpec, raws: Iterator[RawRecord], validator: Validator, processes: int
) -> Iterator[MappedRecord]:
    """The mapped records, in source order: in this process, or spread over ``processes`` worker
    processes (each with its own mapper and validator) that map chunks of records side by side."""
    if processes <= 1:
        yield from _mapped_here(spec, raws, validator)
        return
    pool = MappingPool(processes)
    try:
        pending: deque[Future[bytes]] = deque()
        for chunk in _chunks(raws):
            if not can_cross(chunk):
                raise InputError("XML sources are mapped in one process (use --processes 1)", expression="processes")
            pending.append(pool.submit(spec.name, chunk))
            if len(pending) >= processes * _IN_FLIGHT:
                yield from decode(pending.popleft().result())
        while pending:
            yield from decode(pending.popleft().result())
    finally:
        pool.close()


def _mapped_here(spec: MappingSpec, raws: Iterator[RawRecord], validator: Validator) -> Iterator[MappedRecord]:
    """The mapped records, mapped in this process; after the first ones, the collector set for the
    rest of the run (:func:`adapter.memory.settle_for_mapping`), and set back when the run ends."""
    from adapter.memory import settle_for_mapping, thresholds_kept

    mapper = Mapper(spec, validator)
    with thresholds_kept():
        for number, raw in enumerate(raws):
            if number == _WARMED_UP:
                # What mapping and validating loaded (profiles, types, compiled FHIRPath) out of
                # the collector's way: a process-wide setting, as the worker processes make at
                # start (_start_worker).
                settle_for_mapping()
            yield mapper.map(raw)


#: Records mapped in this process before :func:`adapter.memory.settle_for_mapping`: by then the
#: mapping has loaded what its records need.
_WARMED_UP = 100


class Batches:
    """Mapped records grouped, in source order, into :class:`Batch` es of ``batch_size`` records,
    and counted into ``summary`` as they come (``on_record`` is called after each)."""

    def __init__(self, summary: Summary, batch_size: int, on_record: Callable[[], None] | None = None) -> None:
        self.summary = summary
        self.batch_size = batch_size
        self.on_record = on_record
        self._records: list[MappedRecord] = []
        self._index = 0

    def add(self, result: MappedRecord) -> Batch | None:
        """Count ``result``; the batch it completes, if it does."""
        self.summary.add(result)
        if self.on_record is not None:
            self.on_record()
        self._records.append(result)
        return self._batch() if len(self._records) >= self.batch_size else None

    def rest(self) -> Batch | None:
        """The last batch, of the records since the last full one (None if there are none)."""
        return self._batch() if self._records else None

    def _batch(self) -> Batch:
        summary = self.summary
        seen: dict[str, tuple[MappedResource, int]] = {}
        for record in self._records:
            for item in record.resources:
                first = seen.setdefault(item.resource["id"], (item, record.number))
                # (Its first time: the same object, not compared key by key with itself.)
                if first[0] is not item and first[0].resource != item.resource:
                    # The same person with another address in a later row: nothing is lost
                    # silently; the run says which identity, and which records disagree.
                    summary.differing += 1
                    if len(summary.differences) < MAX_REJECTIONS:
                        summary.differences.append(
                            f"{item.resource['resourceType']} {item.if_none_exist or item.resource['id']}: "
                            f"record {record.number} differs from record {first[1]}, whose values are kept"
                        )
        summary.batches += 1
        summary.resources += len(seen)
        batch = Batch(self._index, self._records, [item for item, _ in seen.values()])
        self._index += 1
        self._records = []
        return batch


def run(
    spec: MappingSpec,
    stream: IO[bytes],
    validator: Validator,
    summary: Summary,
    *,
    batch_size: int = 100,
    format: SourceFormat | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    on_record: Callable[[], None] | None = None,
    processes: int = 1,
) -> Iterator[Batch]:
    """Map ``stream`` record by record; yield a :class:`Batch` for every ``batch_size`` records
    (and the rest). ``summary`` is updated as records go. ``processes`` above 1 maps in that many
    worker processes (records keep their order; memory stays bounded by the chunks in flight)."""
    batches = Batches(summary, batch_size, on_record)
    raws = read_records(spec, stream, format=format, encoding=encoding, delimiter=delimiter, name=summary.source)
    for result in _mapped(spec, raws, validator, processes):
        full = batches.add(result)
        if full is not None:
            yield full
    last = batches.rest()
    if last is not None:
        yield last
