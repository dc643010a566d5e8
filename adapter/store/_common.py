"""Pieces shared by the SQL implementations of the ``ResourceStore`` seam (SQLite, PostgreSQL).

Id and type checks, the store's meta stamping, instants, If-Match parsing, and the history query,
which differs between the two only in its tie-breaking column.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from adapter.errors import InputError
from adapter.fhir.json_format import loads
from adapter.store.base import HistoryEntry

Resource = dict[str, Any]

# https://hl7.org/fhir/R4/datatypes.html#id
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
# If-Match carries an ETag, W/"<versionId>" (https://hl7.org/fhir/R4/http.html#concurrency).
_ETAG = re.compile(r'(?:W/)?"([^"]*)"')


def instant(moment: datetime) -> str:
    """A FHIR instant in UTC with milliseconds; fixed width, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("a store timestamp needs a time zone")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def version_of(if_match: str) -> str:
    match = _ETAG.fullmatch(if_match.strip())
    return match.group(1) if match else if_match.strip()


def check_type(type: object) -> None:
    if not isinstance(type, str) or not _TYPE.fullmatch(type):
        raise InputError(f"not a resource type: {type!r}", expression="resourceType")


def check_id(id: object) -> str:
    if not isinstance(id, str) or not _ID.fullmatch(id):
        raise InputError(f"not a valid resource id: {id!r}", expression="id")
    return id


def with_meta(resource: Resource, id: str, version: int, last_updated: str) -> Resource:
    """``resource`` with the store's id and meta, in the usual order (resourceType, id, meta, rest)."""
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = last_updated
    stamped: Resource = {"resourceType": resource["resourceType"], "id": id, "meta": meta}
    for key, value in resource.items():
        if key not in stamped:
            stamped[key] = value
    return stamped


def history_query(
    type: str | None, id: str | None, since: str | None, count: int | None, *, tiebreak: str
) -> tuple[str, list[Any]]:
    """SQL and parameters for instance, type or system history, newest first.

    ``tiebreak`` is the insertion-order column that orders versions written in the same millisecond.
    """
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("type", type), ("id", id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("last_updated >= ?")
        params.append(since)
    sql = "SELECT type, id, version, last_updated, deleted, json FROM history"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY last_updated DESC, {tiebreak} DESC"
    if count is not None:
        sql += " LIMIT ?"
        params.append(count)
    return sql, params


def history_entries(rows: Sequence[Sequence[Any]]) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            type=row[0],
            id=row[1],
            version_id=str(row[2]),
            last_updated=row[3],
            deleted=bool(row[4]),
            resource=None if row[5] is None else loads(row[5]),
        )
        for row in rows
    ]


def rewrite_references(value: Any, mapping: dict[str, str]) -> Any:
    """``value`` with every ``reference`` that is a key of ``mapping`` replaced by its value: how a
    transaction turns ``urn:uuid:`` fullUrls into the ``Type/id`` of what it created
    (https://hl7.org/fhir/R4/http.html#trules). Returns ``value`` itself when nothing changes, and
    copies only the objects and arrays on the way to a changed reference."""
    if isinstance(value, dict):
        return _rewritten(value, value.items(), mapping)
    if isinstance(value, list):
        return _rewritten(value, enumerate(value), mapping)
    return value


def _rewritten(value: Any, members: Iterable[tuple[Any, Any]], mapping: dict[str, str]) -> Any:
    """:func:`rewrite_references` of an object (``members`` its items) or array (its enumerate)."""
    changed: Any = None
    for key, item in members:
        if isinstance(item, str):  # most values: only an object's "reference" can change
            if key != "reference" or item not in mapping:
                continue
            new: Any = mapping[item]
        elif isinstance(item, dict):
            new = _rewritten(item, item.items(), mapping)
        elif isinstance(item, list):
            new = _rewritten(item, enumerate(item), mapping)
        else:
            continue
        if new is not item:
            if changed is None:
                changed = value.copy()
            changed[key] = new
    return value if changed is None else changed
