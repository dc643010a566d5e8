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

Checkpoints. Copying the WAL back into the database file (a checkpoint) normally happens inside the
COMMIT that takes the WAL past 1,000 pages, so every tenth or so write paid several milliseconds for
it. A file store checkpoints on a thread of its own instead, shortly after writes, with a PASSIVE
checkpoint on its own connection, which never blocks the writer or readers
(https://www.sqlite.org/wal.html#ckpt, https://www.sqlite.org/c3ref/wal_checkpoint_v2.html). The
writer's own automatic checkpoint stays on, at a higher mark, in case that thread falls behind.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from adapter.errors import Conflict
from adapter.search.query import SearchQuery
from adapter.store._housekeeping import Housekeeping
from adapter.store._search_sql import INDEX_SCHEMA, INDEX_TABLES
from adapter.store.base import Resource, SearchResult
from adapter.store.sql import READ_SQL, SQLStore, run_steps

__all__ = ["SQLiteStore"]

#: WAL pages after which the writer checkpoints by itself (SQLite's default is 1,000): reached only
#: when the checkpoint thread falls behind.
_WRITER_CHECKPOINT_PAGES = 10_000
#: Size the WAL file is cut back to after a checkpoint empties it.
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: First and longest pause of :meth:`SQLiteStore._begin` between tries to take the write lock.
_FIRST_PAUSE = 0.00005
_LAST_PAUSE = 0.001
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


#: Writes that come close together share one checkpoint (seconds).
_CHECKPOINT_DELAY = 0.05


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a file made before index version 3 to the current tables: ``resources`` gets its
    ``rid`` column, and the index tables, keyed by (type, id) then, are dropped to be made again
    (:meth:`SQLStore._reindex_if_stale` refills them when the store opens). One transaction,
    decided again once it holds the write lock, in case another process upgraded the file first."""

    def stale() -> tuple[bool, list[str]]:
        resources = _columns(conn, "resources")
        tables = [table for table in INDEX_TABLES if (columns := _columns(conn, table)) and "rid" not in columns]
        return bool(resources) and "rid" not in resources, tables

    if stale() == (False, []):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        no_rid, tables = stale()
        if no_rid:
            conn.execute("ALTER TABLE resources ADD COLUMN rid INTEGER")
        for table in tables:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    json TEXT,
    rid INTEGER,
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
        self._checkpointer: Housekeeping | None = None
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
                conn.execute(f"PRAGMA wal_autocheckpoint={_WRITER_CHECKPOINT_PAGES}")
                conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
                if self._checkpointer is None:
                    path, timeout = self._path, self._busy_timeout
                    self._checkpointer = Housekeeping(
                        "sqlite-checkpoint",
                        lambda: sqlite3.connect(path, timeout=timeout, isolation_level=None),
                        _checkpoint,
                        # Busy, or the file went away: the writer's own checkpoint remains.
                        (sqlite3.Error,),
                        _CHECKPOINT_DELAY,
                    )
            conn.execute(f"PRAGMA synchronous={'FULL' if self._synchronous == 'FULL' else 'NORMAL'}")
            # executescript commits first, so it runs before the store's write transaction.
            _upgrade(conn)
            conn.executescript(_SCHEMA + INDEX_SCHEMA)
            # From here on only BEGIN IMMEDIATE waits for another writer, in _begin's own loop.
            conn.execute("PRAGMA busy_timeout = 0")
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
            found = run_steps(self._one_page(query), lambda sql, params: reader.execute(sql, params).fetchall())
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
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        await super().close()

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wake()

    def _begin(self) -> None:
        """``BEGIN IMMEDIATE``, retried while another writer holds the database, up to
        ``busy_timeout``. SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... up to 100 ms
        between tries (sqliteDefaultBusyCallback, https://www.sqlite.org/c3ref/busy_timeout.html),
        so with two server workers a create that met the other's write waited 10-100 ms (p99 112 ms
        at 16 clients, docs/benchmarks.md); writes take about a millisecond, so this loop tries
        again after 50 µs, doubling to at most 1 ms."""
        deadline = time.monotonic() + self._busy_timeout
        pause = _FIRST_PAUSE
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                # The primary code: SQLITE_BUSY_RECOVERY and the like are busy too.
                if exc.sqlite_errorcode & 0xFF not in _BUSY or time.monotonic() + pause > deadline:
                    raise Conflict(f"the store is locked by another writer: {exc}") from exc
            time.sleep(pause)
            pause = min(2 * pause, _LAST_PAUSE)

    def _lock_all(self, keys: Iterable[str]) -> None:
        """Nothing to lock (``BEGIN IMMEDIATE`` holds the whole database), so ``keys`` is not even
        computed."""

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
