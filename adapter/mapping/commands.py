"""What ``spfhir map`` and ``spfhir unmap`` do; :mod:`adapter.cli` declares their options.

``map`` streams the input through the mapping and writes, by the form of ``-o``:

- ``OUT.ndjson``: one resource per line (references as ``Type/id``: ids are deterministic), the
  runs' Provenance included, as FHIR Bulk Data files are (https://hl7.org/fhir/uv/bulkdata/);
- ``DIR/`` (an existing directory, or a name ending in ``/``): one transaction Bundle file per batch;
- ``OUT.json`` or stdout: one transaction Bundle with every record;
- ``--to-server URL``: each batch POSTed to the FHIR server as a transaction, retried with backoff
  on 408/429/5xx and network errors; a batch the server refuses (4xx) is sent again record by
  record, so one bad record does not hold back the others.

Mappings whose output is a document (``message-back-to-gp``) write the document Bundle of each
record and, when the spec names a ``render`` function, its HTML rendering next to it. Files are
written to a temporary name and renamed when complete, so an interrupted run leaves no
half-written output.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from adapter.errors import AdapterError, InputError
from adapter.fhir.json_format import dumps
from adapter.mapping.base import MappedResource
from adapter.mapping.engine import references_to_ids, transaction_entry
from adapter.mapping.run import Batch, Summary, provenance, run
from adapter.mapping.spec import MappingSpec, SourceFormat, load
from adapter.validation import Validator

__all__ = ["map_records", "post_batches", "summary_lines"]

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_ATTEMPTS = 5
#: Unused fields listed in the summary's text (all of them are in --summary-json).
_SHOWN = 20


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            yield handle
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _validator() -> Validator:
    from adapter.validation.bundled import bundled_packages
    from adapter.validation.profiles import ProfileValidator

    return ProfileValidator(bundled_packages())


def _bundle_stream(handle: IO[bytes], batches: Iterator[Batch], spec: MappingSpec, source: str) -> None:
    """One transaction Bundle of every batch, written entry by entry, its Provenance last."""
    handle.write(b'{"resourceType":"Bundle","type":"transaction","entry":[')
    first = True
    seen: set[str] = set()
    kept = []
    for batch in batches:
        for item in batch.resources:
            if item.resource["id"] in seen:
                continue
            seen.add(item.resource["id"])
            # Only the type and id stay in memory, for the Provenance that closes the Bundle.
            kept.append(MappedResource({"resourceType": item.resource["resourceType"], "id": item.resource["id"]}))
            handle.write((b"" if first else b",") + dumps(transaction_entry(item)))
            first = False
    if kept:
        handle.write((b"" if first else b",") + dumps(transaction_entry(provenance(spec, source, kept))))
    handle.write(b"]}\n")


def _renderer(spec: MappingSpec) -> Callable[[dict[str, Any]], str] | None:
    """The spec's ``render: module:function`` (document to HTML), if it names one."""
    target = spec.raw.get("render")
    if not target:
        return None
    module, _, function = str(target).partition(":")
    found: Callable[[dict[str, Any]], str] = getattr(importlib.import_module(module), function)
    return found


def _documents(spec: MappingSpec, batches: Iterator[Batch], output: str | None) -> None:
    render_html = _renderer(spec)

    documents = [item.resource for batch in batches for item in batch.resources]
    if output is None or output == "-":
        if len(documents) > 1:
            raise InputError("several documents: write them to a directory (-o DIR/)", expression="output")
        if documents:
            sys.stdout.buffer.write(dumps(documents[0], indent=True))
        return
    target = Path(output)
    if output.endswith("/") or target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for document in documents:
            with _atomic(target / f"{document['id']}.json") as handle:
                handle.write(dumps(document, indent=True))
            if render_html is not None:
                with _atomic(target / f"{document['id']}.html") as handle:
                    handle.write(render_html(document).encode())
        return
    if len(documents) > 1:
        raise InputError("several documents: write them to a directory (-o DIR/)", expression="output")
    for document in documents:
        with _atomic(target) as handle:
            handle.write(dumps(document, indent=True))
        if render_html is not None:
            with _atomic(target.with_suffix(".html")) as handle:
                handle.write(render_html(document).encode())


