"""What a mapping produces, whoever builds it: the declarative engine or a named builder.

A mapping turns one source record into :class:`MappedResource` items (FHIR R4 resources as dicts,
each with its deterministic ``id`` and ``meta.profile``) plus a trace: the source fields it did not
use and the defaults it applied (``../shared/style.md`` rule 5). The engine
(:mod:`adapter.mapping.engine`) validates them, wraps them in a transaction Bundle with conditional
creates, and adds a Provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Mapped", "MappedResource", "MappingError"]

from adapter.errors import InputError


class MappingError(InputError):
    """A source record the mapping cannot take: names the record, the field and the reason."""

    def __init__(self, message: str, *, record: int | None = None, field: str | None = None) -> None:
        where = "record" if record is None else f"record[{record}]"
        super().__init__(message, expression=f"{where}.{field}" if field else where)
        self.record = record
        self.field = field


@dataclass(slots=True)
class MappedResource:
    """One resource of a mapped record.

    ``if_none_exist`` is its business identity as a search (``identifier=system|value``, see
    :func:`adapter.mapping.ids.identity`): the resource is written as a conditional create on it,
    so the same person or practice arriving twice is stored once. ``None`` for resources that are
    written by id (``PUT Type/id``).
    """

    resource: dict[str, Any]
    if_none_exist: str | None = None
    #: The spec's name for the resource (``patient``), when a spec's rules made it.
    key: str | None = None


@dataclass(slots=True)
class Mapped:
    """The resources of one source record, and its trace."""

    resources: list[MappedResource] = field(default_factory=list)
    #: Source fields (or paths, for FHIR sources) that had a value but went into no resource.
    unused: list[str] = field(default_factory=list)
    #: ``field=value`` for each default the mapping applied because the source had no value.
    defaults: list[str] = field(default_factory=list)
