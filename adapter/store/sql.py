"""``SQLStore``: what the SQLite and PostgreSQL stores share, which is everything but the connection.

Both keep the same tables (architecture decision 3): ``resources`` with the current version of each
resource and ``history`` with every version, as FHIR JSON text written by
:func:`adapter.fhir.json_format.dumps` (``json`` is NULL for a delete), the search index tables of
:mod:`adapter.store._search_sql`, and ``searches``, the saved result sets that paging links point
at. Writes, conditional operations, search and paging are written once here, in SQL both databases
accept, with ``?`` placeholders; a subclass supplies the connection and the few differences (how a
write transaction starts and serialises writers, how a running statement is interrupted, the
history table's insertion-order column).

Bulk loads. ``transactions`` of groups that are all creates with a token condition or none
(``$ingest``) reads every condition and current row of the call in a few statements up front and
writes the whole call at the end (``_Window``, issue #5); anything else goes group by group.

Threading. Every call runs on one worker thread that owns the store's only connection (a
single-thread executor, so calls run one at a time in arrival order and the event loop never waits
on the database). When the awaiting task is cancelled, the running statement is interrupted
(``sqlite3_interrupt``, or a PostgreSQL cancel request), so a cancelled write is rolled back rather
than finished behind the caller's back.

Group commit. Single creates, updates and deletes that queue up behind the worker thread are
written in one database transaction, each all or nothing on its own (:meth:`SQLStore._single`): one
commit, and on PostgreSQL one WAL flush, for many concurrent API writes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from adapter.errors import AdapterError, InputError
from adapter.fhir.json_format import dumps, loads
from adapter.search.index import IndexRows, index_values
from adapter.search.query import SearchQuery, TokenValue, parse_search
from adapter.store._common import (
    check_id,
    check_type,
    history_entries,
    history_query,
    instant,
    rewrite_references,
    version_of,
    with_meta,
)
from adapter.store._search_sql import (
    INDEX_DELETES,
    INDEX_TABLES,
    INDEX_VERSION,
    count_sql,
    index_inserts,
    search_sql,
)
from adapter.store.base import (
    Conflict,
    Gone,
    HistoryEntry,
    NotFound,
    Operation,
    OperationResult,
    Resource,
    SearchResult,
    VersionConflict,
)

__all__ = ["SQLStore"]

_T = TypeVar("_T")
Rows = list[tuple[Any, ...]]
#: Runs one statement with its parameters and returns the rows.
Execute = Callable[[str, Sequence[Any]], Rows]
#: Reads written once for both kinds of connection (sans-I/O): the generator yields each statement
#: with its parameters, is sent back the rows, and returns its result. run_steps drives it on a
#: blocking connection, run_steps_async on an async one (PostgreSQL's searches from the event loop).
Steps = Generator[tuple[str, Sequence[Any]], Rows, _T]


def run_steps(steps: Steps[_T], execute: Execute) -> _T:
    """Drive ``steps`` with a blocking ``execute``."""
    try:
        statement = next(steps)
        while True:
            statement = steps.send(execute(*statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_steps_async(steps: Steps[_T], execute: Callable[[str, Sequence[Any]], Awaitable[Rows]]) -> _T:
    """Drive ``steps`` with an async ``execute``."""
    try:
        statement = next(steps)
        while True:
            statement = steps.send(await execute(*statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


#: The current version of one resource: (version, deleted, json).
READ_SQL = "SELECT version, deleted, json FROM resources WHERE type = ? AND id = ?"

#: How long a saved result set (the target of paging links) is kept.
SEARCH_LIFETIME = timedelta(hours=1)

# Ids per IN (...) list: well under SQLite's limit of bound parameters.
_CHUNK = 500


def _in_lists(values: Sequence[str]) -> Iterator[tuple[list[str], str]]:
    """``values`` in chunks of at most :data:`_CHUNK`, each with its ``?, ?, ...`` for ``IN (...)``."""
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start : start + _CHUNK])
        yield chunk, ", ".join("?" * len(chunk))


#: The current version of one resource as planning sees it: (version, deleted, json, rid), rid
#: naming its index rows (:mod:`adapter.store._search_sql`).
Current = tuple[int, bool, str | None, int]


@dataclass(slots=True)
class _Batch:
    """The rows a write transaction writes, gathered so that each table gets one ``executemany``
    (many fewer round trips to PostgreSQL for a large transaction); ``stored`` lists the versions
    written with their index rows (None for a delete), for :class:`_Window`."""

    versions: list[tuple[Any, ...]] = field(default_factory=list)
    unindex: list[tuple[int]] = field(default_factory=list)
    index: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    stored: list[tuple[str, str, Current, IndexRows | None]] = field(default_factory=list)

    def extend(self, other: _Batch) -> None:
        self.versions += other.versions
        self.unindex += other.unindex
        for sql, rows in other.index.items():
            self.index.setdefault(sql, []).extend(rows)
        self.stored += other.stored


@dataclass(slots=True)
class _Plan:
    """An operation with its target decided: the id, the current row, and whether it matched."""

    operation: Operation
    id: str
    current: Current | None
    matched: bool = False


def _criteria(operation: Operation) -> str:
    """``Type?criteria`` of a conditional operation: its lock key, and how errors name it."""
    assert operation.condition is not None
    return f"{operation.type}?{operation.condition.criteria_text}"


#: A condition :class:`_Window` answers for a whole window: (type, token parameter, its values ORed).
_TokenCondition = tuple[str, str, tuple[TokenValue, ...]]


def _token_condition(operation: Operation) -> _TokenCondition | None:
    """The condition of a create that is one plain token criterion with codes (what ``$ingest``'s
    ``If-None-Exist`` on a business identifier is), or None for anything else."""
    query = operation.condition
    if operation.method != "create" or query is None or query.type != operation.type or len(query.criteria) != 1:
        return None
    criterion = query.criteria[0]
    if (
        criterion.param.type != "token"
        # _id and _lastUpdated are answered from the resources table, not from sp_token.
        or criterion.param.code.startswith("_")
        or criterion.modifier is not None
        or criterion.missing is not None
        or criterion.chain
        or not criterion.values
    ):
        return None
    values: list[TokenValue] = []
    for value in criterion.values:
        if not isinstance(value, TokenValue) or value.code is None:
            return None
        values.append(value)
    return query.type, criterion.param.code, tuple(values)


def _token_matches(value: TokenValue, system: str | None) -> bool:
    """Whether an index row's system meets ``value``'s, as the SQL of
    :func:`adapter.store._search_sql.criterion_ids` decides it (the codes are equal already)."""
    if value.system is None:
        return True
    if value.system == "":
        return system is None
    return system == value.system


class _Undecided(Exception):
    """Raised by :class:`_Window` for what it cannot answer exactly from what it holds; nothing has
    been written yet, so the window is planned again group by group against the database."""


class _Direct:
    """Planning's lookups one statement at a time, each after its lock (the general path)."""

    def __init__(self, store: SQLStore) -> None:
        self._store = store

    def match(self, operation: Operation) -> list[str]:
        assert operation.condition is not None
        # Two conditional writes with the same criteria must not both find nothing and both create.
        self._store._lock(_criteria(operation))
        return self._store._match(operation.condition)

    def current(self, type: str, id: str) -> Current | None:
        return self._store._current(type, id)


