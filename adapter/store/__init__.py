"""Storage of FHIR resources with history (the ``ResourceStore`` seam)."""

from adapter.store.base import (
    Conflict,
    Gone,
    HistoryEntry,
    NotFound,
    Operation,
    OperationResult,
    Resource,
    ResourceStore,
    SearchResult,
    VersionConflict,
)
from adapter.store.sqlite import SQLiteStore

__all__ = [
    "Conflict",
    "Gone",
    "HistoryEntry",
    "NotFound",
    "Operation",
    "OperationResult",
    "Resource",
    "ResourceStore",
    "SQLiteStore",
    "SearchResult",
    "VersionConflict",
]
