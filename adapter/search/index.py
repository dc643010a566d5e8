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
from functools import cache, lru_cache, partial
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


@lru_cache(maxsize=4096)
def date_range(text: str) -> tuple[str, str] | None:
    """The half-open UTC range ``[low, high)`` of a FHIR date, dateTime or instant, as fixed-width text.

    A value without a time zone is taken as UTC. None when ``text`` is not such a value. Remembered
    for the last few thousand values: written resources repeat their dates (an ingest of 9,000
    records indexes 33,018 dates, 545 different ones), and working one out takes 3-4 µs.
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


@lru_cache(maxsize=4096)
def parse_reference(text: str) -> tuple[str | None, str | None]:
    """(type, id) of a ``Type/id`` reference, relative or absolute; (None, None) otherwise.

    Remembered for the last few thousand references: the resources of a record refer to the same
    few (its Patient, practitioner, organisation), each several times."""
    match = _REFERENCE.search(text)
    if match is None or text.startswith(("#", "urn:")):
        return None, None
    return match.group(1), match.group(2)


def _resolve_by_type(reference: str) -> dict[str, Any] | None:
    """``resolve()`` for indexing: a stand-in of the type the reference names."""
    type, _ = parse_reference(reference)
    return None if type is None else {"resourceType": type}


def _strings(value: Any, parts: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for part in parts:
        item = value.get(part)
        for text in item if isinstance(item, list) else (item,):
            if isinstance(text, str):
                found.append(text)
    return found


def _add_token(rows: IndexRows, code: str, value: Any) -> None:
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


def _add_uri(rows: IndexRows, code: str, value: Any) -> None:
    if isinstance(value, str):
        rows.tokens.append((code, None, value))


def _add_string(rows: IndexRows, code: str, value: Any) -> None:
    if isinstance(value, str):
        rows.strings.append((code, normalise(value), value))
        return
    if isinstance(value, dict):
        texts = _strings(value, _NAME_PARTS if "family" in value or "given" in value else _ADDRESS_PARTS)
        for text in dict.fromkeys(texts):
            rows.strings.append((code, normalise(text), text))


def _add_reference(rows: IndexRows, code: str, value: Any) -> None:
    reference = value.get("reference") if isinstance(value, dict) else value
    if isinstance(reference, str) and reference:
        target_type, target_id = parse_reference(reference)
        rows.references.append((code, target_type, target_id, reference))


def _add_date(rows: IndexRows, code: str, value: Any) -> None:
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


def _add_number(rows: IndexRows, code: str, value: Any) -> None:
    if isinstance(value, int | Decimal | float) and not isinstance(value, bool):
        rows.numbers.append((code, float(value), None, None))
    elif isinstance(value, dict) and isinstance(value.get("value"), int | Decimal | float):
        unit_code = value.get("code") if isinstance(value.get("code"), str) else value.get("unit")
        if unit_code is None and isinstance(value.get("currency"), str):  # Money
            unit_code = value["currency"]
        rows.numbers.append((code, float(value["value"]), value.get("system"), unit_code))


_Add = Callable[[IndexRows, str, Any], None]

#: What a value found for a parameter adds to the rows, by the parameter's type.
_ADDERS: dict[str, _Add] = {
    "token": _add_token,
    "uri": _add_uri,
    "string": _add_string,
    "reference": _add_reference,
    "date": _add_date,
    "number": _add_number,
    "quantity": _add_number,
}


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

#: What a walk finds in a resource: its values, or None when the resource is not one the walk
#: answers for (then the compiled FHIRPath does; a plain path always answers).
_Find = Callable[[dict[str, Any]], list[Any] | None]
#: One step of a walk: what it finds in the values found so far (None: see :data:`_Find`).
_Step = Callable[[list[Any]], list[Any] | None]


def _member_step(name: str) -> _Step:
    def step(focus: list[Any]) -> list[Any] | None:
        found: list[Any] = []
        for item in focus:
            if item.__class__ is dict:
                value = item.get(name)
                if value.__class__ is list:
                    found.extend(value)
                elif value is not None:
                    found.append(value)
        return found

    return step


def _follow(steps: tuple[_Step, ...], resource: dict[str, Any]) -> list[Any] | None:
    """The values ``steps`` find from ``resource``, one after the other (JSON nulls left out)."""
    focus: list[Any] = [resource]
    for step in steps:
        found = step(focus)
        if not found:
            return found
        focus = found
    return [value for value in focus if value is not None]


def _listed(value: Any) -> list[Any]:
    """A property's value as the list of its items (JSON nulls left out)."""
    if value.__class__ is list:
        return [item for item in value if item is not None]
    return [] if value is None else [value]


