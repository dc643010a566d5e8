"""The garbage collector's settings for a process that works in bulk: ``spfhir serve`` and
``spfhir map``.

Mapping, validating and storing allocate many short-lived objects, which reference counting
frees, and hold tens of thousands alive for a while (a chunk of mapped records until it is stored
or written). Python's young collection runs every 700 net allocations and walks every live young
object; every tenth walks the middle generation too, so each chunk was walked several times, and
full collections walked the loaded model and profiles. Every 200,000 net allocations instead: in
``$ingest`` collections took 85 -> 28 µs of CPU per record, in ``spfhir map`` (one process) 152 -> 61
(gc.callbacks, 9,000 records) (https://docs.python.org/3/library/gc.html#gc.set_threshold).
"""

from __future__ import annotations

import gc

__all__ = ["BULK_THRESHOLDS", "collect_for_bulk_work"]

#: gc.set_threshold's arguments for bulk work.
BULK_THRESHOLDS = (200_000, 10, 10)


def collect_for_bulk_work(*, freeze: bool = False) -> None:
    """Collect young objects every 200,000 net allocations; with ``freeze``, first move everything
    alive into the permanent generation, out of every collection's way (``gc.freeze``, after a
    full collection so that no garbage is kept)."""
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(*BULK_THRESHOLDS)
