"""Compiled twins of the hottest modules (docs/decisions/0006-compiled-modules.md).

At install time the build hook (``hatch_build.py``) compiles each module in :data:`COMPILED`
with Cython, unchanged: the same source, run as C instead of bytecode (an augmenting ``.pxd``
next to a module may declare types for its classes). Each compiled module lands in a folder of
its own under ``adapter/_native/`` with the SHA-256 of the source it was built from.

A package that holds such modules calls :func:`prefer_compiled` from its ``__init__``: the
folder of every compiled module whose source is unchanged goes in front of the package's own
folder in ``__path__``, so ``import adapter.validation.structure`` loads the compiled module. A
module edited since the build, a machine where the build could not compile (no C compiler), or
``SPFHIR_PURE_PYTHON=1`` in the environment, and the plain source runs: the same results, slower.

This module is read by the build hook too, so it uses the standard library only.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

__all__ = [
    "COMPILED",
    "NATIVE",
    "PURE_PYTHON",
    "compiled_modules",
    "module_source",
    "prefer_compiled",
    "source_digest",
    "source_files",
]

#: Modules compiled at install time, each kept for a measured gain (docs/benchmarks.md):
#: - the structural walk, most of a validation pass: with the types of structure.pxd a pass over
#:   the R4 examples took 2.85-3.0 s instead of 3.45-3.6 s (#2);
#: - the mapping engine, profile validation and the run that drives them, and the SQL store's
#:   write path with its search index values: mapping in one process 1,455-1,470 -> 1,650-1,750
#:   records/s (12,000 records, alternated), bench.map's ingest 818 -> 885-950 records/s (#5).
#: fhirpath.py, invariants.py, model.py, query.py and the mapping's sources, helpers and ids
#: gained nothing measurable on either and are left out.
COMPILED = (
    "adapter.mapping.engine",
    "adapter.mapping.run",
    "adapter.search.index",
    "adapter.store._common",
    "adapter.store.sql",
    "adapter.validation.paths",
    "adapter.validation.profiles",
    "adapter.validation.structure",
    "adapter.validation.xhtml",
)

#: Where the build hook puts the compiled modules, one folder per module.
NATIVE = Path(__file__).parent / "_native"

#: Set to any non-empty value to run every module as plain Python.
PURE_PYTHON = "SPFHIR_PURE_PYTHON"


def module_source(module: str, root: Path) -> Path:
    """The ``.py`` file of ``module`` (``adapter.store.sql``) under the project ``root``."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_files(source: Path) -> list[Path]:
    """What a module is compiled from: its ``.py`` and, when there is one, its ``.pxd``."""
    pxd = source.with_suffix(".pxd")
    return [source, pxd] if pxd.exists() else [source]


def source_digest(source: Path) -> str:
    """SHA-256 of :func:`source_files` (a ``.pxd`` changes what is compiled)."""
    digest = hashlib.sha256()
    for file in source_files(source):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def prefer_compiled(
    package: str, path: list[str], *, modules: tuple[str, ...] = COMPILED, native: Path = NATIVE
) -> None:
    """Put the folders of ``package``'s up-to-date compiled modules in front of ``path``."""
    if os.environ.get(PURE_PYTHON):
        return
    source_folder = Path(path[-1])
    for module in modules:
        parent, _, name = module.rpartition(".")
        if parent != package:
            continue
        folder = native / module
        try:
            built = (folder / "source.sha256").read_text().strip()
            current = source_digest(source_folder / f"{name}.py")
        except OSError:
            continue
        # A module built for another interpreter has another file suffix: the import skips it.
        if built == current:
            path.insert(0, str(folder))


def compiled_modules() -> list[str]:
    """The modules of :data:`COMPILED` that are loaded, and loaded compiled."""
    suffixes = tuple(EXTENSION_SUFFIXES)
    return [m for m in COMPILED if (getattr(sys.modules.get(m), "__file__", None) or "").endswith(suffixes)]