def _one_step(name: str) -> _Find:
    def find(resource: dict[str, Any]) -> list[Any] | None:
        return _listed(resource.get(name))

    return find


def _two_steps(first: str, second: str, walk: _Find) -> _Find:
    """``a.b`` without the loop of :func:`_follow` when ``a`` is an object (``meta.profile``)."""

    def find(resource: dict[str, Any]) -> list[Any] | None:
        value = resource.get(first)
        if value.__class__ is dict:
            return _listed(value.get(second))
        return walk(resource) if value.__class__ is list else []

    return find


class _PlainPath:
    """A path of plain member steps (``Patient.name.family``) walked over the JSON directly: what
    the compiled FHIRPath finds, without its per-step machinery (indexing is on every write).

    The values are the same as FHIRPath's, as :data:`_ADDERS` read them: arrays are flattened at each
    step, and a primitive's ``_name`` part is left out (a primitive with no value indexes nothing,
    and one with a value indexes the value). Paths through a choice element (``value[x]``) or into
    extensions are not plain, and stay with FHIRPath (or :class:`_Walk`)."""

    __slots__ = ("find", "roots", "text")

    def __init__(self, text: str, names: tuple[str, ...]) -> None:
        self.text = text
        #: The resource finds nothing without one of these elements.
        self.roots = frozenset({names[0]})
        # Most parameters are one or two steps: those without the loop.
        self.find: _Find
        if len(names) == 1:
            self.find = _one_step(names[0])
        else:
            walk: _Find = partial(_follow, tuple(_member_step(name) for name in names))
            self.find = _two_steps(names[0], names[1], walk) if len(names) == 2 else walk

    def __repr__(self) -> str:
        return f"_PlainPath({self.text!r})"


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


# -- walks: the few FHIRPath forms besides plain paths that search parameters use most ------------
#
# ``Type.a.where(resolve() is Patient)`` (every clinical type's ``patient``), ``Type.a.value[x]``
# (``Observation.effective``), ``(Type.value.ofType(Quantity))``, ``Type.telecom.where(system='email')``
# and unions of these and plain paths, walked over the JSON as :class:`_PlainPath` is. Each step
# answers only for what it knows FHIRPath's answer to (one ``value[x]`` property, a reference that
# is not ``#contained``, a string ``system``...); on anything else the walk gives None and the
# compiled expression runs, so the rows are FHIRPath's whatever the resource holds.


def _choice_step(name: str, keys: frozenset[str], wanted: frozenset[str]) -> _Step:
    """``name[x]``, optionally ``.ofType(T)``: the one property of ``keys`` (every form of the
    choice, ``_name`` parts included) that each object has, kept when it is one of ``wanted``."""

    def step(focus: list[Any]) -> list[Any] | None:
        found: list[Any] = []
        for item in focus:
            if item.__class__ is not dict:
                continue
            present = keys.intersection(item)
            if not present:
                continue
            if len(present) > 1:
                return None  # several forms (or a _name part): FHIRPath picks by key order
            (key,) = present
            if key not in wanted:
                if key[0] == "_" or key == name:
                    return None
                continue
            value = item[key]
            if value is None or value.__class__ is list or (value.__class__ is dict and "resourceType" in value):
                return None
            found.append(value)
        return found

    return step


def _resolves_step(target: str) -> _Step:
    """``where(resolve() is T)``: references that name a ``T`` (``resolve()`` while indexing is
    :func:`_resolve_by_type`); ``#id`` ones resolve to contained resources, which FHIRPath looks up."""

    def step(focus: list[Any]) -> list[Any] | None:
        found: list[Any] = []
        for item in focus:
            reference = item.get("reference") if item.__class__ is dict else item
            if reference.__class__ is not str:
                continue
            if reference.startswith("#"):
                return None
            named = parse_reference(reference)[0]
            if named is not None and fhirpath._is_subtype(named, target):
                found.append(item)
        return found

    return step


def _equals_step(member: str, literal: str) -> _Step:
    """``where(member = 'literal')`` on objects whose ``member`` is a string or absent."""
    extension = "_" + member

    def step(focus: list[Any]) -> list[Any] | None:
        found: list[Any] = []
        for item in focus:
            if item.__class__ is not dict:
                return None
            value = item.get(member)
            if value.__class__ is str:
                if value == literal:
                    found.append(item)
            elif value is not None or extension in item:
                return None
        return found

    return step


