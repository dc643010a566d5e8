"""The search parameters each resource type supports, from the R4 SearchParameter definitions.

Every R4 SearchParameter (``r4-searchparams.json``, generated from ``hl7.fhir.r4.core``) whose
``base`` names a type, or ``Resource``/``DomainResource``, is a parameter of that type; the types
we index are token, string, reference, date, number, quantity and uri
(https://hl7.org/fhir/R4/search.html#ptypes). ``composite`` and ``special`` parameters are known
but not supported: a search that uses one is answered as the request's ``Prefer: handling`` says.
``_id`` and ``_lastUpdated`` are answered from the store's own columns, not from the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from adapter.fhir import model

__all__ = ["INDEXED_TYPES", "SearchParam", "parameters_for"]

#: Parameter types the index holds values for.
INDEXED_TYPES = frozenset({"token", "string", "reference", "date", "number", "quantity", "uri"})

# Answered from the resources table (https://hl7.org/fhir/R4/search.html#all).
COLUMN_PARAMETERS = frozenset({"_id", "_lastUpdated"})


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter of one resource type."""

    code: str
    type: str
    expression: str | None
    targets: tuple[str, ...]
    url: str

    @property
    def supported(self) -> bool:
        return self.code in COLUMN_PARAMETERS or (self.type in INDEXED_TYPES and bool(self.expression))

    @property
    def indexed(self) -> bool:
        return self.code not in COLUMN_PARAMETERS and self.supported


@cache
def parameters_for(type: str) -> dict[str, SearchParam]:
    """The search parameters of resource type ``type``, by code (empty for an unknown type)."""
    found: dict[str, SearchParam] = {}
    bases = {type, "Resource"}
    if type not in ("Bundle", "Binary", "Parameters"):
        bases.add("DomainResource")
    for definition in model.search_parameters().values():
        if not bases.intersection(definition["base"]):
            continue
        code = definition["code"]
        # A type's own definition wins over the generic Resource/DomainResource one.
        if code in found and type not in definition["base"]:
            continue
        found[code] = SearchParam(
            code=code,
            type=definition["type"],
            expression=definition.get("expression"),
            targets=tuple(definition.get("target", ())),
            url=definition["url"],
        )
    return found