class _Window:
    """Planning's lookups for a window of groups that are all creates with a token condition or
    none (``$ingest``'s conditional creates on business identifiers,
    https://hl7.org/fhir/R4/http.html#ccreate): the conditions and the current rows they lead to
    are read up front, a few statements for the whole window instead of two per resource, and what
    each group stores is added here instead of being written, so the later groups see it (the
    database gets the whole window in one write at the end). The answers are those of
    :class:`_Direct`: a condition matches the resources whose token index rows meet it, which here
    are the database's plus those of the window's earlier groups. The locks are the ones
    :class:`_Direct` takes, all taken before anything is read: each condition's criteria, then
    ``Type/id`` of every resource whose current row is read. Build it with :meth:`open`."""

    def __init__(self, store: SQLStore, conditions: dict[int, _TokenCondition]) -> None:
        self._store = store
        # id() of each conditional operation of the window -> its condition.
        self._conditions = conditions
        self._matches: dict[_TokenCondition, set[str]] = {}
        self._current: dict[tuple[str, str], Current | None] = {}
        # (type, param, code) -> the conditions with a value of that code: what a new resource's
        # token rows are checked against.
        self._watch: dict[tuple[str, str, str], list[tuple[_TokenCondition, TokenValue]]] = {}

    @classmethod
    def open(cls, store: SQLStore, groups: list[list[Operation]]) -> _Window | None:
        """Lock and read what ``groups`` need, or None (having done nothing) unless every
        operation is a create with a token condition or none."""
        conditions: dict[int, _TokenCondition] = {}
        for group in groups:
            for operation in group:
                if operation.condition is None:
                    if operation.method != "create":
                        return None
                    continue
                key = _token_condition(operation)
                if key is None:
                    return None
                conditions[id(operation)] = key
        window = cls(store, conditions)
        store._lock_all(
            _criteria(operation) for group in groups for operation in group if operation.condition is not None
        )
        window._read_matches(set(conditions.values()))
        wanted: set[tuple[str, str]] = set()
        for group in groups:
            for operation in group:
                key = conditions.get(id(operation))
                found = window._matches[key] if key is not None else ()
                if len(found) == 1:
                    wanted.add((operation.type, next(iter(found))))
                elif not found and operation.id is not None:
                    wanted.add((operation.type, operation.id))
        store._lock_all(f"{type}/{id}" for type, id in wanted)
        window._read_current(wanted)
        return window

    def _read_matches(self, conditions: set[_TokenCondition]) -> None:
        """The ids each condition matches in the database: one statement per (type, parameter),
        the token criterion's SQL with the codes of all the window's conditions in one IN list."""
        codes: dict[tuple[str, str], set[str]] = {}
        for key in conditions:
            self._matches[key] = set()
            type, param, values = key
            for value in values:
                assert value.code is not None
                codes.setdefault((type, param), set()).add(value.code)
                self._watch.setdefault((type, param, value.code), []).append((key, value))
        for (type, param), wanted in codes.items():
            for code, system, id in self._store._token_rows(type, param, sorted(wanted)):
                for key, value in self._watch[(type, param, code)]:
                    if _token_matches(value, system):
                        self._matches[key].add(id)

    def _read_current(self, wanted: set[tuple[str, str]]) -> None:
        ids: dict[str, list[str]] = {}
        for type, id in sorted(wanted):
            self._current[(type, id)] = None
            ids.setdefault(type, []).append(id)
        for type, of_type in ids.items():
            for chunk, marks in _in_lists(of_type):
                rows = self._store._execute(
                    f"SELECT id, version, deleted, json, rid FROM resources WHERE type = ? AND id IN ({marks})"
                    + self._store.row_lock,
                    [type, *chunk],
                )
                for id, version, deleted, text, rid in rows:
                    self._current[(type, id)] = (int(version), bool(deleted), text, int(rid))

    def match(self, operation: Operation) -> list[str]:
        return sorted(self._matches[self._conditions[id(operation)]])

    def current(self, type: str, id: str) -> Current | None:
        if (type, id) in self._current:
            return self._current[(type, id)]
        # Neither read up front nor stored by a group of the window (a fresh uuid4): the database knows.
        return self._store._current(type, id)

    def stored(self, batch: _Batch) -> None:
        """Take in what a group stores (only new resources: every operation is a create)."""
        for type, id, current, rows in batch.stored:
            self._current[(type, id)] = current
            assert rows is not None, "open() lets only creates into a window"
            for param, system, code in rows.tokens:
                watching = self._watch.get((type, param, code))
                if not watching:
                    continue
                if system is not None and not isinstance(system, str):
                    # The database would store it as text, in its own way: let it decide.
                    raise _Undecided
                for key, value in watching:
                    if _token_matches(value, system):
                        self._matches[key].add(id)