def _union_of(parts: tuple[_Find, ...]) -> _Find:
    """``A | B``: FHIRPath's union drops repeated items; here they give repeated rows, which
    :func:`index_values` drops, so only objects and strings (equal only when they give the same
    rows) are answered for."""

    def find(resource: dict[str, Any]) -> list[Any] | None:
        found: list[Any] = []
        for part in parts:
            items = part(resource)
            if items is None:
                return None
            found.extend(items)
        for item in found:
            if item.__class__ is not dict and item.__class__ is not str:
                return None
        return found

    return find


class _Walk:
    """A search expression of the forms above (``find``), or a union of those and plain paths;
    ``compiled`` when it does not answer (see :data:`_Find`)."""

    __slots__ = ("compiled", "find", "roots", "text")

    def __init__(self, text: str, find: _Find, roots: frozenset[str], compiled: fhirpath.Compiled) -> None:
        self.text = text
        self.find = find
        #: The resource finds nothing without one of these elements.
        self.roots = roots
        self.compiled = compiled

    def __repr__(self) -> str:
        return f"_Walk({self.text!r})"


def _identifier(node: dict[str, Any]) -> str | None:
    """The name of a MemberInvocation node, else None."""
    if node.get("type") != "MemberInvocation":
        return None
    children: list[dict[str, Any]] = node.get("children") or []
    return children[0].get("text") if len(children) == 1 and children[0].get("type") == "Identifier" else None


def _term(node: dict[str, Any]) -> dict[str, Any] | None:
    """What a TermExpression holds (through parentheses), else None."""
    children: list[dict[str, Any]] = node.get("children") or []
    if node.get("type") != "TermExpression" or len(children) != 1:
        return None
    inner: dict[str, Any] = children[0]
    if inner.get("type") == "ParenthesizedTerm":
        enclosed: dict[str, Any] = inner["children"][0]
        return _term(enclosed) if enclosed.get("type") == "TermExpression" else enclosed
    if inner.get("type") == "InvocationTerm" and len(inner.get("children") or ()) == 1:
        found: dict[str, Any] = inner["children"][0]
        return found
    return None


_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]+|[a-z][A-Za-z]+")
_STRING_LITERAL = re.compile(r"'([^'\\]*)'")


def _function_step(node: dict[str, Any]) -> tuple[str, ...] | None:
    """``("ofType", T)``, ``("resolves", T)`` or ``("equals", member, literal)`` for a
    FunctionInvocation node of those forms, else None."""
    functn: dict[str, Any] = (node.get("children") or [{}])[0]
    children: list[dict[str, Any]] = functn.get("children") or []
    if functn.get("type") != "Functn" or len(children) != 2 or children[1].get("type") != "ParamList":
        return None
    name, params = children[0].get("text"), children[1].get("children") or []
    if len(params) != 1:
        return None
    param = params[0]
    if name == "ofType":
        of = _identifier(_term(param) or {})
        return ("ofType", of) if of is not None and _TYPE_NAME.fullmatch(of) and model.has_type(of) else None
    if name != "where" or len(param.get("children") or ()) != 2:
        return None
    left, right = param["children"]
    if param.get("type") == "TypeExpression" and param.get("terminalNodeText") == ["is"]:
        target = right.get("text") or ""
        resolve = _term(left) or {}
        if (
            left.get("text") == "resolve()"
            and resolve.get("type") == "FunctionInvocation"
            and right.get("type") == "TypeSpecifier"
            and _TYPE_NAME.fullmatch(target)
            and (model.has_type(target) or target in ("Resource", "DomainResource"))
        ):
            return ("resolves", target)
        return None
    if param.get("type") == "EqualityExpression" and param.get("terminalNodeText") == ["="]:
        member = _identifier(_term(left) or {})
        literal = _STRING_LITERAL.fullmatch(right.get("text") or "")
        inside = right.get("children") or [{}]
        if member is not None and literal is not None and inside[0].get("type") == "LiteralTerm":
            return ("equals", member, literal.group(1))
    return None


