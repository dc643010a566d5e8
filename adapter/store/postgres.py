"""``PostgresStore``: a :class:`~adapter.store.base.ResourceStore` on PostgreSQL, with psycopg 3.

Same semantics as :class:`adapter.store.sqlite.SQLiteStore` (versions, ``lastUpdated`` from the
store's clock as fixed-width text, key order, If-Match forms, deletes, all-or-nothing transactions,
history newest first). Layout: ``resources`` (current version of each resource) and ``history``
(every version). Each row keeps the FHIR JSON twice: ``json`` is the exact text written by
:func:`adapter.fhir.json_format.dumps` and is what reads return (so ``0.40`` stays ``0.40``), and
``content`` is the same text as ``jsonb`` for search later. Both are NULL for a delete.
``history.seq`` (a bigserial) breaks ties between versions written in the same millisecond.

Concurrency. A store holds one async connection (autocommit, opened on first use or by
``async with``); an :class:`asyncio.Lock` lets one call at a time use it, in arrival order. Each
write call is one transaction that first takes a transaction-level advisory lock for every
resource it touches (``pg_advisory_xact_lock`` on a hash of type and id) and only then reads the
current version, so two writers with the same If-Match, on one store or many, cannot both win,
and two creates of one new client id are serialised instead of clashing. A writer that waits longer
than ``lock_timeout`` for a lock, or is picked as a deadlock victim, gets :class:`Conflict`. If a
call is interrupted (cancelled) mid-statement the connection is dropped, which rolls its
transaction back on the server, and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

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

__all__ = ["PostgresStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type text NOT NULL,
    id text NOT NULL,
    version integer NOT NULL,
    last_updated text NOT NULL,
    deleted boolean NOT NULL,
    json text,
    content jsonb,
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS history (
    seq bigserial NOT NULL UNIQUE,
    type text NOT NULL,
    id text NOT NULL,
    version integer NOT NULL,
    last_updated text NOT NULL,
    deleted boolean NOT NULL,
    json text,
    content jsonb,
    PRIMARY KEY (type, id, version)
);
CREATE INDEX IF NOT EXISTS history_by_time ON history (last_updated, seq);
CREATE INDEX IF NOT EXISTS history_by_type_time ON history (type, last_updated, seq);
"""

# Only one session at a time may run the CREATE ... IF NOT EXISTS statements (they race otherwise).
_SCHEMA_LOCK = 0x5350_4648_4952  # "SPFHIR"

_PUT_RESOURCE = """
INSERT INTO resources (type, id, version, last_updated, deleted, json, content)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (type, id) DO UPDATE SET
    version = EXCLUDED.version,
    last_updated = EXCLUDED.last_updated,
    deleted = EXCLUDED.deleted,
    json = EXCLUDED.json,
    content = EXCLUDED.content
"""
_PUT_HISTORY = """
INSERT INTO history (type, id, version, last_updated, deleted, json, content)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)
"""

# Errors of a write that lost against another writer: report them as 409 Conflict.
_CONTENTION = (
    pg_errors.LockNotAvailable,
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
    pg_errors.UniqueViolation,
)

Connection = psycopg.AsyncConnection[tuple[Any, ...]]


