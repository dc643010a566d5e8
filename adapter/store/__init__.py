"""Storage of FHIR resources with history (the ``ResourceStore`` seam)."""

from adapter.native import prefer_compiled

# Before any submodule is imported: its compiled form when it is built (decision 0006).
prefer_compiled(__name__, __path__)

from adapter.store.base import (  # noqa: E402
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
from adapter.store.sqlite import SQLiteStore  # noqa: E402

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
