"""A mapping run: stream records from a source, map them, and hand out transaction Bundles.

Records are read and mapped one at a time and grouped into batches of ``batch_size`` records; each
batch becomes one transaction Bundle (conditional creates on business identifiers, so a batch sent
twice stores nothing twice, https://hl7.org/fhir/R4/http.html#ccreate) with a Provenance of the run
for its resources (https://hl7.org/fhir/R4/provenance.html). Only the current batch is in memory.

The :class:`Summary` counts records mapped and rejected (record number, field, reason), resources,
unused source fields and defaults applied.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from lxml import etree

from adapter import software_version
from adapter.errors import InputError
from adapter.mapping.base import MappedResource
from adapter.mapping.engine import MappedRecord, Mapper, transaction_entry
from adapter.mapping.ids import NAMESPACE
from adapter.mapping.sources import RawRecord, read_records
from adapter.mapping.spec import MappingSpec, SourceFormat
from adapter.validation import Validator

__all__ = ["Batch", "Rejection", "Summary", "provenance", "run"]

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
        self.unused.update(result.unused)
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
    spec: MappingSpec, source: str, resources: Iterable[MappedResource], recorded: str | None = None
) -> MappedResource:
    """The Provenance of a mapping run for ``resources``: which mapping made them from which source.

    Its id is a uuid5 of the mapping and of the resources' ids, so mapping the same data again
    gives the same Provenance, written by id (``PUT``): a re-run adds no new Provenance, but a new
    version of it, whose ``recorded`` says when the batch was sent again. (``$ingest`` creates it
    only when absent.)
    """
    ids = hashlib.sha256()
    targets = []
    for item in resources:
        resource_id = item.resource["id"]
        ids.update(resource_id.encode())
        targets.append({"reference": f"urn:uuid:{resource_id}"})
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


#: Records sent to a worker process at a time, and chunks in flight per process.
_CHUNK = 200
_IN_FLIGHT = 3
#: The mapper of a worker process (one per process, made by :func:`_start_worker`).
_worker: Mapper | None = None


def _start_worker(name: str) -> None:
    global _worker
    from adapter.mapping.spec import load
    from adapter.validation.bundled import bundled_packages
    from adapter.validation.profiles import ProfileValidator

    _worker = Mapper(load(name), ProfileValidator(bundled_packages()))


def _map_chunk(raws: list[RawRecord]) -> list[MappedRecord]:
    assert _worker is not None
    return [_worker.map(raw) for raw in raws]


def _chunks(raws: Iterator[RawRecord]) -> Iterator[list[RawRecord]]:
    while chunk := list(itertools.islice(raws, _CHUNK)):
        yield chunk


def _mapped(
    spec: MappingSpec, raws: Iterator[RawRecord], validator: Validator, processes: int
) -> Iterator[MappedRecord]:
    """The mapped records, in source order: in this process, or spread over ``processes`` worker
    processes (each with its own mapper and validator) that map chunks of records side by side."""
    if processes <= 1:
        mapper = Mapper(spec, validator)
        for raw in raws:
            yield mapper.map(raw)
        return
    # forkserver: workers start from a clean interpreter, whatever threads this process runs.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker, initargs=(spec.name,)) as pool:
        pending: deque[Future[list[MappedRecord]]] = deque()
        for chunk in _chunks(raws):
            if chunk and isinstance(chunk[0].data, etree._Element):
                raise InputError("XML sources are mapped in one process (use --processes 1)", expression="processes")
            pending.append(pool.submit(_map_chunk, chunk))
            if len(pending) >= processes * _IN_FLIGHT:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


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
    records: list[MappedRecord] = []
    index = 0

    def batch() -> Batch:
        seen: dict[str, tuple[MappedResource, int]] = {}
        for record in records:
            for item in record.resources:
                first = seen.setdefault(item.resource["id"], (item, record.number))
                if first[0].resource != item.resource:
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
        return Batch(index, list(records), [item for item, _ in seen.values()])

    raws = read_records(spec, stream, format=format, encoding=encoding, delimiter=delimiter, name=summary.source)
    for result in _mapped(spec, raws, validator, processes):
        summary.add(result)
        if on_record is not None:
            on_record()
        records.append(result)
        if len(records) >= batch_size:
            yield batch()
            index += 1
            records = []
    if records:
        yield batch()
