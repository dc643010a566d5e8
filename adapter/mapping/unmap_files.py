"""``spfhir unmap``: read FHIR resources from files and write flat records (CSV or NDJSON).

Input: Bundles (any type: the transaction Bundles ``spfhir map`` writes, searchsets, collections),
single resources, NDJSON, JSON or XML, or folders of them (:mod:`adapter.fhir.sources`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from adapter.errors import InputError
from adapter.fhir.sources import iter_sources
from adapter.mapping.reverse import Resolver, csv_cell, unmap
from adapter.mapping.spec import load

__all__ = ["unmap_files"]


def _resources(path: Path) -> Iterator[dict[str, Any]]:
    for source in iter_sources([str(path)]):
        if source.error is not None or source.resource is None:
            raise InputError(f"{source.label}: {source.error}")
        resource = source.resource
        if resource.get("resourceType") == "Bundle":
            for entry in resource.get("entry") or ():
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    yield entry["resource"]
        else:
            yield resource


def unmap_files(name: str, path: Path, output: str) -> int:
    """Write the records of the resources under ``path`` to ``output``; returns how many."""
    spec = load(name)
    if spec.build is not None:
        raise InputError(f"mapping {name!r} is built by code and has no reverse mapping here", expression="mapping")
    records = list(unmap(spec, Resolver(_resources(path))))
    target = Path(output)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if output.endswith((".ndjson", ".jsonl")):
            temporary.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
        else:
            columns = [field.name for field in spec.fields]
            text = io.StringIO(newline="")
            writer = csv.writer(text)
            writer.writerow(columns)
            for record in records:
                writer.writerow([csv_cell(record.get(column)) for column in columns])
            # With a byte order mark: Excel opens it as UTF-8, and the mapping reads it back.
            temporary.write_bytes(text.getvalue().encode("utf-8-sig"))
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return len(records)