#: Single writes (create, update, delete) committed together at most.
_COMBINE = 64


@dataclass(slots=True, eq=False)
class _Single:
    """One create, update or delete waiting for the worker thread (see :meth:`SQLStore._single`)."""

    operation: Operation
    result: OperationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False


class SQLStore:
    """The shared implementation of :class:`~adapter.store.base.ResourceStore`; see the module doc."""

    #: The history column that orders versions written in the same millisecond.
    tiebreak = "rowid"
    #: SELECT of (version, deleted, json, rid) of one resource, taking whatever lock the dialect needs.
    current_sql = "SELECT version, deleted, json, rid FROM resources WHERE type = ? AND id = ?"
    #: What ends a SELECT of current rows to take the dialect's row locks (as :attr:`current_sql` does).
    row_lock = ""
    #: What the value indexes of token codes and strings hold: None for whole values, or so many
    #: characters of them (:func:`adapter.store._search_sql.index_key`).
    key_chars: int | None = None
    #: Writing a version: (rid, type, id, version, last_updated, deleted, json) into both tables,
    #: rid as the history row's key (:attr:`tiebreak`).
    put_resource_sql = """
        INSERT INTO resources (rid, type, id, version, last_updated, deleted, json) VALUES (?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (type, id) DO UPDATE SET rid = excluded.rid, version = excluded.version,
            last_updated = excluded.last_updated, deleted = excluded.deleted, json = excluded.json
    """
    put_history_sql = (
        "INSERT INTO history (rowid, type, id, version, last_updated, deleted, json) VALUES (?, ?, ?, ?, ?, ?, ?)"
    )

    def __init__(self, clock: Callable[[], datetime] | None = None, thread_name: str = "store") -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._closed = False
        # Single writes not yet taken by the worker thread, the job on its way to take them, and
        # those being written (_single).
        self._queue_lock = threading.Lock()
        self._singles: list[_Single] = []
        self._drain_job: asyncio.Future[None] | None = None
        self._writing: list[_Single] = []
        self._conn: Any = None
        # The next rid of the open write transaction (:meth:`_take_rid`), or None before its first.
        self._next_rid: int | None = None

    # -- what a dialect supplies (all on the worker thread, except interrupt) ----------------------

    def _connect(self) -> Any:
        """Open a connection with the schema in place (and the index rebuilt if it is stale)."""
        raise NotImplementedError

    def _adopt(self, conn: Any, setup: Callable[[], None]) -> Any:
        """Make ``conn`` the store's connection: in one write transaction run ``setup`` (the
        dialect's schema statements) and rebuild a stale search index; on any failure roll back,
        close ``conn`` and raise."""
        self._conn = conn
        try:
            self._begin()
            try:
                setup()
                self._reindex_if_stale()
                self._execute("COMMIT")
            except BaseException:
                self._execute("ROLLBACK")
                raise
        except BaseException:
            self._conn = None
            conn.close()
            raise
        return conn

    def _usable(self, conn: Any) -> bool:
        return True

    def _begin(self) -> None:
        """Start a write transaction."""
        raise NotImplementedError

    def _lock(self, key: str) -> None:
        """Serialise writers of ``key`` (``Type/id``, or a conditional operation's criteria) until
        the transaction ends; nothing to do where a write transaction locks the whole database."""

    def _lock_all(self, keys: Iterable[str]) -> None:
        """:meth:`_lock` each of ``keys``, in sorted order (writers that lock in one order cannot
        deadlock each other)."""
        for key in sorted(set(keys)):
            self._lock(key)

    def _interrupt(self) -> None:
        """Stop the statement running on the worker thread (called from the event loop's thread)."""

    def _contention(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the write lost against another writer (reported as 409)."""
        return False

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def _check_storable(self, resource: Resource, text: str) -> None:
        """Raise :class:`InputError` for a resource (``text``, its JSON) the database cannot hold."""

    def _row(self, rid: int, type: str, id: str, version: int, now: str, text: str | None) -> tuple[Any, ...]:
        """The parameters of :attr:`put_resource_sql` and :attr:`put_history_sql`."""
        return (rid, type, id, version, now, text is None, text)

    def _take_rid(self) -> int:
        """The rid of a version about to be written: above every rid in the database. Here (one
        writer at a time holds the database) one more than the largest history rowid, counted on
        from the first of the transaction; a rolled-back group leaves a gap, which is harmless."""
        rid = self._next_rid
        if rid is None:
            rid = int(self._execute("SELECT coalesce(max(rowid), 0) FROM history")[0][0]) + 1
        self._next_rid = rid + 1
        return rid

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- running calls on the worker thread ------------------------------------------------------

    async def __aenter__(self) -> SQLStore:
        await self._run(lambda: None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._conn is None or not self._usable(self._conn):
            self._reconnect()
        return fn(*args)

    def _reconnect(self) -> None:
        """Drop the worker's connection (if any) and open a new one."""
        self._close_quietly()
        self._conn = self._connect()

    def _close_quietly(self) -> None:
        try:
            self._close_connection()
        except Exception:  # a broken connection may fail to close; it is dropped anyway
            self._conn = None

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise RuntimeError("the store is closed")
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, *args)
        try:
            return await future
        except asyncio.CancelledError:
            self._interrupt()
            raise

    async def _single(self, operation: Operation) -> OperationResult:
        """Write one operation in a transaction of its own, committed together with the single
        writes queued with it (group commit). Under concurrent writes the worker thread runs one
        database transaction, and one commit (on PostgreSQL a WAL flush), for up to
        :data:`_COMBINE` of them instead of one each: each is still all or nothing on its own
        (:meth:`_write_groups`), and each caller gets its own result or error, as if alone.

        The first call to queue an operation starts a job on the worker thread; the calls that
        queue theirs before that job takes the queue wait for the same job (one hand-over to the
        worker thread per batch: about 65 µs of the event loop's time per create when each call
        had its own). A call cancelled before its operation is taken leaves it unwritten; one
        cancelled while it is written interrupts the statement only when every operation being
        written belongs to a cancelled call."""
        if self._closed:
            raise RuntimeError("the store is closed")
        single = _Single(operation)
        with self._queue_lock:
            # An empty queue has no job on its way (a job empties the queue when it takes it).
            start = not self._singles
            self._singles.append(single)
        if start:
            self._drain_job = asyncio.get_running_loop().run_in_executor(self._executor, self._drain)
        job = self._drain_job
        assert job is not None
        try:
            # shield: a cancelled caller must not cancel the job of the others waiting for it.
            await asyncio.shield(job)
        except asyncio.CancelledError:
            single.cancelled = True
            writing = self._writing
            if single in writing and all(other.cancelled for other in writing):
                self._interrupt()
            raise
        if single.error is not None:
            raise single.error
        assert single.result is not None
        return single.result

    def _drain(self) -> None:
        """On the worker thread: write every single write queued, :data:`_COMBINE` at a time."""
        with self._queue_lock:
            queued, self._singles = self._singles, []
        for start in range(0, len(queued), _COMBINE):
            # A caller may give up while the chunks before its own are written: skipped here.
            taken = [single for single in queued[start : start + _COMBINE] if not single.cancelled]
            self._writing = taken
            try:
                self._call(self._write_taken, taken)
            except BaseException as exc:  # the connection could not be opened
                for single in taken:
                    single.error = exc
            finally:
                self._writing = []

    def _write_alone(self, single: _Single) -> None:
        """Write ``single`` in a transaction of its own, keeping its result or error."""
        try:
            single.result = self._write([single.operation])[0]
        except BaseException as exc:
            single.error = exc

    def _write_taken(self, taken: list[_Single]) -> None:
        if len(taken) <= 1:
            for single in taken:
                self._write_alone(single)
            return
        try:
            outcomes = self._write_groups([[single.operation] for single in taken])
        except BaseException as exc:
            if isinstance(exc, Exception) and self._conn is not None and self._usable(self._conn):
                # The shared transaction was rolled back as a whole (it lost against another
                # writer, or the database refused one operation's data): each operation again in a
                # transaction of its own, so that the failure is only its own caller's, but not one
                # whose caller gave up (cancelled, which may be what interrupted the transaction).
                for single in taken:
                    if single.cancelled:
                        single.error = exc
                    else:
                        self._write_alone(single)
            else:
                # The connection was lost (whether the commit happened is unknown: trying again
                # could write a create twice), or the process is stopping: every caller's error.
                for single in taken:
                    single.error = exc
            return
        for single, outcome in zip(taken, outcomes, strict=True):
            if isinstance(outcome, AdapterError):
                single.error = outcome
            else:
                single.result = outcome[0]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_quietly)
        self._executor.shutdown(wait=True)

    # -- the interactions ------------------------------------------------------------------------

    async def create(self, resource: Resource) -> Resource:
        result = await self._single(Operation.create(resource))
        assert result.resource is not None
        return result.resource

    async def read(self, type: str, id: str) -> Resource:
        return await self._run(self._read, type, id)

    async def vread(self, type: str, id: str, version: str) -> Resource:
        return await self._run(self._vread, type, id, version)

    async def update(self, resource: Resource, if_match: str | None = None) -> tuple[Resource, bool]:
        result = await self._single(Operation.update(resource, if_match=if_match))
        assert result.resource is not None
        return result.resource, result.created

    async def delete(self, type: str, id: str, if_match: str | None = None) -> None:
        await self._single(Operation.delete(type, id, if_match=if_match))

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
        sql, params = history_query(type, id, None if since is None else instant(since), count, tiebreak=self.tiebreak)
        return history_entries(await self._run(self._execute, sql, params))

    async def transaction(self, operations: Sequence[Operation]) -> list[OperationResult]:
        return await self._run(self._write, list(operations))

    async def transactions(self, groups: Sequence[Sequence[Operation]]) -> list[list[OperationResult] | AdapterError]:
        return await self._run(self._write_groups, [list(group) for group in groups])

    async def search(self, query: SearchQuery) -> SearchResult:
        return await self._run(self._search, query)

    async def search_page(self, search_id: str, offset: int, count: int) -> SearchResult:
        return await self._run(self._search_page, search_id, offset, count)

    # -- reads, on the worker thread -------------------------------------------------------------

    def _now(self) -> str:
        return instant(self._clock())

    def _read(self, type: str, id: str) -> Resource:
        return self._current_resource(self._execute(READ_SQL, (type, id)), type, id)

    @staticmethod
    def _current_resource(rows: list[tuple[Any, ...]], type: str, id: str) -> Resource:
        if not rows:
            raise NotFound(f"{type}/{id} is not known")
        version, deleted, text = rows[0]
        if deleted or text is None:
            raise Gone(f"{type}/{id} was deleted (version {version})")
        resource: Resource = loads(text)
        return resource

    def _vread(self, type: str, id: str, version: str) -> Resource:
        # Only what fits an integer column can be a version; anything else is simply not found.
        number = int(version) if version.isdecimal() and len(version) <= 9 else None
        rows: list[tuple[Any, ...]] = []
        if number is not None:
            rows = self._execute(
                "SELECT deleted, json FROM history WHERE type = ? AND id = ? AND version = ?", (type, id, number)
            )
        if not rows:
            raise NotFound(f"{type}/{id} has no version {version!r}")
        if rows[0][0] or rows[0][1] is None:
            raise Gone(f"version {version} of {type}/{id} is a delete")
        resource: Resource = loads(rows[0][1])
        return resource

    def _resources(self, type: str, ids: Sequence[str]) -> list[Resource]:
        """The current versions of ``ids`` of ``type``, in that order, leaving out deleted ones."""
        return run_steps(self._resource_steps(type, ids), self._execute)

    @staticmethod
    def _resource_steps(type: str, ids: Sequence[str]) -> Steps[list[Resource]]:
        found: dict[str, str] = {}
        for chunk, marks in _in_lists(ids):
            rows = yield (
                f"SELECT id, json FROM resources WHERE type = ? AND NOT deleted AND id IN ({marks})",
                [
                    type,
                    *chunk,
                ],
            )
            found.update((row[0], row[1]) for row in rows)
        return [loads(found[id]) for id in ids if id in found]

    # -- search ----------------------------------------------------------------------------------

    def _search(self, query: SearchQuery) -> SearchResult:
        if query.summary_count:
            sql, params = count_sql(query, key_chars=self.key_chars)
            return SearchResult(query, int(self._execute(sql, params)[0][0]), [], [])
        found = run_steps(self._one_page(query), self._execute)
        if found is not None:
            return found
        sql, params = search_sql(query, key_chars=self.key_chars)
        ids = [row[0] for row in self._execute(sql, params)]
        search_id = self._save_search(query, ids) if 0 < query.count < len(ids) else None
        return self._page(query, ids, 0, search_id)

    def _one_page(self, query: SearchQuery) -> Steps[SearchResult | None]:
        """The answer to a search that fits on one page, from one statement (the page and the
        total); None when it does not fit (its result set must then be saved for paging)."""
        if query.count <= 0 or query.summary_count:
            return None
        rows = yield search_sql(query, key_chars=self.key_chars, first_page=True)
        total = int(rows[0][2]) if rows else 0
        if total > query.count:
            return None
        resources = [loads(row[1]) for row in rows]
        return SearchResult(query, total, resources, (yield from self._included(query, resources)))

    def _save_search(self, query: SearchQuery, ids: list[str]) -> str:
        """Keep the ordered result set for its paging links; drop expired ones."""
        search_id = str(uuid.uuid4())
        now = self._clock()
        self._begin()
        try:
            self._execute("DELETE FROM searches WHERE created < ?", (instant(now - SEARCH_LIFETIME),))
            self._execute(
                "INSERT INTO searches (id, created, type, query, ids) VALUES (?, ?, ?, ?, ?)",
                (search_id, instant(now), query.type, json.dumps(query.pairs), json.dumps(ids)),
            )
            self._execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return search_id

    def _search_page(self, search_id: str, offset: int, count: int) -> SearchResult:
        rows = self._execute("SELECT type, query, ids, created FROM searches WHERE id = ?", (search_id,))
        if not rows or rows[0][3] < instant(self._clock() - SEARCH_LIFETIME):
            raise Gone(f"the search result set {search_id!r} has expired or never existed; search again")
        type, pairs, ids, _ = rows[0]
        query = parse_search(type, [tuple(pair) for pair in json.loads(pairs)])
        return self._page(replace(query, count=count), json.loads(ids), offset, search_id)

    def _page(self, query: SearchQuery, ids: list[str], offset: int, search_id: str | None) -> SearchResult:
        resources = self._resources(query.type, ids[offset : offset + query.count])
        included = run_steps(self._included(query, resources), self._execute)
        return SearchResult(query, len(ids), resources, included, offset, search_id)

    def _included(self, query: SearchQuery, page: list[Resource]) -> Steps[list[Resource]]:
        """What ``_include`` and ``_revinclude`` add to a page (https://hl7.org/fhir/R4/search.html#include)."""
        if not page or not (query.includes or query.revincludes):
            return []
        seen = {(query.type, resource["id"]) for resource in page}
        page_ids = [resource["id"] for resource in page]
        wanted: dict[str, list[str]] = {}
        for include in query.includes:
            marks = ", ".join("?" * len(page_ids))
            # The page's index rows by their rid (the index on rid; there is none on type and id).
            sql = (
                "SELECT DISTINCT target_type, target_id FROM sp_reference WHERE rid IN"
                f" (SELECT rid FROM resources WHERE type = ? AND id IN ({marks})) AND param = ?"
                " AND target_id IS NOT NULL"
            )
            params: list[Any] = [include.source, *page_ids, include.param]
            if include.target is not None:
                sql += " AND target_type = ?"
                params.append(include.target)
            for target_type, target_id in (yield sql, params):
                wanted.setdefault(target_type, []).append(target_id)
        for include in query.revincludes:
            if include.target is not None and include.target != query.type:
                continue
            marks = ", ".join("?" * len(page_ids))
            sql = (
                "SELECT DISTINCT id FROM sp_reference WHERE type = ? AND param = ? AND target_type = ?"
                f" AND target_id IN ({marks})"
            )
            rows = yield sql, [include.source, include.param, query.type, *page_ids]
            wanted.setdefault(include.source, []).extend(row[0] for row in rows)
        included: list[Resource] = []
        for type, ids in wanted.items():
            fresh = [id for id in dict.fromkeys(ids) if (type, id) not in seen]
            seen.update((type, id) for id in fresh)
            included += yield from self._resource_steps(type, fresh)
        return included

    def _token_rows(self, type: str, param: str, codes: list[str]) -> Rows:
        """(code, system, id) of the ``param`` token index rows with any of ``codes``, of ``type``
        resources that are not deleted: the rows :func:`adapter.store._search_sql.criterion_ids`
        looks at for a token criterion, for many codes at once."""
        rows: Rows = []
        for chunk, marks in _in_lists(codes):
            rows += self._execute(
                "SELECT t.code, t.system, t.id FROM sp_token t JOIN resources r ON r.type = t.type AND r.id = t.id"
                f" WHERE t.type = ? AND t.param = ? AND t.code IN ({marks}) AND NOT r.deleted",
                [type, param, *chunk],
            )
        return rows

    def _match(self, query: SearchQuery) -> list[str]:
        """Up to two ids that meet a condition: enough to tell none, one and several apart."""
        sql, params = search_sql(query, key_chars=self.key_chars)
        return [row[0] for row in self._execute(sql + " LIMIT 2", params)]

    # -- writes ----------------------------------------------------------------------------------

    def _committed(self) -> None:
        """Called after each write transaction commits (the SQLite store schedules a checkpoint)."""

    def _rollback(self) -> None:
        try:
            self._execute("ROLLBACK")
        except Exception:  # nothing to roll back, or the connection is gone (which rolls back)
            self._close_quietly()

    @contextmanager
    def _write_transaction(self) -> Iterator[None]:
        """One write transaction: committed when the block ends, rolled back on any error (a loss
        against another writer reported as :class:`Conflict`)."""
        self._next_rid = None
        self._begin()
        try:
            yield
            self._execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if self._contention(exc):
                raise Conflict(f"the change clashed with another writer: {exc}") from exc
            raise
        self._committed()

    def _write(self, operations: list[Operation]) -> list[OperationResult]:
        """Apply ``operations`` in one transaction; any error rolls all of them back."""
        now = self._now()
        with self._write_transaction():
            return self._apply_all(operations, now)

    def _write_groups(self, groups: list[list[Operation]]) -> list[list[OperationResult] | AdapterError]:
        """Apply each group all or nothing, all in one database transaction. A window of creates
        with token conditions (``$ingest``) goes through :meth:`_write_window`; any other, or one
        that it cannot decide, group by group with a savepoint each: a group that fails is rolled
        back to its savepoint and the others go on."""
        now = self._now()
        outcomes: list[list[OperationResult] | AdapterError] = []
        with self._write_transaction():
            window = _Window.open(self, groups)
            if window is not None:
                try:
                    return self._write_window(groups, now, window)
                except _Undecided:
                    pass  # nothing is written yet: the general path below decides
            for group in groups:
                self._execute("SAVEPOINT spfhir_group")
                try:
                    outcomes.append(self._apply_all(group, now))
                except AdapterError as exc:
                    self._execute("ROLLBACK TO SAVEPOINT spfhir_group")
                    outcomes.append(exc)
                self._execute("RELEASE SAVEPOINT spfhir_group")
        return outcomes

    def _write_window(
        self, groups: list[list[Operation]], now: str, window: _Window
    ) -> list[list[OperationResult] | AdapterError]:
        """Plan every group against :class:`_Window` and write what the groups that succeed store,
        in one flush at the end: a group that fails leaves nothing behind without a savepoint, since
        nothing is written while planning. The results are those of the general path."""
        outcomes: list[list[OperationResult] | AdapterError] = []
        batch = _Batch()
        for group in groups:
            mine = _Batch()
            try:
                outcomes.append(self._plan_and_apply(group, now, window, mine))
            except AdapterError as exc:
                outcomes.append(exc)
                continue
            window.stored(mine)
            batch.extend(mine)
        self._flush(batch)
        return outcomes

    def _apply_all(self, operations: list[Operation], now: str) -> list[OperationResult]:
        """Plan and write ``operations`` inside the open transaction (see :meth:`ResourceStore.transaction`)."""
        batch = _Batch()
        results = self._plan_and_apply(operations, now, _Direct(self), batch)
        self._flush(batch)
        return results

    def _plan_and_apply(
        self, operations: list[Operation], now: str, lookups: _Direct | _Window, batch: _Batch
    ) -> list[OperationResult]:
        """Plan ``operations`` and gather what they write in ``batch``; raises the first error."""
        seen: set[tuple[str, str]] = set()
        plans: list[_Plan] = []
        results: list[OperationResult] = []
        index = 0
        try:
            for operation in operations:
                plans.append(self._plan(operation, seen, lookups))
                index += 1
            mapping = {
                plan.operation.full_url: f"{plan.operation.type}/{plan.id}" for plan in plans if plan.operation.full_url
            }
            index = 0
            for plan in plans:
                results.append(self._apply(plan, now, mapping, batch))
                index += 1
        except AdapterError as exc:
            # Marked with the index of the operation that raised it (one try for all: a context
            # manager per operation cost a few microseconds each in $ingest's windows).
            if exc.operation is None:
                exc.operation = index
            raise
        return results

    def _current(self, type: str, id: str) -> Current | None:
        self._lock(f"{type}/{id}")
        rows = self._execute(self.current_sql, (type, id))
        return None if not rows else (int(rows[0][0]), bool(rows[0][1]), rows[0][2], int(rows[0][3]))

    def _plan(self, operation: Operation, seen: set[tuple[str, str]], lookups: _Direct | _Window) -> _Plan:
        """Decide which resource ``operation`` changes (conditions are evaluated here) and check it may."""
        if operation.resource is not None:
            check_type(operation.resource.get("resourceType"))
            if operation.resource["resourceType"] != operation.type:
                raise InputError("the operation's type is not the resource's resourceType", expression="resourceType")
        check_type(operation.type)
        matched = False
        if operation.condition is not None:
            matches = lookups.match(operation)
            if len(matches) > 1:
                raise VersionConflict(
                    f"the condition {_criteria(operation)} matches more than one resource", expression="request.url"
                )
            if operation.method == "create":
                matched = bool(matches)
                id = matches[0] if matches else (operation.id or str(uuid.uuid4()))
            elif matches:
                if operation.id is not None and operation.id != matches[0]:
                    raise InputError(
                        f"the condition {_criteria(operation)} matches {operation.type}/{matches[0]},"
                        f" not the body's id {operation.id!r}",
                        expression="id",
                    )
                id = matches[0]
            else:
                id = operation.id if operation.id is not None else str(uuid.uuid4())
            id = check_id(id)
        elif operation.method == "create" and operation.id is None:
            # A fresh uuid4 cannot be taken already: no lock, no lookup.
            id = str(uuid.uuid4())
            seen.add((operation.type, id))
            return _Plan(operation, id, None)
        elif operation.method == "create":
            id = check_id(operation.id)
        else:
            id = check_id(operation.id)
        key = (operation.type, id)
        if key in seen:
            # https://hl7.org/fhir/R4/http.html#trules: overlapping identities SHALL fail the transaction.
            raise Conflict(f"{operation.type}/{id} is changed twice in one transaction")
        seen.add(key)
        current = lookups.current(operation.type, id)
        if operation.if_match is not None:
            expected = version_of(operation.if_match)
            if current is None or str(current[0]) != expected:
                actual = "none" if current is None else str(current[0])
                raise VersionConflict(
                    f"If-Match {operation.if_match} does not match {operation.type}/{id} (current version: {actual})"
                )
        if operation.method == "delete" and current is None:
            raise NotFound(f"{operation.type}/{id} is not known")
        if operation.method == "create" and current is not None and not matched:
            raise Conflict(f"{operation.type}/{id} exists already")
        return _Plan(operation, id, current, matched)

    def _apply(self, plan: _Plan, now: str, mapping: dict[str, str], batch: _Batch) -> OperationResult:
        operation, id, current = plan.operation, plan.id, plan.current
        if plan.matched:
            assert current is not None and current[2] is not None
            return OperationResult(operation.type, id, str(current[0]), False, None, matched=True, text=current[2])
        if current is not None:
            batch.unindex.append((current[3],))
        if operation.method == "delete":
            assert current is not None
            version, deleted, _, _ = current
            if deleted:
                return OperationResult(operation.type, id, str(version), False, None)
            rid = self._take_rid()
            batch.versions.append(self._row(rid, operation.type, id, version + 1, now, None))
            batch.stored.append((operation.type, id, (version + 1, True, None, rid), None))
            return OperationResult(operation.type, id, str(version + 1), False, None)
        assert operation.resource is not None
        resource = rewrite_references(operation.resource, mapping) if mapping else operation.resource
        version = 1 if current is None else current[0] + 1
        stamped = with_meta(resource, id, version, now)
        text = dumps(stamped).decode("utf-8")
        self._check_storable(stamped, text)
        rid = self._take_rid()
        batch.versions.append(self._row(rid, operation.type, id, version, now, text))
        rows = index_values(stamped)
        index_inserts(rid, operation.type, id, rows, batch.index)
        batch.stored.append((operation.type, id, (version, False, text, rid), rows))
        created = current is None or current[1]
        return OperationResult(operation.type, id, str(version), created, stamped)

    def _flush(self, batch: _Batch) -> None:
        """Write what a transaction gathered: versions, then the index rows they replace."""
        for sql in (self.put_resource_sql, self.put_history_sql):
            self._execute_all(sql, batch.versions)
        for sql in INDEX_DELETES:
            self._execute_all(sql, batch.unindex)
        for sql, rows in batch.index.items():
            self._execute_all(sql, rows)

    def _execute_all(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if len(rows) == 1:
            self._execute(sql, rows[0])
        elif rows:
            self._execute_many(sql, rows)

    # -- schema ----------------------------------------------------------------------------------

    def _reindex_if_stale(self) -> None:
        """Inside a write transaction: rebuild the search index when it was built by another
        :data:`INDEX_VERSION` (or before there was one)."""
        rows = self._execute("SELECT value FROM store_meta WHERE key = 'index_version'")
        if rows and rows[0][0] == INDEX_VERSION:
            return
        for table in INDEX_TABLES:
            self._execute(f"DELETE FROM {table}")
        # Each current version's rid is the key of its history row (before index version 3 there
        # was no rid).
        self._execute(
            f"UPDATE resources SET rid = (SELECT h.{self.tiebreak} FROM history h"
            " WHERE h.type = resources.type AND h.id = resources.id AND h.version = resources.version)"
        )
        batch = _Batch()
        for rid, type, id, text in self._execute("SELECT rid, type, id, json FROM resources WHERE NOT deleted"):
            index_inserts(int(rid), type, id, index_values(loads(text)), batch.index)
        self._flush(batch)
        self._execute(
            "INSERT INTO store_meta (key, value) VALUES ('index_version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (INDEX_VERSION,),
        )
