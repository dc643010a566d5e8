"""Search index values of a resource: what each of its search parameters' FHIRPath expressions finds.

:func:`index_values` evaluates the expression of every supported parameter of the resource's type
(our compiled FHIRPath, :mod:`adapter.fhir.fhirpath`) and turns what it finds into rows for the
stores' index tables, one kind of row per parameter type (https://hl7.org/fhir/R4/search.html):

- token (and uri): ``(param, system, code)`` from Coding, CodeableConcept, Identifier,
  ContactPoint, code/boolean/string/uri primitives; a uri parameter has no system.
- string: ``(param, normalised, exact)``; normalised is case-folded with accents removed, as the
  spec's default string match asks ("case- and accent-insensitive"). HumanName and Address index
  each of their parts.
- reference: ``(param, target type, target id, url)``; ``Type/id`` references (relative, or the
  last two segments of an absolute URL) give type and id, every reference keeps its text.
- date: ``(param, low, high)``, the half-open UTC range the value covers (``2026`` covers the whole
  year); a Period with no end runs to the end of time.
- number and quantity: ``(param, value, system, code)``; a quantity's unit is indexed as its code
  when it has none.

``resolve() is Patient`` in an expression is answered from the reference itself (``Patient/1`` is
a Patient), as servers do, so that ``ServiceRequest.subject.where(resolve() is Patient)`` works on
a resource alone.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from adapter.fhir import fhirpath, model
from adapter.search.parameters import SearchParam, parameters_for

__all__ = [
    "DATE_MAX",
    "DATE_MIN",
    "IndexRows",
    "date_range",
    "index_values",
    "normalise",
    "parse_reference",
]

DATE_MIN = "0001-01-01T00:00:00.000000"
DATE_MAX = "9999-12-31T23:59:59.999999"

# https://hl7.org/fhir/R4/datatypes.html#dateTime, plus the minute precision search allows.
_DATE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
# Type/id at the end of a reference, optionally with a version (https://hl7.org/fhir/R4/references.html).
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")

_NAME_PARTS = ("text", "family", "given", "prefix", "suffix")
_ADDRESS_PARTS = ("text", "line", "city", "district", "state", "postalCode", "country")


@dataclass(slots=True)
class IndexRows:
    """The index rows of one resource, per table."""

    tokens: list[tuple[str, str | None, str]] = field(default_factory=list)
    strings: list[tuple[str, str, str]] = field(default_factory=list)
    references: list[tuple[str, str | None, str | None, str]] = field(default_factory=list)
    dates: list[tuple[str, str, str]] = field(default_factory=list)
    numbers: list[tuple[str, float, str | None, str | None]] = field(default_factory=list)


def normalise(text: str) -> str:
    """Case- and accent-insensitive form of a string (https://hl7.org/fhir/R4/search.html#string)."""
    if text.isascii():
        # The same for ASCII, where casefold() is lower() and NFKD changes nothing; most names are.
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _stamp(moment: datetime) -> str:
    # Fixed width, so that index rows compare as text in time order: isoformat writes the year with
    # four digits (strftime's %Y writes 999 for the year 999 on glibc, which sorted after 1000).
    return moment.isoformat(timespec="microseconds")


def date_range(text: str) -> tuple[str, str] | None:
    """The half-open UTC range ``[low, high)`` of a FHIR date, dateTime or instant, as fixed-width text.

    A value without a time zone is taken as UTC. None when ``text`` is not such a value.
    """
    match = _DATE.fullmatch(text.strip())
    if match is None:
        return None
    g = match.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            low = datetime(year, 1, 1)
            high = datetime(year + 1, 1, 1) if year < 9999 else None
        elif g["d"] is None:
            month = int(g["m"])
            low = datetime(year, month, 1)
            high = datetime(year + month // 12, month % 12 + 1, 1) if (year, month) < (9999, 12) else None
        elif g["H"] is None:
            low = datetime(year, int(g["m"]), int(g["d"]))
            high = low + timedelta(days=1)
        else:
            second = int(g["S"] or 0)
            fraction = g["f"] or ""
            micro = int((fraction + "000000")[:6])
            low = datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), second, micro)
            if g["S"] is None:
                step = timedelta(minutes=1)
            elif not fraction:
                step = timedelta(seconds=1)
            else:
                step = timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
            if g["tz"] and g["tz"] != "Z":
                sign = 1 if g["tz"][0] == "+" else -1
                offset = timedelta(hours=int(g["tz"][1:3]), minutes=int(g["tz"][4:6]))
                low = low.replace(tzinfo=UTC) - sign * offset
                low = low.replace(tzinfo=None)
            high = low + step
    except (ValueError, OverflowError):
        return None
    return _stamp(low), DATE_MAX if high is None else _stamp(high)


