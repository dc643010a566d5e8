"""``adapter.memory``: the collector paused from several threads at once."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from adapter.memory import collection_paused


def test_the_collector_is_on_again_only_when_the_last_thread_leaves() -> None:
    """Thread A pauses, B pauses, A leaves: still paused (B is building); B leaves: on again. With
    a bare isenabled/disable/enable per thread, B saw it off and left it off for good."""
    assert gc.isenabled()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def a() -> None:
        with collection_paused():
            a_in.set()
            b_in.wait(5)
        seen["after a"] = gc.isenabled()
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with collection_paused():
            b_in.set()
            a_out.wait(5)
            seen["inside b, a gone"] = gc.isenabled()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after a": False, "inside b, a gone": False}
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_long_mapping_in_one_process_freezes_what_it_loaded(tmp_path: Path) -> None:
    """After its first records a mapping moves what it loaded out of the collector's way (full
    collections walked it: 123 -> 42 µs of CPU per record)."""
    from adapter.mapping.run import Summary, run
    from adapter.mapping.spec import load
    from adapter.validation.bundled import bundled_packages
    from adapter.validation.profiles import ProfileValidator
    from bench.map import write_inputs

    path = write_inputs(tmp_path, 120)["sp-outcomes"]
    validator = ProfileValidator(bundled_packages())
    gc.unfreeze()
    try:
        with path.open("rb") as handle:
            for _ in run(load("sp-outcomes"), handle, validator, Summary("sp-outcomes", path.name)):
                pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_spfhir_validate_collects_for_bulk_work_and_sets_the_thresholds_back(tmp_path: Path) -> None:
    """Parsed inputs hold no reference cycles: over the R4 examples Python's thresholds cost 0.46 s
    of collections a 4 s pass (#2). The CLI's loop runs with BULK_THRESHOLDS, and leaves the
    collector as it found it (the command also runs inside test processes)."""
    import json

    from typer.testing import CliRunner

    from adapter import memory
    from adapter.cli import app

    seen: list[tuple[int, int, int]] = []
    original = memory.collect_for_bulk_work

    def spy() -> None:
        original()
        seen.append(gc.get_threshold())

    (tmp_path / "p.json").write_text(json.dumps({"resourceType": "Patient", "gender": "female"}))
    before = gc.get_threshold()
    memory.collect_for_bulk_work = spy
    try:
        result = CliRunner().invoke(app, ["validate", "--quiet", str(tmp_path)])
    finally:
        memory.collect_for_bulk_work = original
    assert result.exit_code == 0, result.output
    assert seen == [memory.BULK_THRESHOLDS]
    assert gc.get_threshold() == before


def test_thresholds_kept_sets_them_back_even_when_the_block_fails() -> None:
    from adapter.memory import thresholds_kept

    before = gc.get_threshold()
    try:
        with thresholds_kept():
            gc.set_threshold(12_345, 7, 3)
            raise RuntimeError("the block fails")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
