"""``spfhir unmap``: read FHIR resources from files and write flat records (CSV or NDJSON).

Input: Bundles (any type: the transaction Bundles ``spfhir map`` writes, searchsets, collections),
single resources, NDJSON, JSON or XML, or folders of them (:mod:`adapter.fhir.sources`).
"""

from __future__ import annotations

import csv
import importlib
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


def _read(path: Path) -> Iterator[dict[str, Any]]:
    for source in iter_sources([str(path)]):
        if source.error is not None or source.resource is None:
            raise InputError(f"{source.label}: {source.error}")
        yield source.resource


def _resources(path: Path) -> Iterator[dict[str, Any]]:
    for resource in _read(path):
        if resource.get("resourceType") == "Bundle" and resource.get("type") != "document":
            for entry in resource.get("entry") or ():
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    yield entry["resource"]
        else:
            yield resource


def unmap_files(name: str, path: Path, output: str) -> int:
    """Write the records of the resources under ``path`` to ``output``; returns how many."""
    spec = load(name)
    reverse = spec.raw.get("reverse") or {}
    columns: list[str]
    if spec.build is not None:
        # A mapping built by code reports through its own flatten function (``reverse.flatten``):
        # over all the resources read, or over each document Bundle.
        if not reverse.get("flatten"):
            raise InputError(f"mapping {name!r} has no reverse mapping", expression="mapping")
        module, _, function = str(reverse["flatten"]).partition(":")
        imported = importlib.import_module(module)
        flatten = getattr(imported, function)
        columns = list(imported.COLUMNS)
        if reverse.get("input") == "documents":
            documents = [item for item in _read(path) if item.get("type") == "document"]
            records: list[dict[str, Any]] = [row for document in documents for row in flatten(document)]
        else:
            records = list(flatten(list(_resources(path))))
    else:
        records = list(unmap(spec, Resolver(_resources(path))))
        columns = [field.name for field in spec.fields]
    target = Path(output)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if output.endswith((".ndjson", ".jsonl")):
            temporary.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
        else:
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
