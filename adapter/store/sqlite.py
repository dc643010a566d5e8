"""``SQLiteStore``: the embedded default :class:`~adapter.store.base.ResourceStore`, on stdlib ``sqlite3``.

Everything but the connection is shared with PostgreSQL in :class:`adapter.store.sql.SQLStore`
(tables, search, conditional operations, transactions). Here: each write call is one SQLite
transaction opened with ``BEGIN IMMEDIATE``, which takes the database's write lock before the
current version is read, so two writers (other processes, or other stores on the same file) with
the same If-Match cannot both win; a writer that waits longer than ``busy_timeout`` gets
:class:`~adapter.errors.Conflict`. Files use WAL (readers do not block the writer). ``synchronous``
is ``NORMAL`` by default, SQLite's recommendation for WAL: every transaction is atomic and a
committed one survives the process being killed, but the last commits before a power cut or an OS
crash may be rolled back; ``FULL`` also survives those, at the cost of an fsync per commit (about
half the create throughput on this machine, docs/benchmarks.md) (https://www.sqlite.org/wal.html,
https://www.sqlite.org/pragma.html#pragma_synchronous).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from adapter.errors import Conflict
from adapter.search.query import SearchQuery
from adapter.store._search_sql import INDEX_SCHEMA
from adapter.store.base import Resource, SearchResult
from adapter.store.sql import READ_SQL, SQLStore

__all__ = ["SQLiteStore"]

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


class SQLiteStore(SQLStore):
    """A :class:`~adapter.store.base.ResourceStore` in one SQLite file, or ``":memory:"``.

    The constructor opens the database and creates the schema (a short blocking step meant for
    start-up); ``clock`` returns the current time (aware) and is there for tests.
    """

    # rowid is insertion order: it breaks ties between versions written in the same millisecond.
    tiebreak = "rowid"

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 5.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        super().__init__(clock, "sqlite-store")
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._reader: sqlite3.Connection | None = None
        try:
            self._executor.submit(self._call, lambda: None).result()
        except BaseException:
            self._executor.shutdown()
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE itself.
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        try:
            if self._path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self._synchronous == 'FULL' else 'NORMAL'}")
            # executescript commits first, so it runs before the store's write transaction.
            conn.executescript(_SCHEMA + INDEX_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return self._adopt(conn, lambda: None)  # type: ignore[no-any-return]

    async def read(self, type: str, id: str) -> Resource:
        """A read of a file database runs right here on the event loop's thread, on a read-only
        connection of its own: a primary-key lookup takes microseconds, less than handing it to the
        worker thread, and WAL readers never wait for the writer."""
        reader = self._read_connection()
        if reader is None:
            return await super().read(type, id)
        return self._current_resource(reader.execute(READ_SQL, (type, id)).fetchall(), type, id)

    async def search(self, query: SearchQuery) -> SearchResult:
        """A search that fits on one page runs here on the loop's thread, like a read; a longer one
        goes to the worker thread, which saves its result set for the paging links."""
        reader = self._read_connection()
        if reader is not None:
            found = self._one_page(query, lambda sql, params: reader.execute(sql, params).fetchall())
            if found is not None:
                return found
        return await super().search(query)

    def _read_connection(self) -> sqlite3.Connection | None:
        """The read-only connection used on the event loop's thread (None for ``:memory:``)."""
        if self._path == ":memory:" or self._closed:
            return None
        if self._reader is None:
            reader = sqlite3.connect(
                self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            reader.execute("PRAGMA query_only = ON")
            self._reader = reader
        return self._reader

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        await super().close()

    def _begin(self) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise Conflict(f"the store is locked by another writer: {exc}") from exc

    def _interrupt(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.interrupt()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()  # type: ignore[no-any-return]

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._conn.executemany(sql, rows)

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