def _invocations(node: dict[str, Any]) -> list[tuple[str, ...]] | None:
    """The steps of ``Type.a.b.f(...)...`` as ``("member", name)`` and :func:`_function_step`
    tuples, else None."""
    if node.get("type") == "TermExpression":
        inner = _term(node) or {}
        if inner.get("type") == "InvocationExpression":
            return _invocations(inner)
        name = _identifier(inner)
        return None if name is None else [("member", name)]
    children: list[dict[str, Any]] = node.get("children") or []
    if node.get("type") != "InvocationExpression" or len(children) != 2:
        return None
    left = _invocations(children[0])
    if left is None:
        return None
    name = _identifier(children[1])
    if name is not None:
        return [*left, ("member", name)]
    step = _function_step(children[1]) if children[1].get("type") == "FunctionInvocation" else None
    return None if step is None else [*left, step]


def _choice_keys(context: model.Context, name: str) -> tuple[frozenset[str], dict[str, str]] | None:
    """Every property name of the choice element ``name[x]`` of ``context`` (``_name`` parts too),
    and property -> type code for the value ones; as FHIRPath finds them (by the suffixes of all R4)."""
    if not any(child.element.is_choice and child.element.name == name for child in context.children.values()):
        return None
    suffixes = model.choice_suffixes().get(name)
    if not suffixes:
        return None
    codes = {name + suffix: code for suffix, code in suffixes.items()}
    return frozenset({name, "_" + name, *codes, *("_" + key for key in codes)}), codes


def _walk(text: str, tree: dict[str, Any], type: str, compiled: fhirpath.Compiled) -> _Walk | None:
    """The walk of ``tree`` on a ``type`` resource, or None when it is not of the forms above."""
    found = _invocations(tree)
    if not found or found[0][0] != "member" or not fhirpath._is_subtype(type, found[0][1]):
        return None
    context: model.Context | None = model.context_for(type)
    steps: list[_Step] = []
    roots: frozenset[str] | None = None
    plain = True
    index = 1
    while index < len(found):
        kind, *args = found[index]
        if kind == "member":
            name = args[0]
            child = context.children.get(name) if context is not None and name not in _NOT_PLAIN else None
            if child is not None and not child.element.is_choice:
                steps.append(_member_step(name))
                roots = roots or frozenset({name})  # _member_step reads no _name part
                context = None if child.is_primitive or child.is_resource else child.context()
            else:
                choice = _choice_keys(context, name) if context is not None else None
                if choice is None:
                    return None
                keys, codes = choice
                of = found[index + 1][1] if index + 1 < len(found) and found[index + 1][0] == "ofType" else None
                wanted = frozenset(key for key, code in codes.items() if of is None or fhirpath._is_subtype(code, of))
                steps.append(_choice_step(name, keys, wanted))
                roots = roots or keys
                plain = False
                # After a choice only its ofType(T) tells the type the next steps go into.
                context = None if of is None or model.is_primitive(of) else model.context_for(of)
                index += 1 if of is not None else 0
        elif kind == "resolves":
            steps.append(_resolves_step(args[0]))
            plain = False
        elif kind == "equals" and context is not None:
            member = context.children.get(args[0])
            if member is None or member.element.is_choice or not member.is_primitive:
                return None
            steps.append(_equals_step(args[0], args[1]))
            plain = False
        else:
            return None
        index += 1
    if plain or roots is None:
        return None  # a plain path, or the resource itself
    return _Walk(text, partial(_follow, tuple(steps)), roots, compiled)


def _fast(key: str, text: str, tree: dict[str, Any], type: str) -> Extractor:
    """The fastest exact extractor of the expression ``text`` (``tree``) on a ``type`` resource: a
    plain path, a walk, a union of those, or the FHIRPath compiled under ``key``."""
    plain = _plain_path(text, type)
    if plain is not None:
        return plain
    compiled = fhirpath.compile_tree(key, tree)
    operands = _operands(tree)
    if len(operands) == 1:
        return _walk(key, tree, type, compiled) or compiled
    parts = [_plain_path(op.get("text", ""), type) or _walk(op.get("text", ""), op, type, compiled) for op in operands]
    walks = [part for part in parts if part is not None]
    if len(walks) < len(parts):
        return compiled
    roots = frozenset[str]().union(*(part.roots for part in walks))
    return _Walk(key, _union_of(tuple(part.find for part in walks)), roots, compiled)


#: How a parameter's expression is evaluated on a resource: a plain path, a walk, or the compiled FHIRPath.
Extractor = _PlainPath | _Walk | fhirpath.Compiled


