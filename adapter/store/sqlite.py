"""``SQLiteStore``: the embedded default :class:`~adapter.store.base.ResourceStore`, on stdlib ``sqlite3``.

Layout (architecture decision 3): ``resources`` holds the current version of each resource and
``history`` every version, both as FHIR JSON text from :func:`adapter.fhir.json_format.dumps`
(``json`` is NULL for a delete). No search yet: a later slice adds index tables derived from
SearchParameter definitions.

Concurrency. Every call runs on one dedicated worker thread that owns the only connection
(a single-thread executor, so calls run one at a time in arrival order and the event loop never
waits on SQLite). If the awaiting task is cancelled, a call already running still finishes on
that thread before the next one starts, so the connection is never shared. Each write call is one
SQLite transaction opened with ``BEGIN IMMEDIATE``: it takes the write lock before reading the
current version, so two writers (other processes, or other stores on the same file) with the same
If-Match cannot both win; a writer that waits longer than ``busy_timeout`` gets :class:`Conflict`.
Files use WAL (readers do not block the writer) with ``synchronous=FULL``, so a committed change
survives a crash of the process or the machine (https://www.sqlite.org/wal.html).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from adapter.errors import InputError
from adapter.fhir.json_format import dumps, loads
from adapter.store._common import (
    check_id,
    check_type,
    history_entries,
    history_query,
    instant,
    version_of,
    with_meta,
)
from adapter.store.base import (
    Conflict,
    Gone,
    HistoryEntry,
    NotFound,
    Operation,
    OperationResult,
    Resource,
    VersionConflict,
)

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    json TEXT,
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS history (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    json TEXT,
    PRIMARY KEY (type, id, version)
);
CREATE INDEX IF NOT EXISTS history_by_time ON history (last_updated);
CREATE INDEX IF NOT EXISTS history_by_type_time ON history (type, last_updated);
"""