class PostgresStore:
    """A :class:`~adapter.store.base.ResourceStore` in one PostgreSQL database (``dsn``: a libpq
    connection string or URI).

    Nothing connects in the constructor: the first call (or ``async with``) opens the connection
    and creates the schema when missing. ``clock`` returns the current time (aware) and is there
    for tests; ``lock_timeout`` (seconds) bounds the wait for another writer of the same resource.
    """

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], datetime] | None = None,
        lock_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock_timeout_ms = max(1, round(lock_timeout * 1000))
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> PostgresStore:
        async with self._lock:
            await self._connection()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _connection(self) -> Connection:
        """The open connection (call with ``self._lock`` held); opens it and the schema when needed."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn: Connection = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        try:
            await conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                await conn.execute(_SCHEMA)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _drop_if_busy(self) -> None:
        """After an interrupted call: a connection left mid-query or mid-transaction is closed."""
        conn = self._conn
        if conn is not None and conn.info.transaction_status != TransactionStatus.IDLE:
            self._conn = None
            await conn.close()

    async def _write(self, operations: list[Operation]) -> list[OperationResult]:
        """Apply ``operations`` in one transaction; any error rolls all of them back."""
        async with self._lock:
            conn = await self._connection()
            now = instant(self._clock())
            try:
                async with conn.transaction(), conn.cursor() as cursor:
                    seen: set[tuple[str, str]] = set()
                    return [await self._apply(cursor, operation, now, seen) for operation in operations]
            except _CONTENTION as exc:
                raise Conflict(f"the change clashed with another writer: {exc}") from exc
            finally:
                await self._drop_if_busy()

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._lock:
            conn = await self._connection()
            try:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchall()
            finally:
                await self._drop_if_busy()

    # -- the interactions -------------------------------------------------------------------------

    async def create(self, resource: Resource) -> Resource:
        result = await self._write([Operation.create(resource)])
        assert result[0].resource is not None
        return result[0].resource

    async def read(self, type: str, id: str) -> Resource:
        rows = await self._fetch("SELECT version, deleted, json FROM resources WHERE type = %s AND id = %s", (type, id))
        if not rows:
            raise NotFound(f"{type}/{id} is not known")
        version, deleted, text = rows[0]
        if deleted or text is None:
            raise Gone(f"{type}/{id} was deleted (version {version})")
        resource: Resource = loads(text)
        return resource

    async def vread(self, type: str, id: str, version: str) -> Resource:
        # Only what fits an integer column can be a version; anything else is simply not found.
        number = int(version) if version.isdecimal() and len(version) <= 9 else None
        rows: list[tuple[Any, ...]] = []
        if number is not None:
            rows = await self._fetch(
                "SELECT deleted, json FROM history WHERE type = %s AND id = %s AND version = %s", (type, id, number)
            )
        if not rows:
            raise NotFound(f"{type}/{id} has no version {version!r}")
        deleted, text = rows[0]
        if deleted or text is None:
            raise Gone(f"version {version} of {type}/{id} is a delete")
        resource: Resource = loads(text)
        return resource

    async def update(self, resource: Resource, if_match: str | None = None) -> tuple[Resource, bool]:
        result = (await self._write([Operation.update(resource, if_match=if_match)]))[0]
        assert result.resource is not None
        return result.resource, result.created

    async def delete(self, type: str, id: str, if_match: str | None = None) -> None:
        await self._write([Operation.delete(type, id, if_match=if_match)])

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
        # seq is insertion order: it breaks ties between versions written in the same millisecond.
        sql, params = history_query(
            type, id, None if since is None else instant(since), count, placeholder="%s", tiebreak="seq"
        )
        return history_entries(await self._fetch(sql, params))

    async def transaction(self, operations: Sequence[Operation]) -> list[OperationResult]:
        return await self._write(list(operations))

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    # -- inside a write transaction ---------------------------------------------------------------

    async def _apply(
        self,
        cursor: psycopg.AsyncCursor[tuple[Any, ...]],
        operation: Operation,
        now: str,
        seen: set[tuple[str, str]],
    ) -> OperationResult:
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

        # Held to the end of the transaction: every other writer of this resource waits here.
        await cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{operation.type}/{id}",))
        await cursor.execute(
            "SELECT version, deleted FROM resources WHERE type = %s AND id = %s FOR UPDATE", (operation.type, id)
        )
        row = await cursor.fetchone()
        current = None if row is None else (int(row[0]), bool(row[1]))
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
            version, deleted = current
            if deleted:
                return OperationResult(operation.type, id, str(version), False, None)
            await self._put(cursor, operation.type, id, version + 1, now, None)
            return OperationResult(operation.type, id, str(version + 1), False, None)

        assert operation.resource is not None
        if operation.method == "create" and current is not None:
            raise Conflict(f"{operation.type}/{id} exists already")
        version = 1 if current is None else current[0] + 1
        stamped = with_meta(operation.resource, id, version, now)
        text = dumps(stamped).decode("utf-8")
        await self._put(cursor, operation.type, id, version, now, text)
        created = current is None or current[1]
        return OperationResult(operation.type, id, str(version), created, loads(text))

    @staticmethod
    async def _put(
        cursor: psycopg.AsyncCursor[tuple[Any, ...]], type: str, id: str, version: int, now: str, text: str | None
    ) -> None:
        row = (type, id, version, now, text is None, text, text)
        await cursor.execute(_PUT_RESOURCE, row)
        await cursor.execute(_PUT_HISTORY, row)
