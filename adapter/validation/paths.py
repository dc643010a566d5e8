"""Issue locations as cheap linked tuples, rendered to FHIRPath only when an issue is raised.

A path is the root expression (``"Patient"``) or ``(parent, segment)`` where segment is already
written as FHIRPath (``".name"``, ``"[0]"``, ``".value.ofType(Quantity)"``). Building a tuple per
node costs far less than formatting a string per node, and most nodes never raise an issue.
"""

from __future__ import annotations

from typing import TypeAlias

Path: TypeAlias = "str | tuple[Path, str]"

_INDEX = tuple(f"[{i}]" for i in range(256))
# Grown to the longest list met so far (up to _CACHED): the snapshots of the R4 definition Bundles
# have lists of hundreds of elements, whose segments were otherwise formatted on every walk (#2).
_longer: tuple[str, ...] = _INDEX
_CACHED = 65536


def index(i: int) -> str:
    return _INDEX[i] if i < 256 else f"[{i}]"


def indexes(n: int) -> tuple[str, ...]:
    """The segments ``[0]`` to ``[n-1]`` (at least), to zip with the items of a list."""
    global _longer
    if n <= 256:
        return _INDEX
    if n > len(_longer):
        more = _longer + tuple(f"[{i}]" for i in range(len(_longer), n))
        if n > _CACHED:
            return more
        _longer = more
    return _longer


def render(path: Path) -> str:
    parts: list[str] = []
    while isinstance(path, tuple):
        path, segment = path
        parts.append(segment)
    parts.append(path)
    return "".join(reversed(parts))