def parse_reference(text: str) -> tuple[str | None, str | None]:
    """(type, id) of a ``Type/id`` reference, relative or absolute; (None, None) otherwise."""
    match = _REFERENCE.search(text)
    if match is None or text.startswith(("#", "urn:")):
        return None, None
    return match.group(1), match.group(2)


def _resolve_by_type(reference: str) -> dict[str, Any] | None:
    """``resolve()`` for indexing: a stand-in of the type the reference names."""
    type, _ = parse_reference(reference)
    return None if type is None else {"resourceType": type}


def _plain(item: Any) -> Any:
    return item.value if item.__class__ is fhirpath.Prim else item


def _strings(value: Any, parts: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for part in parts:
        item = value.get(part)
        for text in item if isinstance(item, list) else (item,):
            if isinstance(text, str):
                found.append(text)
    return found


def _add(rows: IndexRows, param: SearchParam, item: Any) -> None:
    value = _plain(item)
    if value is None:
        return
    kind = param.type
    code = param.code
    if kind == "token":
        if isinstance(value, dict):
            if "coding" in value:
                for coding in value.get("coding") or ():
                    if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                        rows.tokens.append((code, coding.get("system"), coding["code"]))
            elif isinstance(value.get("code"), str):  # Coding, or a Quantity's code
                rows.tokens.append((code, value.get("system"), value["code"]))
            elif isinstance(value.get("value"), str):  # Identifier, ContactPoint
                rows.tokens.append((code, value.get("system"), value["value"]))
        elif isinstance(value, bool):
            rows.tokens.append((code, None, "true" if value else "false"))
        elif isinstance(value, str | int | Decimal):
            rows.tokens.append((code, None, str(value)))
    elif kind == "uri":
        if isinstance(value, str):
            rows.tokens.append((code, None, value))
    elif kind == "string":
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, dict):
            texts = _strings(value, _NAME_PARTS if "family" in value or "given" in value else _ADDRESS_PARTS)
        else:
            texts = []
        for text in dict.fromkeys(texts):
            rows.strings.append((code, normalise(text), text))
    elif kind == "reference":
        reference = value.get("reference") if isinstance(value, dict) else value
        if isinstance(reference, str) and reference:
            target_type, target_id = parse_reference(reference)
            rows.references.append((code, target_type, target_id, reference))
    elif kind == "date":
        if isinstance(value, str):
            found = date_range(value)
            if found:
                rows.dates.append((code, *found))
        elif isinstance(value, dict):
            if "start" in value or "end" in value:  # Period: open ends reach the end of time
                start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
                end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
                rows.dates.append((code, start[0] if start else DATE_MIN, end[1] if end else DATE_MAX))
            for event in value.get("event") or ():  # Timing
                found = date_range(event) if isinstance(event, str) else None
                if found:
                    rows.dates.append((code, *found))
    elif kind in ("number", "quantity"):
        if isinstance(value, int | Decimal | float) and not isinstance(value, bool):
            rows.numbers.append((code, float(value), None, None))
        elif isinstance(value, dict) and isinstance(value.get("value"), int | Decimal | float):
            unit_code = value.get("code") if isinstance(value.get("code"), str) else value.get("unit")
            if unit_code is None and isinstance(value.get("currency"), str):  # Money
                unit_code = value["currency"]
            rows.numbers.append((code, float(value["value"]), value.get("system"), unit_code))