def map_records(
    name: str,
    stream: IO[bytes],
    source: str,
    output: str | None,
    *,
    to_server: str | None = None,
    batch_size: int = 100,
    format: SourceFormat | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    on_record: Callable[[], None] | None = None,
    validator: Validator | None = None,
    processes: int = 1,
) -> Summary:
    """Map ``stream`` with mapping ``name``; write or send the result; return the summary."""
    spec = load(name)
    summary = Summary(spec.name, source)
    batches = run(
        spec,
        stream,
        validator or _validator(),
        summary,
        batch_size=batch_size,
        format=format,
        encoding=encoding,
        delimiter=delimiter,
        on_record=on_record,
        processes=processes,
    )
    if spec.output == "document":
        _documents(spec, batches, output)
        return summary
    if to_server is not None:
        post_batches(to_server, spec, batches, summary)
        return summary
    if output is None or output == "-":
        _bundle_stream(sys.stdout.buffer, batches, spec, source)
        sys.stdout.buffer.flush()
        return summary
    target = Path(output)
    if output.endswith("/") or target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for batch in batches:
            if batch.resources:
                with _atomic(target / f"bundle-{batch.index + 1:06d}.json") as handle:
                    handle.write(dumps(batch.bundle(spec, source)))
        return summary
    with _atomic(target) as handle:
        if output.endswith((".ndjson", ".jsonl")):
            for batch in batches:
                items = [*batch.resources, provenance(spec, source, batch.resources)] if batch.resources else []
                types = {item.resource["id"]: item.resource["resourceType"] for item in items}
                for item in items:
                    handle.write(dumps(references_to_ids(item.resource, types)) + b"\n")
        else:
            _bundle_stream(handle, batches, spec, source)
    return summary


def _post(client: httpx.Client, url: str, bundle: dict[str, Any]) -> httpx.Response:
    """POST a transaction, retrying what may succeed later; conditional creates make a retry of a
    transaction that did commit store nothing twice."""
    delay = 0.5
    for attempt in range(_ATTEMPTS):
        try:
            response = client.post(url, content=dumps(bundle), headers={"Content-Type": "application/fhir+json"})
            if response.status_code not in _RETRY_STATUS or attempt == _ATTEMPTS - 1:
                return response
            retry_after = response.headers.get("Retry-After", "")
            wait = float(retry_after) if retry_after.isdigit() else delay
        except httpx.TransportError as exc:
            if attempt == _ATTEMPTS - 1:
                raise InputError(f"cannot reach {url}: {exc}", expression="to-server") from exc
            wait = delay
        time.sleep(wait)
        delay *= 2
    raise AssertionError("unreachable")


def _diagnostics(response: httpx.Response) -> str:
    try:
        issues = orjson.loads(response.content).get("issue") or []
        return "; ".join(str(issue.get("diagnostics", issue.get("code", ""))) for issue in issues[:3])
    except (orjson.JSONDecodeError, AttributeError):
        return response.text[:200]


def post_batches(url: str, spec: MappingSpec, batches: Iterator[Batch], summary: Summary) -> None:
    """Send each batch to the FHIR server at ``url`` as a transaction Bundle."""
    with httpx.Client(timeout=60) as client:
        for batch in batches:
            if not batch.resources:
                continue
            response = _post(client, url, batch.bundle(spec, summary.source))
            if response.is_success:
                continue
            if response.status_code >= 500:
                raise AdapterError(f"{url} answered {response.status_code}: {_diagnostics(response)}")
            # Find the records the server refuses: each on its own.
            for record in batch.records:
                if record.error is not None or not record.resources:
                    continue
                single = Batch(batch.index, [record], record.resources)
                answer = _post(client, url, single.bundle(spec, summary.source))
                if not answer.is_success:
                    summary.refuse(
                        record.number, f"the server refused it ({answer.status_code}): {_diagnostics(answer)}"
                    )


def summary_lines(summary: Summary) -> list[str]:
    """The summary as a person reads it."""
    lines = [
        f"{summary.mapping}: {summary.records} records read, {summary.mapped} mapped, {summary.rejected} rejected; "
        f"{summary.resources} resources in {summary.batches} batches"
    ]
    for item in summary.rejections:
        where = f"record {item.record}" + (f", {item.field}" if item.field else "")
        lines.append(f"  rejected {where}: {item.reason}")
    if summary.rejected > len(summary.rejections):
        lines.append(f"  ... and {summary.rejected - len(summary.rejections)} more rejected")
    for text in summary.differences:
        lines.append(f"  differing: {text}")
    if summary.unused:
        shown = sorted(summary.unused.items())[:_SHOWN]
        more = f" ... and {len(summary.unused) - _SHOWN} more" if len(summary.unused) > _SHOWN else ""
        lines.append("unused fields: " + ", ".join(f"{name} ({count})" for name, count in shown) + more)
    if summary.defaults:
        lines.append(
            "defaults applied: " + ", ".join(f"{name} ({count})" for name, count in sorted(summary.defaults.items()))
        )
    return lines
