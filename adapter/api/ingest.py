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
"""

from __future__ import annotations

import io
from typing import Any

import anyio.to_thread
from fastapi import Request, Response

from adapter.api.context import condition, services
from adapter.api.negotiation import read_body, render, response_format
from adapter.errors import AdapterError, InputError
from adapter.mapping.base import MappedResource
from adapter.mapping.engine import MappedRecord, references_to_ids
from adapter.mapping.run import Summary, provenance, run
from adapter.mapping.spec import MappingSpec, SourceFormat, load
from adapter.store import Operation, OperationResult, ResourceStore

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
_WINDOW = 64


def _operations(record: MappedRecord) -> list[Operation]:
    operations = []
    for item in record.resources:
        resource = item.resource
        type, id = resource["resourceType"], resource["id"]
        if_none_exist = condition(type, item.if_none_exist, "ifNoneExist") if item.if_none_exist else None
        operations.append(Operation.create(resource, id=id, if_none_exist=if_none_exist, full_url=f"urn:uuid:{id}"))
    return operations


def _map(
    spec: MappingSpec, body: bytes, fmt: SourceFormat | None, summary: Summary, validator: Any
) -> list[MappedRecord]:
    records = []
    for batch in run(spec, io.BytesIO(body), validator, summary, batch_size=1000, format=fmt):
        records.extend(batch.records)
    return records


async def _store(
    store: ResourceStore, records: list[MappedRecord]
) -> list[tuple[MappedRecord, AdapterError | None, list[OperationResult]]]:
    """Store each record in a transaction of its own; the store commits the window's together."""
    try:
        outcomes = await store.transactions([_operations(record) for record in records])
    except AdapterError:
        # The shared commit failed as a whole (another writer held the store): each on its own.
        outcomes = []
        for record in records:
            try:
                outcomes.append(await store.transaction(_operations(record)))
            except AdapterError as exc:
                outcomes.append(exc)
    return [
        (record, outcome, []) if isinstance(outcome, AdapterError) else (record, None, outcome)
        for record, outcome in zip(records, outcomes, strict=True)
    ]


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
    records = await anyio.to_thread.run_sync(_map, spec, body, chosen, summary, found.profile_validator)
    created = stored_records = 0
    stored: list[MappedResource] = []
    mapped = [record for record in records if record.error is None and record.resources]
    for start in range(0, len(mapped), _WINDOW):
        window = mapped[start : start + _WINDOW]
        for record, error, results in await _store(found.store, window):
            if error is None:
                created += sum(1 for result in results if result.created and not result.matched)
                stored_records += 1
                # What was stored, under the id it has: a conditional create that matched a
                # resource stored before keeps that resource's id.
                stored.extend(MappedResource({"resourceType": result.type, "id": result.id}) for result in results)
                continue
            summary.refuse(record.number, f"not stored: {error.message}")
    if stored:
        unique = list({item.resource["id"]: item for item in stored}.values())
        trail = provenance(spec, f"$ingest?mapping={spec.name}", unique).resource
        # The resources are stored under their deterministic ids: target them as Type/id.
        trail = references_to_ids(trail, {item.resource["id"]: item.resource["resourceType"] for item in unique})
        await found.store.transaction(
            [
                Operation.create(
                    trail, id=trail["id"], if_none_exist=condition("Provenance", f"_id={trail['id']}", "_id")
                )
            ]
        )
    return render(_outcome(summary, created, stored_records), fmt, 200)