def _operands(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The operands of a top-level union (``A | B | C``), left to right."""
    if tree.get("type") == "UnionExpression":
        left, right = tree["children"]
        return _operands(left) + _operands(right)
    return [tree]


#: ``Type.a.b``: a path of plain member steps (what most search parameters are).
_PLAIN_PATH = re.compile(r"([A-Z][A-Za-z]+)((?:\.[a-z][A-Za-z0-9]*)+)")
#: Steps the plain walk leaves to FHIRPath: they reach into primitives' extensions.
_NOT_PLAIN = frozenset({"extension", "modifierExtension", "id"})


class _PlainPath:
    """A path of plain member steps (``Patient.name.family``) walked over the JSON directly: what
    the compiled FHIRPath finds, without its per-step machinery (indexing is on every write).

    The values are the same as FHIRPath's, as :func:`_add` reads them: arrays are flattened at each
    step, and a primitive's ``_name`` part is left out (a primitive with no value indexes nothing,
    and one with a value indexes the value). Paths through a choice element (``value[x]``) or into
    extensions are not plain, and stay with FHIRPath."""

    __slots__ = ("names", "text")

    def __init__(self, text: str, names: tuple[str, ...]) -> None:
        self.text = text
        self.names = names

    def __repr__(self) -> str:
        return f"_PlainPath({self.text!r})"

    def __call__(self, resource: dict[str, Any], env: fhirpath.Env) -> list[Any]:
        focus: list[Any] = [resource]
        for name in self.names:
            found: list[Any] = []
            for item in focus:
                if item.__class__ is dict:
                    value = item.get(name)
                    if value.__class__ is list:
                        found.extend(value)
                    elif value is not None:
                        found.append(value)
            if not found:
                return found
            focus = found
        return [value for value in focus if value is not None]


def _plain_path(text: str, type: str) -> _PlainPath | None:
    """The plain walk of ``text`` on a ``type`` resource, or None when any step of it is not a
    plain element of the R4 model (a choice element, a primitive's inside, an unknown name)."""
    match = _PLAIN_PATH.fullmatch(text)
    if match is None:
        return None
    names = tuple(match.group(2)[1:].split("."))
    if _NOT_PLAIN.intersection(names):
        return None
    try:
        context = model.context_for(type)
        for depth, name in enumerate(names):
            child = context.children.get(name)
            if child is None or child.element.is_choice:
                return None
            if depth < len(names) - 1:
                if child.is_primitive or child.is_resource:
                    return None
                context = child.context()
    except KeyError:
        return None
    return _PlainPath(text, names)


Extractor = Callable[[dict[str, Any], fhirpath.Env], Sequence[Any]]


@cache
def _extractors(type: str) -> tuple[tuple[SearchParam, tuple[Extractor, ...]], ...]:
    """Per supported parameter of ``type``, the compiled expressions that can find anything in it.

    Parameters shared by many types (``clinical-patient``) have one union of 30 ``Type.path``
    operands; only the operands rooted at this type (or at no type) are kept, which makes indexing
    several times faster than evaluating the whole union.
    """
    found: list[tuple[SearchParam, tuple[Extractor, ...]]] = []
    for param in parameters_for(type).values():
        if not param.indexed or param.expression is None:
            continue
        tree = fhirpath.parse_tree(param.expression, search=True)
        operands = _operands(tree)
        kept = [op for op in operands if _applies(op.get("text", ""), type)]
        compiled: tuple[Extractor, ...]
        if len(kept) == len(operands):
            compiled = (_plain_path(param.expression, type) or fhirpath.compile_tree(param.expression, tree),)
        else:
            compiled = tuple(
                _plain_path(op.get("text", ""), type) or fhirpath.compile_tree(f"{param.url}#{op['text']}", op)
                for op in kept
            )
        if compiled:
            found.append((param, compiled))
    return tuple(found)


def _applies(text: str, type: str) -> bool:
    """Whether a union operand (its source text, spaces removed) may find values in a ``type``."""
    match = re.match(r"\(*([A-Z][A-Za-z]+)\.", text)
    return match is None or match.group(1) in (type, "Resource", "DomainResource")


#: One extractor of one parameter as :func:`index_values` runs it, with the first two names of its
#: path for a plain walk (the second None for a one-step path), else None and None.
_Step = tuple[SearchParam, Extractor, str | None, str | None]

# type -> (what _extractors gave, the steps made of it); remade when _extractors gives something else.
_STEPS: dict[str, tuple[object, tuple[_Step, ...]]] = {}


def _steps(type: str) -> tuple[_Step, ...]:
    """The extractors of ``type`` in order, as one flat tuple (the loop of :func:`index_values`)."""
    extractors = _extractors(type)
    known = _STEPS.get(type)
    if known is None or known[0] is not extractors:
        steps: list[_Step] = []
        for param, compiled in extractors:
            for expression in compiled:
                names = expression.names if isinstance(expression, _PlainPath) else (None,)
                steps.append((param, expression, names[0], names[1] if len(names) > 1 else None))
        known = _STEPS[type] = (extractors, tuple(steps))
    return known[1]


def index_values(resource: dict[str, Any]) -> IndexRows:
    """The index rows of ``resource`` for every supported parameter of its type."""
    rows = IndexRows()
    type = resource.get("resourceType")
    if not isinstance(type, str):
        return rows
    env = fhirpath.Env(resource=resource, resolve=_resolve_by_type)
    for param, expression, first_name, second_name in _steps(type):
        if first_name is not None:
            # A plain walk. Most name an element the resource does not have (or, like the meta.*
            # ones, an object without the next element): no walk for those.
            first = resource.get(first_name)
            if first is None or (
                second_name is not None and first.__class__ is dict and first.get(second_name) is None
            ):
                continue
            found = expression(resource, env)
        else:
            try:
                found = expression(resource, env)
            except fhirpath.FHIRPathError:
                continue  # a value the expression cannot handle is simply not searchable
        for item in found:
            _add(rows, param, item)
    rows.tokens = list(dict.fromkeys(rows.tokens))
    rows.strings = list(dict.fromkeys(rows.strings))
    rows.references = list(dict.fromkeys(rows.references))
    rows.dates = list(dict.fromkeys(rows.dates))
    rows.numbers = list(dict.fromkeys(rows.numbers))
    return rows