class SQLiteStore:
    """A :class:`~adapter.store.base.ResourceStore` in one SQLite file, or ``":memory:"``.

    The constructor opens the database and creates the schema (a short blocking step meant for
    start-up); ``clock`` returns the current time (aware) and is there for tests.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 5.0,
    ) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._closed = False
        try:
            self._conn: sqlite3.Connection = self._executor.submit(self._open, str(path), busy_timeout).result()
        except BaseException:
            self._executor.shutdown()
            raise

    @staticmethod
    def _open(path: str, busy_timeout: float) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE itself.
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            if path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def __aenter__(self) -> SQLiteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise RuntimeError("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _write(self, operations: list[Operation]) -> list[OperationResult]:
        """Apply ``operations`` inside one ``BEGIN IMMEDIATE`` transaction; roll back on any error."""
        now = self._now()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise Conflict(f"the store is locked by another writer: {exc}") from exc
        try:
            seen: set[tuple[str, str]] = set()
            result = [self._apply(operation, now, seen) for operation in operations]
            self._conn.commit()
        except BaseException:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise
        return result

    # -- the interactions -------------------------------------------------------------------------

    async def create(self, resource: Resource) -> Resource:
        result = await self._run(self._write, [Operation.create(resource)])
        assert result[0].resource is not None
        return result[0].resource

    async def read(self, type: str, id: str) -> Resource:
        return await self._run(self._read, type, id)

    async def vread(self, type: str, id: str, version: str) -> Resource:
        return await self._run(self._vread, type, id, version)

    async def update(self, resource: Resource, if_match: str | None = None) -> tuple[Resource, bool]:
        operation = Operation.update(resource, if_match=if_match)
        result = (await self._run(self._write, [operation]))[0]
        assert result.resource is not None
        return result.resource, result.created

    async def delete(self, type: str, id: str, if_match: str | None = None) -> None:
        operation = Operation.delete(type, id, if_match=if_match)
        await self._run(self._write, [operation])

    async def history(
        self,
        type: str | None = None,
        id: str | None = None,
        since: datetime | None = None,
        count: int | None = None,
    ) -> list[HistoryEntry]:
        if id is not None and type is None:
            raise ValueError("instance history needs the type as well as the id")
        if count is not None and count < 0:
            raise ValueError("count must not be negative")
        return await self._run(self._history, type, id, None if since is None else instant(since), count)

    async def transaction(self, operations: Sequence[Operation]) -> list[OperationResult]:
        return await self._run(self._write, list(operations))

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._conn.close)
        self._closed = True
        self._executor.shutdown(wait=True)

    # -- on the worker thread ---------------------------------------------------------------------

    def _now(self) -> str:
        return instant(self._clock())

    def _current(self, type: str, id: str) -> tuple[int, bool, str | None] | None:
        row = self._conn.execute(
            "SELECT version, deleted, json FROM resources WHERE type = ? AND id = ?", (type, id)
        ).fetchone()
        return None if row is None else (row[0], bool(row[1]), row[2])

    def _read(self, type: str, id: str) -> Resource:
        current = self._current(type, id)
        if current is None:
            raise NotFound(f"{type}/{id} is not known")
        version, deleted, text = current
        if deleted or text is None:
            raise Gone(f"{type}/{id} was deleted (version {version})")
        resource: Resource = loads(text)
        return resource

    def _vread(self, type: str, id: str, version: str) -> Resource:
        number = int(version) if version.isdecimal() else None
        row = None
        if number is not None:
            row = self._conn.execute(
                "SELECT deleted, json FROM history WHERE type = ? AND id = ? AND version = ?", (type, id, number)
            ).fetchone()
        if row is None:
            raise NotFound(f"{type}/{id} has no version {version!r}")
        if row[0] or row[1] is None:
            raise Gone(f"version {version} of {type}/{id} is a delete")
        resource: Resource = loads(row[1])
        return resource

    def _history(self, type: str | None, id: str | None, since: str | None, count: int | None) -> list[HistoryEntry]:
        # rowid is insertion order: it breaks ties between versions written in the same millisecond.
        sql, params = history_query(type, id, since, count, placeholder="?", tiebreak="rowid")
        return history_entries(self._conn.execute(sql, params).fetchall())

    def _apply(self, operation: Operation, now: str, seen: set[tuple[str, str]]) -> OperationResult:
        if operation.resource is not None:
            check_type(operation.resource.get("resourceType"))
            if operation.resource["resourceType"] != operation.type:
                raise InputError("the operation's type is not the resource's resourceType", expression="resourceType")
        check_type(operation.type)
        if operation.method == "create":
            id = str(uuid.uuid4()) if operation.id is None else check_id(operation.id)
        else:
            id = check_id(operation.id)
        key = (operation.type, id)
        if key in seen:
            # https://hl7.org/fhir/R4/http.html#trules: overlapping identities SHALL fail the transaction.
            raise Conflict(f"{operation.type}/{id} is changed twice in one transaction")
        seen.add(key)
        current = self._current(operation.type, id)
        if operation.if_match is not None:
            expected = version_of(operation.if_match)
            if current is None or str(current[0]) != expected:
                actual = "none" if current is None else str(current[0])
                raise VersionConflict(
                    f"If-Match {operation.if_match} does not match {operation.type}/{id} (current version: {actual})"
                )

        if operation.method == "delete":
            if current is None:
                raise NotFound(f"{operation.type}/{id} is not known")
            version, deleted, _ = current
            if deleted:
                return OperationResult(operation.type, id, str(version), False, None)
            self._put(operation.type, id, version + 1, now, None)
            return OperationResult(operation.type, id, str(version + 1), False, None)

        assert operation.resource is not None
        if operation.method == "create" and current is not None:
            raise Conflict(f"{operation.type}/{id} exists already")
        version = 1 if current is None else current[0] + 1
        stamped = with_meta(operation.resource, id, version, now)
        text = dumps(stamped).decode("utf-8")
        self._put(operation.type, id, version, now, text)
        created = current is None or current[1]
        return OperationResult(operation.type, id, str(version), created, loads(text))

    def _put(self, type: str, id: str, version: int, now: str, text: str | None) -> None:
        row = (type, id, version, now, int(text is None), text)
        self._conn.execute("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?)", row)
        self._conn.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?)", row)
