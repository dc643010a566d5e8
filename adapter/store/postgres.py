"""``PostgresStore``: a :class:`~adapter.store.base.ResourceStore` on PostgreSQL, with psycopg 3.

Everything but the connection is shared with SQLite in :class:`adapter.store.sql.SQLStore` (same
tables, same SQL, same semantics). Each row also keeps the resource as ``jsonb`` (``content``) for
ad-hoc queries and reporting in SQL; reads return the exact ``json`` text (so ``0.40`` stays
``0.40``). ``history.seq`` (a bigserial) breaks ties between versions
written in the same millisecond.

Concurrency. The store holds one connection (autocommit; a write is an explicit ``BEGIN`` ...
``COMMIT``), opened on first use or by ``async with``. A write first takes a transaction-level
advisory lock for every resource it touches (``pg_advisory_xact_lock`` on a hash of type and id,
and of the criteria of a conditional operation) and only then reads the current version, so two
writers with the same If-Match, on one store or many, cannot both win, two creates of one new
client id are serialised instead of clashing, and two conditional creates with the same
``If-None-Exist`` cannot both create. A writer that waits longer than ``lock_timeout`` for a lock,
or is picked as a deadlock victim, gets :class:`~adapter.errors.Conflict`. A cancelled call sends
the server a cancel request, which rolls its transaction back; a broken connection is replaced on
the next call.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from adapter.errors import InputError
from adapter.search.query import SearchQuery
from adapter.store._housekeeping import Housekeeping
from adapter.store._search_sql import (
    INDEX_INSERT_COLUMNS,
    INDEX_TABLES,
    KEY_CHARS,
    index_key,
    index_schema,
    text_value_indexes,
)
from adapter.store.base import Resource, SearchResult
from adapter.store.sql import READ_SQL, Rows, SQLStore, Steps, _Batch, run_steps_async

__all__ = ["PostgresStore"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type text NOT NULL,
    id text NOT NULL,
    version integer NOT NULL,
    last_updated text NOT NULL,
    deleted boolean NOT NULL,
    json text,
    content jsonb,
    rid bigint,
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

#: Bump when the definition of an index changes: a database whose ``store_meta`` holds another
#: (or none) gets the indexes of :func:`adapter.store._search_sql.text_value_indexes` dropped and
#: created again at start-up (:func:`_replace_stale_indexes`); the rows stay as they are.
INDEX_DEFINITIONS = "2"  # 2: token codes and strings indexed by their first KEY_CHARS characters (#3)


def _upgrade(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Inside the schema transaction: bring a database made before index version 3 to the current
    tables: ``resources`` gets its ``rid`` column, and the index tables, keyed by (type, id) then,
    are dropped to be made again (:meth:`SQLStore._reindex_if_stale` refills them)."""
    conn.execute("ALTER TABLE IF EXISTS resources ADD COLUMN IF NOT EXISTS rid bigint")
    stale = conn.execute(
        "SELECT t.table_name FROM information_schema.tables t WHERE t.table_schema = current_schema()"
        " AND t.table_name = ANY(%s) AND NOT EXISTS (SELECT 1 FROM information_schema.columns c"
        " WHERE c.table_schema = t.table_schema AND c.table_name = t.table_name AND c.column_name = 'rid')",
        (list(INDEX_TABLES),),
    ).fetchall()
    for (table,) in stale:
        conn.execute(f"DROP TABLE {table}")


