"""A long mapping in one process considers full collections less often while it runs, and sets the
collector back when it ends (issue #5: full collections walked the batch being filled, 50-90 µs of
CPU per record)."""

from __future__ import annotations

import gc
from pathlib import Path

from adapter.mapping.run import Summary, run
from adapter.mapping.spec import load
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator
from bench.map import write_inputs


def test_full_collections_come_less_often_during_a_long_mapping_and_as_before_after(tmp_path: Path) -> None:
    path = write_inputs(tmp_path, 130)["sp-outcomes"]
    validator = ProfileValidator(bundled_packages())
    before = gc.get_threshold()
    during: list[tuple[int, int, int]] = []
    try:
        with path.open("rb") as handle:
            for _ in run(load("sp-outcomes"), handle, validator, Summary("sp-outcomes", path.name), batch_size=20):
                during.append(gc.get_threshold())
        # The first batch comes before the mapping has warmed up (100 records), later ones after.
        assert during[0] == before
        assert (before[0], before[1], max(before[2], 100)) in during[5:]
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()  # leave the test process as it was
        gc.set_threshold(*before)
