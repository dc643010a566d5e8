"""The ``ResourceStore`` seam: keep FHIR resources with their versions, and give them back exactly.

A store holds whole resources as FHIR JSON (written by :func:`adapter.fhir.json_format.dumps`, so
decimals keep their written form) plus every earlier version. It owns ``meta.versionId`` ("1", "2",
...) and ``meta.lastUpdated`` (a UTC instant with milliseconds, ``2026-11-23T12:00:00.123Z``): it sets
them on what it stores and returns; all other content is kept as given. Writes of one call, and all
operations of one :meth:`ResourceStore.transaction`, are atomic.

Implementations:

- :class:`adapter.store.sqlite.SQLiteStore`: embedded default, stdlib ``sqlite3`` in WAL mode.

- :class:`adapter.store.postgres.PostgresStore`: the production store, on PostgreSQL.

Both keep search index tables derived from the R4 SearchParameters (:mod:`adapter.search`) in
step with every write, and answer :meth:`ResourceStore.search`.

Errors (from the one tree in :mod:`adapter.errors`, re-exported here)::

    AdapterError
     +-- NotFound          (404, not-found)  no such resource or version
     +-- Gone              (410, deleted)    the resource, or the version asked for, is deleted
     +-- VersionConflict   (412, conflict)   If-Match does not name the current version
     +-- Conflict          (409, conflict)   clashes with the store's state or another change of the call
    InputError             (400, invalid)    a resource without resourceType, or an update without a valid id

See https://hl7.org/fhir/R4/http.html and https://hl7.org/fhir/R4/resource.html#Meta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from adapter.errors import AdapterError, Conflict, Gone, NotFound, VersionConflict
from adapter.fhir.json_format import loads
from adapter.search.query import SearchQuery

__all__ = [
    "Conflict",
    "Gone",
    "HistoryEntry",
    "NotFound",
    "Operation",
    "OperationResult",
    "Resource",
    "ResourceStore",
    "SearchResult",
    "VersionConflict",
]

Resource = dict[str, Any]
"""One resource as parsed FHIR JSON (decimals as :class:`decimal.Decimal`)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One change inside :meth:`ResourceStore.transaction`; build it with the class methods.

    ``condition`` makes it conditional: a create happens only when no resource of the type meets
    it (``If-None-Exist``), an update goes to the one resource that meets it, or creates one when
    none does (https://hl7.org/fhir/R4/http.html#cond-update). ``full_url`` is the entry's
    ``fullUrl`` in a transaction Bundle: references to it in the other resources of the
    transaction are rewritten to the ``Type/id`` the operation ends up with.
    """

    method: Literal["create", "update", "delete"]
    type: str
    id: str | None = None
    resource: Resource | None = None
    if_match: str | None = None
    condition: SearchQuery | None = None
    full_url: str | None = None

    @classmethod
    def create(
        cls,
        resource: Resource,
        *,
        id: str | None = None,
        if_none_exist: SearchQuery | None = None,
        full_url: str | None = None,
    ) -> Operation:
        """A create; ``id`` lets the caller fix the new server id in advance, otherwise the store
        assigns a uuid4."""
        return cls("create", str(resource.get("resourceType", "")), id, resource, None, if_none_exist, full_url)

    @classmethod
    def update(
        cls,
        resource: Resource,
        *,
        if_match: str | None = None,
        condition: SearchQuery | None = None,
        full_url: str | None = None,
    ) -> Operation:
        type = str(resource.get("resourceType", ""))
        return cls("update", type, resource.get("id"), resource, if_match, condition, full_url)

    @classmethod
    def delete(cls, type: str, id: str, *, if_match: str | None = None) -> Operation:
        return cls("delete", type, id, None, if_match)


class OperationResult:
    """What one operation did: the stored resource (``None`` for a delete) and its new version.

    ``matched`` marks a conditional create that found its resource already there: nothing was
    written and ``resource`` is the existing one. A store may hand that one over as its stored JSON
    (``text``), parsed on first use: ``$ingest`` never looks at it (storing records already there
    went 2,376-2,468 -> 4,699-5,211 records/s in ``bench.store_ingest``, docs/benchmarks.md).
    """

    __slots__ = ("_resource", "_text", "created", "id", "matched", "type", "version_id")

    def __init__(
        self,
        type: str,
        id: str,
        version_id: str,
        created: bool,
        resource: Resource | None,
        matched: bool = False,
        *,
        text: str | None = None,
    ) -> None:
        self.type = type
        self.id = id
        self.version_id = version_id
        self.created = created
        self.matched = matched
        self._resource = resource
        self._text = text

    @property
    def resource(self) -> Resource | None:
        if self._resource is None and self._text is not None:
            self._resource = loads(self._text)
            self._text = None
        return self._resource

    def __repr__(self) -> str:
        return (
            f"OperationResult({self.type}/{self.id}, version {self.version_id}, created={self.created},"
            f" matched={self.matched})"
        )


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of a search: the matches on it, what ``_include``/``_revinclude`` brought along,
    the total, and the saved result set (``search_id``) that later pages are read from when there
    is more than one page."""

    query: SearchQuery
    total: int
    resources: list[Resource]
    included: list[Resource]
    offset: int = 0
    search_id: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One version of one resource; a delete is a version too, with ``deleted`` set and no resource."""

    type: str
    id: str
    version_id: str
    last_updated: str
    deleted: bool
    resource: Resource | None


class ResourceStore(Protocol):
    async def create(self, resource: Resource) -> Resource:
        """Store a new resource under a new server id (uuid4; an ``id`` in the input is ignored).

        Returns the stored resource with ``id``, ``meta.versionId`` "1" and ``meta.lastUpdated``.
        See: https://hl7.org/fhir/R4/http.html#create
        """
        ...

    async def read(self, type: str, id: str) -> Resource:
        """The current version; :class:`NotFound` if it never existed, :class:`Gone` if deleted.

        See: https://hl7.org/fhir/R4/http.html#read
        """
        ...

    async def vread(self, type: str, id: str, version: str) -> Resource:
        """One version; :class:`NotFound` if there is no such version, :class:`Gone` if it is a delete.

        See: https://hl7.org/fhir/R4/http.html#vread
        """
        ...

    async def update(self, resource: Resource, if_match: str | None = None) -> tuple[Resource, bool]:
        """Store a new version of ``resource`` under its own ``id``; returns (stored, created).

        A resource that does not exist yet, or was deleted, is created under the client's id
        (created=True). ``if_match`` is a versionId (``"3"``) or its ETag (``W/"3"``); when it does
        not name the current version, or there is none, raises :class:`VersionConflict`.
        See: https://hl7.org/fhir/R4/http.html#update and https://hl7.org/fhir/R4/http.html#concurrency
        """
        ...

    async def delete(self, type: str, id: str, if_match: str | None = None) -> None:
        """Delete: a new version marked deleted. Deleting a deleted resource changes nothing;
        one that never existed raises :class:`NotFound`.

        See: https://hl7.org/fhir/R4/http.html#delete
        """
        ...

    async def history(
        self,
        type: str | None = None,
        id: str | None = None,
        since: datetime | None = None,
        count: int | None = None,
    ) -> list[HistoryEntry]:
        """Versions, newest first: of one resource (type and id), of a type, or of the whole system
        (neither). ``since`` keeps versions updated at or after that instant; ``count`` keeps the
        first ``count`` entries. Deletes are included as entries marked deleted.

        See: https://hl7.org/fhir/R4/http.html#history
        """
        ...

    async def transaction(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Apply creates, updates and deletes all together or not at all; results in input order.

        Two operations on the same resource raise :class:`Conflict`; the first failing operation
        rolls back all of them and its error is raised. Conditions are evaluated against the
        store as it was before the transaction; a conditional update that matches several
        resources, or a conditional create that matches several, raises :class:`VersionConflict`
        (412, https://hl7.org/fhir/R4/http.html#cond-update).
        See: https://hl7.org/fhir/R4/http.html#transaction
        """
        ...

    async def transactions(self, groups: Sequence[Sequence[Operation]]) -> list[list[OperationResult] | AdapterError]:
        """Apply several independent transactions at once: each group all or nothing on its own, as
        :meth:`transaction` would, and all committed together (one commit, instead of one per group,
        for bulk loads such as ``$ingest``). A group that fails with an :class:`AdapterError` is
        rolled back alone and its error is its result; any other error rolls back every group and
        is raised. Groups see the changes of the groups before them.
        """
        ...

    async def search(self, query: SearchQuery) -> SearchResult:
        """The first page of ``query``'s matches (``query.count`` of them) with the total.

        When there are more, the ordered result set is saved under ``search_id`` so that later
        pages (:meth:`search_page`) stay the same while the data changes.
        See: https://hl7.org/fhir/R4/search.html
        """
        ...

    async def search_page(self, search_id: str, offset: int, count: int) -> SearchResult:
        """A later page of a saved result set; :class:`Gone` when it has expired.

        See: https://hl7.org/fhir/R4/http.html#paging
        """
        ...

    async def close(self) -> None:
        """Release the store's connections; the store is unusable afterwards."""
        ...