def _replace_stale_indexes(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Inside the schema transaction: give a database created with other index definitions
    (before 2, whole token codes and strings, which PostgreSQL could not index beyond about
    2,700 bytes) the current ones, once."""
    row = conn.execute("SELECT value FROM store_meta WHERE key = 'index_definitions'").fetchone()
    if row is not None and row[0] == INDEX_DEFINITIONS:
        return
    for name, create in text_value_indexes(KEY_CHARS).items():
        conn.execute(f"DROP INDEX IF EXISTS {name}")
        conn.execute(create)
    conn.execute(
        "INSERT INTO store_meta (key, value) VALUES ('index_definitions', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (INDEX_DEFINITIONS,),
    )


#: Versions written between two looks at whether the planner statistics are stale.
_STATISTICS_CHECK_EVERY = 500
#: The tables whose statistics the planner uses for the store's statements.
_ANALYZED_TABLES = ("resources", "history", *INDEX_TABLES)


class _Statistics:
    """Keeps the planner statistics of a store's tables fresh during bulk writes: ANALYZE once the
    store has written more versions since its last ANALYZE than the table had rows then (50 for a
    table never analyzed), so a growing table is analyzed each time it doubles. Autovacuum looks
    only once a minute (autovacuum_naptime,
    https://www.postgresql.org/docs/current/routine-vacuuming.html#VACUUM-FOR-STATISTICS), and
    until then the planner takes freshly loaded tables as nearly empty: the NHS-number chained
    search took 1.6 ms instead of 0.19 ms a statement, scanning sp_reference (docs/benchmarks.md,
    https://www.postgresql.org/docs/current/populate.html#POPULATE-ANALYZE); beyond doubling,
    autovacuum's own 10% threshold keeps them fresh. It runs on a thread and connection of its own
    (:class:`Housekeeping`): on the writer's, each ANALYZE held up that worker's writes (create p99
    129 ms), and at autovacuum's 10% it ran every 500 creates (p99 57 ms). The count is the
    store's own, not the statistics collector's, which lags by up to a second."""

    def __init__(self, dsn: str) -> None:
        self._lock = threading.Lock()
        self._unanalyzed = 0
        self._thread = Housekeeping(
            "postgres-statistics",
            lambda: psycopg.connect(dsn, autocommit=True),
            self._analyze,
            (psycopg.Error,),
            0.0,
        )

    def written(self, versions: int) -> None:
        with self._lock:
            self._unanalyzed += versions
        self._thread.wake()

    def stop(self) -> None:
        self._thread.stop()

    def _analyze(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'resources'::regclass").fetchone()
        # reltuples: -1 for a table never analyzed (PostgreSQL 14 and later).
        rows = max(float(row[0]), 0.0) if row is not None else 0.0
        with self._lock:
            if self._unanalyzed <= max(rows, 50.0):
                return
            self._unanalyzed = 0
        for table in _ANALYZED_TABLES:
            # SKIP_LOCKED: a table autovacuum is analyzing right now is left to it. ANALYZE samples
            # at most 30,000 rows a table; writers and readers do not wait for its lock.
            conn.execute(f"ANALYZE (SKIP_LOCKED) {table}")


#: Numbers of history's sequence that :meth:`PostgresStore._take_rid` takes at a time.
_RIDS_TAKEN = 256

#: Rows from which ``COPY`` beats ``executemany`` (:meth:`PostgresStore._execute_all`).
_COPY_FROM = 64


def _nul_path(value: Any, path: str) -> str | None:
    """The FHIRPath of the first string in ``value`` (or key) that holds U+0000, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return path
            found = _nul_path(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


# Errors of a write that lost against another writer: reported as 409 Conflict.
_CONTENTION = (
    pg_errors.LockNotAvailable,
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
    pg_errors.UniqueViolation,
    pg_errors.QueryCanceled,
)


def _execute_on(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> Callable[[str, Sequence[Any]], Awaitable[Rows]]:
    async def execute(sql: str, params: Sequence[Any]) -> Rows:
        cursor = await conn.execute(sql.replace("?", "%s"), params)
        return await cursor.fetchall()

    return execute


class PostgresStore(SQLStore):
    """A :class:`~adapter.store.base.ResourceStore` in one PostgreSQL database (``dsn``: a libpq
    connection string or URI).

    Nothing connects in the constructor: the first call (or ``async with``) opens the connection
    and creates the schema when missing. ``clock`` returns the current time (aware) and is there
    for tests; ``lock_timeout`` (seconds) bounds the wait for another writer of the same resource.
    """

    tiebreak = "seq"
    key_chars = KEY_CHARS
    current_sql = "SELECT version, deleted, json, rid FROM resources WHERE type = ? AND id = ? FOR UPDATE"
    row_lock = " FOR UPDATE"

    put_resource_sql = """
        INSERT INTO resources (rid, type, id, version, last_updated, deleted, json, content)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?::jsonb)
        ON CONFLICT (type, id) DO UPDATE SET rid = excluded.rid, version = excluded.version,
            last_updated = excluded.last_updated, deleted = excluded.deleted, json = excluded.json,
            content = excluded.content
    """
    put_history_sql = """
        INSERT INTO history (seq, type, id, version, last_updated, deleted, json, content)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?::jsonb)
    """

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], datetime] | None = None,
        lock_timeout: float = 5.0,
        readers: int = 4,
    ) -> None:
        super().__init__(clock, "postgres-store")
        self._dsn = dsn
        self._lock_timeout_ms = max(1, round(lock_timeout * 1000))
        self._reader_count = max(1, readers)
        self._readers: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] | None = None
        # While _flush runs: the large INSERTs it leaves to COPY once the pipeline is done.
        self._copy_after: list[tuple[str, list[tuple[Any, ...]]]] | None = None
        # SQL of an executemany -> the COPY that writes the same rows (_execute_all).
        self._copies = {
            sql: f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            for sql, (table, columns) in INDEX_INSERT_COLUMNS.items()
        }
        self._copies[self.put_history_sql] = (
            "COPY history (seq, type, id, version, last_updated, deleted, json, content) FROM STDIN"
        )
        # rids taken from history's sequence and not yet used (_take_rid).
        self._rids: list[int] = []
        # Versions written since the count was last handed to the statistics thread (_committed).
        self._unchecked = 0
        self._statistics: _Statistics | None = None

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(self._dsn, autocommit=True)

        def setup() -> None:
            conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            _upgrade(conn)
            conn.execute(_SCHEMA + index_schema(KEY_CHARS))
            _replace_stale_indexes(conn)

        return self._adopt(conn, setup)  # type: ignore[no-any-return]

    async def _reader_pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]:
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._readers is None:
            await self._run(lambda: None)  # the worker's connection creates the schema when missing
            pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
                self._dsn, min_size=1, max_size=self._reader_count, kwargs={"autocommit": True}, open=False
            )
            await pool.open(wait=True)
            if self._readers is None:
                self._readers = pool
            else:  # another task opened one meanwhile
                await pool.close()
        return self._readers

    async def _on_reader(self, steps: Callable[[], Steps[_T]]) -> _T:
        """Run a read (``steps``, see :func:`adapter.store.sql.run_steps`) on a pooled connection.
        A connection the server dropped while it sat in the pool (a restart, an idle timeout) fails
        its first statement: the read is run once more on a fresh one; reads change nothing, so
        running one twice is safe."""
        reader: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        try:
            async with (await self._reader_pool()).connection() as reader:
                return await run_steps_async(steps(), _execute_on(reader))
        except psycopg.OperationalError:
            if reader is None or not reader.broken:
                raise
        # The pool has discarded the broken connection: once more, on another.
        async with (await self._reader_pool()).connection() as reader:
            return await run_steps_async(steps(), _execute_on(reader))

    async def read(self, type: str, id: str) -> Resource:
        """Reads go straight from the event loop over a small pool of async connections (autocommit,
        so each sees the latest commit): no hop to the worker thread, no wait behind a write, and
        concurrent requests overlap their round trips instead of queueing on one connection."""

        def steps() -> Steps[Resource]:
            return self._current_resource((yield READ_SQL, (type, id)), type, id)

        return await self._on_reader(steps)

    async def search(self, query: SearchQuery) -> SearchResult:
        """A search that fits on one page runs from the event loop over the reader pool, like a read
        (the same statements as on the worker thread: :meth:`SQLStore._one_page`); a longer one goes
        to the worker thread, which saves its result set for the paging links."""
        if query.count > 0 and not query.summary_count:
            found = await self._on_reader(lambda: self._one_page(query))
            if found is not None:
                return found
        return await super().search(query)

    async def close(self) -> None:
        readers, self._readers = self._readers, None
        if readers is not None:
            await readers.close()
        await super().close()
        # After the worker thread's last write, which may have started the statistics thread.
        statistics, self._statistics = self._statistics, None
        if statistics is not None:
            statistics.stop()

    def _flush(self, batch: _Batch) -> None:
        # One pipeline for all the statements of a write: one round trip instead of one each; then
        # the large INSERTs, by COPY (plain INSERTs only: after the index rows' deletes, in order).
        copies: list[tuple[str, list[tuple[Any, ...]]]] = []
        self._copy_after = copies
        try:
            with self._conn.pipeline():
                super()._flush(batch)
        finally:
            self._copy_after = None
        for sql, rows in copies:
            with self._conn.cursor() as cursor, cursor.copy(self._copies[sql]) as copy:
                for row in rows:
                    copy.write_row(row)
        self._unchecked += len(batch.versions)

    def _committed(self) -> None:
        """Every :data:`_STATISTICS_CHECK_EVERY` versions written, hand the count to the
        :class:`_Statistics` thread."""
        if self._unchecked >= _STATISTICS_CHECK_EVERY:
            if self._statistics is None:
                self._statistics = _Statistics(self._dsn)
            self._statistics.written(self._unchecked)
            self._unchecked = 0

    def _execute_all(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Many rows of an INSERT go by ``COPY`` (outside the pipeline, which cannot carry one):
        psycopg's ``executemany`` costs about 15 µs of Python per row, which made it most of a
        1,000-entry transaction's time (7,500 rows with the index); COPY formats rows in C."""
        if self._copy_after is not None and sql in self._copies and len(rows) >= _COPY_FROM:
            self._copy_after.append((sql, rows))  # after the pipeline: see _flush
        else:
            super()._execute_all(sql, rows)

    def _check_storable(self, resource: Resource, text: str) -> None:
        # PostgreSQL's text and jsonb cannot hold U+0000 (https://www.postgresql.org/docs/current/datatype-json.html),
        # which R4's string regex admits: a 400 naming the element, not the driver's DataError (a 500).
        if "\\u0000" in text:
            path = _nul_path(resource, resource.get("resourceType", "Resource"))
            raise InputError(
                "the text contains the character U+0000, which the PostgreSQL store cannot hold",
                expression=path or resource.get("resourceType", "Resource"),
            )

    def _row(self, rid: int, type: str, id: str, version: int, now: str, text: str | None) -> tuple[Any, ...]:
        return (rid, type, id, version, now, text is None, text, text)

    def _take_rid(self) -> int:
        """The next number of history's ``seq`` sequence, taken :data:`_RIDS_TAKEN` at a time:
        one round trip per window of ``$ingest`` rather than one per version. Writers of other
        connections take theirs from the same sequence, so no two versions share one; numbers
        never come back, even when the transaction that took them rolls back
        (https://www.postgresql.org/docs/15/functions-sequence.html)."""
        if not self._rids:
            rows = self._execute(
                "SELECT nextval(pg_get_serial_sequence('history', 'seq')) FROM generate_series(1, ?)", (_RIDS_TAKEN,)
            )
            self._rids = sorted((int(row[0]) for row in rows), reverse=True)
        return self._rids.pop()

    def _usable(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def _begin(self) -> None:
        try:
            self._conn.execute("BEGIN")
        except psycopg.OperationalError:
            if not self._conn.broken:
                raise
            # The server dropped the idle connection (a restart, an idle timeout). Nothing had
            # begun, so the transaction starts on a fresh connection instead of failing the write.
            self._reconnect()
            self._conn.execute("BEGIN")

    def _lock(self, key: str) -> None:
        # Held to the end of the transaction: every other writer of this key waits here.
        self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))

    def _lock_all(self, keys: Iterable[str]) -> None:
        # One round trip for them all; unnest gives the (sorted) array in order.
        ordered = sorted(set(keys))
        if ordered:
            self._conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(key, 0)) FROM unnest(%s::text[]) AS key", (ordered,)
            )

    def _token_rows(self, type: str, param: str, codes: list[str]) -> Rows:
        # One lookup of the (type, param, code) index per code, whatever the planner believes: on
        # a table filled since its last ANALYZE it takes (type, param) as selective enough and
        # filters every row of the parameter for the codes of an IN list. OFFSET 0 keeps the
        # LATERAL subquery from being flattened into such a join. The index holds the codes' keys.
        return self._execute(
            "SELECT t.code, t.system, t.id FROM unnest(?::text[]) AS v(code) CROSS JOIN LATERAL ("
            " SELECT s.code, s.system, s.id FROM sp_token s JOIN resources r ON r.type = s.type AND r.id = s.id"
            f" WHERE s.type = ? AND s.param = ? AND {index_key('s.code', KEY_CHARS)} = left(v.code, {KEY_CHARS})"
            " AND s.code = v.code AND NOT r.deleted OFFSET 0) AS t",
            [codes, type, param],
        )

    def _interrupt(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe()

    def _contention(self, exc: BaseException) -> bool:
        return isinstance(exc, _CONTENTION)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._conn.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description is not None else []

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)