@cache
def _extractors(type: str) -> tuple[tuple[SearchParam, tuple[Extractor, ...]], ...]:
    """Per supported parameter of ``type``, the compiled expressions that can find anything in it.

    Parameters shared by many types (``clinical-patient``) have one union of 30 ``Type.path``
    operands; only the operands rooted at this type (or at no type) are kept, which makes indexing
    several times faster than evaluating the whole union. Each is a plain path or a walk where it
    can be (:func:`_fast`).
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
            compiled = (_fast(param.expression, param.expression, tree, type),)
        else:
            compiled = tuple(_fast(f"{param.url}#{op['text']}", op.get("text", ""), op, type) for op in kept)
        if compiled:
            found.append((param, compiled))
    return tuple(found)


def _applies(text: str, type: str) -> bool:
    """Whether a union operand (its source text, spaces removed) may find values in a ``type``."""
    match = re.match(r"\(*([A-Z][A-Za-z]+)\.", text)
    return match is None or match.group(1) in (type, "Resource", "DomainResource")


#: One extractor of one parameter as :func:`index_values` runs it: the walk (None for FHIRPath
#: alone), the compiled FHIRPath (None for a plain path), what a value adds, the parameter's code.
_Run = tuple[_Find | None, fhirpath.Compiled | None, _Add, str]

#: Resource shapes (its property names in order) remembered per type: a bound on the memory a
#: stream of odd resources can take; ingest writes a few shapes a type.
_SHAPES = 512


class _Runs:
    """The extractors of a type as :func:`index_values` runs them, and per shape of resource
    (:data:`_SHAPES`) the ones that may find something in it: those with none of their root
    elements in a resource find nothing (the walks' ``roots``), and are not run."""

    __slots__ = ("extractors", "runs", "shapes")

    def __init__(self, extractors: tuple[tuple[SearchParam, tuple[Extractor, ...]], ...]) -> None:
        self.extractors = extractors
        self.runs: list[tuple[_Run, frozenset[str] | None]] = []
        for param, compiled in extractors:
            add = _ADDERS[param.type]  # indexed parameters are of these types
            for expression in compiled:
                if isinstance(expression, _PlainPath):
                    self.runs.append(((expression.find, None, add, param.code), expression.roots))
                elif isinstance(expression, _Walk):
                    self.runs.append(((expression.find, expression.compiled, add, param.code), expression.roots))
                else:
                    self.runs.append(((None, expression, add, param.code), None))
        self.shapes: dict[tuple[str, ...], tuple[_Run, ...]] = {}

    def of(self, shape: tuple[str, ...]) -> tuple[_Run, ...]:
        found = self.shapes.get(shape)
        if found is None:
            if len(self.shapes) >= _SHAPES:
                self.shapes.clear()
            found = self.shapes[shape] = tuple(
                run for run, roots in self.runs if roots is None or not roots.isdisjoint(shape)
            )
        return found


# type -> its runs; remade when _extractors gives something else.
_RUNS: dict[str, _Runs] = {}


def index_values(resource: dict[str, Any]) -> IndexRows:
    """The index rows of ``resource`` for every supported parameter of its type."""
    rows = IndexRows()
    type = resource.get("resourceType")
    if not isinstance(type, str):
        return rows
    extractors = _extractors(type)
    runs = _RUNS.get(type)
    if runs is None or runs.extractors is not extractors:
        runs = _RUNS[type] = _Runs(extractors)
    env: fhirpath.Env | None = None
    for find, compiled, add, code in runs.of(tuple(resource)):
        found: Sequence[Any] | None = None if find is None else find(resource)
        if found is None:
            assert compiled is not None
            if env is None:
                env = fhirpath.Env(resource=resource, resolve=_resolve_by_type)
            try:
                found = compiled(resource, env)
            except fhirpath.FHIRPathError:
                continue  # a value the expression cannot handle is simply not searchable
        for item in found:
            if item.__class__ is fhirpath.Prim:
                item = item.value
            if item is not None:
                add(rows, code, item)
    if len(rows.tokens) > 1:
        rows.tokens = list(dict.fromkeys(rows.tokens))
    if len(rows.strings) > 1:
        rows.strings = list(dict.fromkeys(rows.strings))
    if len(rows.references) > 1:
        rows.references = list(dict.fromkeys(rows.references))
    if len(rows.dates) > 1:
        rows.dates = list(dict.fromkeys(rows.dates))
    if len(rows.numbers) > 1:
        rows.numbers = list(dict.fromkeys(rows.numbers))
    return rows
