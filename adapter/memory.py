"""The garbage collector in processes that work in bulk: ``spfhir serve`` and the mapping workers'
results.

Mapping, validating and storing allocate many short-lived objects, which reference counting frees,
and hold tens of thousands alive for a while (a chunk of mapped records until it is stored). A young
collection walks every live young object: at 10,000 net allocations one came after every chunk
``$ingest`` stored, at 200,000 collections took 85 -> 28 µs of CPU per ingested record (gc.callbacks,
9,000 records) (https://docs.python.org/3/library/gc.html#gc.set_threshold). ``spfhir map`` keeps
Python's young thresholds: with these its collections took less CPU on 9,000 records, but the
300,000-record figure did not improve and its peak memory grew (docs/benchmarks.md, issue #5); it
only considers full collections less often while it maps (:func:`settle_for_mapping`).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "BULK_THRESHOLDS",
    "MAPPING_FULL_COLLECTIONS",
    "bulk_collection",
    "collect_for_bulk_work",
    "collection_paused",
    "freeze_what_is_alive",
    "settle_for_mapping",
    "thresholds_kept",
]

#: gc.set_threshold's arguments for bulk work.
BULK_THRESHOLDS = (200_000, 10, 10)


def collect_for_bulk_work() -> None:
    """Collect young objects every 200,000 net allocations."""
    gc.set_threshold(*BULK_THRESHOLDS)


@contextmanager
def thresholds_kept() -> Iterator[None]:
    """The collector's thresholds set back, when the block ends, to what they were when it began
    (whatever the block sets: a command that also runs inside test processes)."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


@contextmanager
def bulk_collection() -> Iterator[None]:
    """:func:`collect_for_bulk_work` while the block runs (:func:`thresholds_kept`): for
    ``spfhir validate`` over many inputs. Parsed JSON is a tree (no reference cycles, freed by
    reference counting) and the walk makes none, yet a 35 MB Bundle allocates millions of objects:
    with Python's thresholds the collector walked them 1,059 + 96 + 8 times over the R4 examples,
    0.46 s of a 4.0 s pass; with these, not once (gc.callbacks; docs/benchmarks.md, #2)."""
    with thresholds_kept():
        collect_for_bulk_work()
        yield


_lock = threading.Lock()
_pausing = 0  # threads inside collection_paused
_was_enabled = False  # whether the collector was on when the first of them came in


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic collection while the block runs, in any thread: for building thousands of
    objects that stay alive (unpickling a chunk of mapped records), which would otherwise each be
    walked by the collections they trigger. Safe from several threads at once: the collector is
    switched on again when the last one leaves, if it was on when the first came in (a bare
    isenabled/disable/enable in two threads can leave it off for good)."""
    global _pausing, _was_enabled
    with _lock:
        if _pausing == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pausing += 1
    try:
        yield
    finally:
        with _lock:
            _pausing -= 1
            if _pausing == 0 and _was_enabled:
                gc.enable()


def freeze_what_is_alive() -> None:
    """Collect, then move everything alive into the permanent generation (``gc.freeze``): for a
    process that has loaded what a long run needs (a mapping's compiled profiles, types and FHIRPath,
    after its first records). Full collections then no longer walk it: in one ``spfhir map``
    process they took 123 -> 42 µs of CPU per record, the whole mapping 934-953 -> 822-873 (9,000
    records, alternating runs). Objects frozen are still freed by reference counting; only a
    reference cycle among them would outlive its use, which the collection before rules out for
    what is garbage at that moment."""
    gc.collect()
    gc.freeze()


#: Collections of generation 1 before a full one is considered (Python's default: 10), while a
#: process maps (https://docs.python.org/3/library/gc.html#gc.set_threshold). A full collection
#: walks every object alive that is not frozen: mostly the batch being filled (500 records, some
#: 75,000 objects, 20-50 ms each). With the default they came every few hundred records, 50
#: (sp-referral) and 90 (sp-case) µs of CPU per record; with 100, 9.5 and 10 µs, peak memory 183 ->
#: 188 MB (20,000 records of each; the reference cycles left for them to free are a few hundred
#: objects each time). In a worker process (chunks of 200 records, and what the first chunk loaded)
#: 23 and 43 µs per record. Young collections, which free most cycles, are unchanged (#5).
MAPPING_FULL_COLLECTIONS = 100


def settle_for_mapping() -> None:
    """For a process about to map many records, having loaded what they need: freeze what is
    alive (:func:`freeze_what_is_alive`), and consider full collections only every
    :data:`MAPPING_FULL_COLLECTIONS` collections of generation 1 (young ones as they were)."""
    freeze_what_is_alive()
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, MAPPING_FULL_COLLECTIONS))
