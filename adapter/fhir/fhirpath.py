"""A fast FHIRPath evaluator for the R4 invariants, compiled to Python closures.

API
---
``compile_expression(text) -> Compiled`` (cached by text; ``UnsupportedExpression`` when the text
does not parse or uses something not implemented). ``compiled(node, env)`` returns the result
collection (a new list); ``compiled.test(node, env)`` evaluates it as an invariant: True, False, or
None for an empty result, through the Boolean compilation (faster: no result lists; use it in
validators).
``evaluate_invariant(text, node, env)`` does the same from the text. ``node`` is a JSON value of the
resource (dict, primitive, or :class:`Prim` for a primitive with a ``_name`` part; build those with
:func:`property_values`) or a list taken as the input collection. :class:`Env` carries %resource,
%rootResource, %context and the ``resolve`` hook; use one Env per resource (it caches
per-resource work by object identity, so make a new one after changing a resource in place).

Design
------
The text is parsed with fhirpathpy's ANTLR grammar (its generated lexer, parser and AST listener,
but with errors raised instead of silently recovered, and the whole input required). The AST is
compiled into nested closures ``fn(focus, this, env)``: ``focus`` is the input collection of an
invocation (the left side of ``.``), ``this`` is ``$this`` (the root, or the current item inside
``where``, ``select``, ``all``, ...). Collections are plain lists that are never mutated once built,
so navigation hands back the resource's own JSON lists without copying. Logical operators,
comparisons and Boolean functions have a second compilation, ``compile_bool``, whose closures
return True/False/None, so an invariant builds almost no lists. Common shapes are fused:
``a.b.c`` is one closure, ``x.exists()``/``x.empty()`` test the dict directly,
``children().count()``, ``children().x`` and ``descendants().x`` skip the intermediate nodes,
string functions bind literal arguments (and regexes) at compile time, and inside a lambda a
subexpression that depends only on %resource/%rootResource and literals (sdf-8's
``%resource.snapshot.element.first().path`` inside ``all()``) is computed once per resource.
``Compiled.test`` then runs Python source generated from the Boolean compilation
(:mod:`adapter.fhir.fhirpath_codegen`): the same work without a call per step, same results.

Data model: resources are the parsed JSON (``adapter.fhir.json_format.loads``): dicts for
resources and complex elements, ``str``/``bool``/``int``/``Decimal`` for primitive values. A
primitive that has a ``_name`` part (id/extensions, https://hl7.org/fhir/R4/json.html#primitive)
becomes a :class:`Prim` carrying the value (None when there is none: ``hasValue()`` false,
``exists()`` true, ``extension(url)`` works). System values from literals and functions are
``str``/``bool``/``int``/``Decimal``, :class:`Temporal` and :class:`Quantity`.

Types (``is``, ``as``, ``ofType``): JSON carries no FHIR types, so they come from what the JSON
and the model tell: a resource by ``resourceType``; a choice element by its property name
(``valueQuantity`` is a ``Quantity``; ``value`` matches ``valueQuantity``, ``valueString``, ...);
and, in expressions that contain a type operation, every node reached by navigation,
``children()`` or ``descendants()`` from a node of known type (a resource, or a node reached from
one) is typed with the compiled model (:mod:`adapter.fhir.model`), so
``%resource.descendants().as(canonical)`` and ``item.answerValueSet.as(canonical)`` are exact.
Anything else (e.g. a primitive below a backbone element passed in as the root) is typed by JSON
kind: ``bool`` boolean, ``int`` integer, ``Decimal`` decimal, ``str`` string. A FHIR primitive
also counts as an instance of the System type it converts to (``answer is Boolean`` is true for
``answerBoolean``), as the HL7 Java validator does; inheritance follows the model (``canonical``
is a ``uri``, ``Age`` a ``Quantity``). ``as()`` on several items filters like ``ofType()`` (the Java
validator's behaviour, which dom-3 relies on) instead of raising.

Comparisons: dates and times compare per precision (https://hl7.org/fhirpath/N1/#comparison):
different precisions with an equal common prefix give empty; times with an offset are normalised to
UTC (no offset counts as UTC). Two strings that both parse as date/dateTime (FHIR date elements
are plain JSON strings) are ordered as dates, and a string compared with a date literal is
converted; ``=`` between two strings is string equality. JSON objects with a numeric ``value`` are
compared by ``<``/``>`` as Quantities: same unit (``code``, else ``unit``), or UCUM units of one
dimension from a small table; otherwise empty. ``matches()`` is a partial match (``re.search``, dot
matches newline) per the FHIRPath spec; anchor with ``^``/``$``.

Supported: path navigation (choice types, ``_name`` primitives, type-name roots such as
``Appointment.status``), ``$this``/``$index``/``$total``, all operators (``= != ~ !~ < > <= >=
and or xor implies + - * / div mod & | is as in contains``, unary ``-``), indexers, literals
(string, number, boolean, date/dateTime/time, quantity, ``{}``), ``%resource %rootResource
%context %ucum %sct %loinc %`vs-x` %`ext-x```; functions ``empty exists all allTrue anyTrue
allFalse anyFalse subsetOf supersetOf count distinct isDistinct where select repeat ofType first
last tail skip take single intersect exclude union combine iif trace not is as hasValue children
descendants extension resolve htmlChecks aggregate sum min max avg``; string functions
``startsWith endsWith contains matches replaceMatches replace length substring upper lower indexOf
trim split join toChars``; conversions ``toInteger toDecimal toString toBoolean toDate toDateTime
toTime toQuantity convertsTo*``; ``today now timeOfDay``; math ``abs ceiling floor round truncate
sqrt exp ln log power``.

Not supported (``UnsupportedExpression`` at compile time): ``conformsTo memberOf subsumes
subsumedBy elementDefinition slice checkModifiers type`` and any unknown function; date/time
arithmetic (``+``/``-`` with a date raises :class:`EvaluationError`).

``resolve()``: ``#id`` finds a contained resource of ``%rootResource`` (``#`` alone the root
itself); anything else goes to ``Env.resolve`` (see :func:`bundle_resolver`); unresolved
references are dropped. ``htmlChecks()`` applies the HL7 Java validator's narrative rules
(https://hl7.org/fhir/R4/narrative.html#xhtml): a well-formed XHTML ``div`` root, only the basic
formatting elements and attributes it allows (no scripts, forms, event attributes, ...), no block
element inside ``<p>``, no ``<a>`` inside ``<a>``, and some non-whitespace content or an image.

Invariant results (:meth:`Compiled.test`, :func:`evaluate_invariant`): ``[True]`` is True, ``[False]`` False, an empty
result None. FHIRPath's empty means "unknown" (e.g. per-1 with start and end at different
precisions); we report it as *not violated* and leave the policy to the caller through None (the
HL7 Java validator counts empty as a failure). Runtime errors (a collection where a single item is
required, incompatible operands) raise :class:`EvaluationError`.
"""

from __future__ import annotations

import html.entities
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Any, NamedTuple

from lxml import etree

from adapter.fhir import model

__all__ = [
    "UNSUPPORTED_FUNCTIONS",
    "Compiled",
    "Env",
    "EvaluationError",
    "FHIRPathError",
    "Prim",
    "Quantity",
    "Temporal",
    "UnsupportedExpression",
    "bundle_resolver",
    "compile_all",
    "compile_expression",
    "evaluate_invariant",
    "html_checks",
    "iter_constraints",
    "parse_fhirpath",
    "parse_temporal",
    "property_values",
]

Coll = list[Any]
Fn = Callable[[Coll, Coll, "Env"], Coll]
Op = Callable[[Coll, Coll, "Env"], Coll]  # applied to an input collection: (input, this, env)
BFn = Callable[[Coll, Coll, "Env"], "bool | None"]  # a Boolean expression: True/False/None (empty)
BoolOp = Callable[[Coll, Coll, "Env"], "bool | None"]  # a Boolean function on an input collection
AST = dict[str, Any]

EMPTY: Coll = []
TRUE: Coll = [True]
FALSE: Coll = [False]
UCUM = "http://unitsofmeasure.org"


class FHIRPathError(Exception):
    """Base class of the errors of this module."""


class UnsupportedExpression(FHIRPathError):
    """The expression does not parse, or uses something this evaluator does not implement."""


class EvaluationError(FHIRPathError):
    """A runtime error defined by FHIRPath (e.g. a collection where a single item is required)."""


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


class Prim:
    """A FHIR primitive with a ``_name`` part, or with a known FHIR type.

    ``value`` is the JSON value (None when only extensions are present), ``ext`` the ``_name``
    object (``id``/``extension``) or None, ``type`` the FHIR type code when known.
    """

    __slots__ = ("ext", "type", "value")

    def __init__(self, value: Any, ext: Any, type_: str | None = None) -> None:
        self.value = value
        self.ext = ext if ext.__class__ is dict else None
        self.type = type_

    def __repr__(self) -> str:
        return f"Prim({self.value!r}, ext={self.ext!r}, type={self.type!r})"

    def __eq__(self, other: object) -> bool:
        other_value = other.value if isinstance(other, Prim) else other
        return self.value is not None and _eq_item(self.value, other_value) is True

    def __hash__(self) -> int:
        return hash(self.value)


_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2})(?::(\d{2})(?::(\d{2})(\.\d+)?)?)?)?)?)?"
    r"(Z|[+-]\d{2}:\d{2})?"
)
_TIME_RE = re.compile(r"(\d{2})(?::(\d{2})(?::(\d{2})(\.\d+)?)?)?(Z|[+-]\d{2}:\d{2})?")


class Temporal:
    """A FHIRPath Date, DateTime or Time with its precision.

    ``parts`` holds the components that are present: (year, month, day, hour, minute) as ints,
    then seconds as a Decimal (seconds and milliseconds are one precision in FHIRPath); for a
    Time, (hour, minute, seconds). ``tz`` is the offset in minutes, or None.
    """

    __slots__ = ("kind", "parts", "text", "tz")

    def __init__(self, kind: str, parts: tuple[Any, ...], tz: int | None, text: str) -> None:
        self.kind = kind  # "date" | "dateTime" | "time"
        self.parts = parts
        self.tz = tz
        self.text = text

    def __repr__(self) -> str:
        return f"Temporal({self.kind}, {self.text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Temporal) or (self.kind == "time") != (other.kind == "time"):
            return False
        return _temporal_cmp(self, other) == 0

    def __hash__(self) -> int:
        return hash(self.text)

    @property
    def has_time(self) -> bool:
        return self.kind == "time" or len(self.parts) > 3


def _tz_minutes(text: str | None) -> int | None:
    if not text:
        return None
    if text == "Z":
        return 0
    sign = -1 if text[0] == "-" else 1
    return sign * (int(text[1:3]) * 60 + int(text[4:6]))


@lru_cache(maxsize=8192)
def parse_temporal(text: str, kind: str | None = None) -> Temporal | None:
    """Parse a FHIR/FHIRPath date, dateTime or time (without ``@``); None when it is not one."""
    if kind == "time" or (kind is None and len(text) >= 2 and text[2:3] == ":"):
        return _parse_time(text)
    m = _DATE_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, sec, frac, tz = m.groups()
    parts: list[Any] = [int(year)]
    for piece in (month, day, hour, minute):
        if piece is None:
            break
        parts.append(int(piece))
    if sec is not None and len(parts) == 5:
        parts.append(Decimal(sec + (frac or "")))
    found = "dateTime" if hour is not None or "T" in text else "date"
    if kind == "date" and found != "date":
        return None
    return Temporal(kind or found, tuple(parts), _tz_minutes(tz), text)


def _parse_time(text: str) -> Temporal | None:
    m = _TIME_RE.fullmatch(text)
    if m is None:
        return None
    hour, minute, sec, frac, tz = m.groups()
    parts: list[Any] = [int(hour)]
    if minute is not None:
        parts.append(int(minute))
        if sec is not None:
            parts.append(Decimal(sec + (frac or "")))
    return Temporal("time", tuple(parts), _tz_minutes(tz), text)


def _utc_parts(t: Temporal) -> tuple[Any, ...]:
    """Date/time components shifted to UTC when the value has a time and an offset."""
    if t.kind == "time" or t.tz is None or t.tz == 0 or len(t.parts) < 4:
        return t.parts
    p = t.parts
    base = datetime(p[0], p[1], p[2], p[3], p[4] if len(p) > 4 else 0) - timedelta(minutes=t.tz)
    full = (base.year, base.month, base.day, base.hour, base.minute)
    return full[: min(len(p), 5)] + p[5:]


def _temporal_cmp(a: Temporal, b: Temporal) -> int | None:
    """-1/0/1, or None when the precisions differ and the common components are equal."""
    if (a.kind == "time") != (b.kind == "time"):
        raise EvaluationError(f"cannot compare {a.kind} {a.text!r} with {b.kind} {b.text!r}")
    if a.has_time and b.has_time and (a.tz is not None or b.tz is not None):
        pa, pb = _utc_parts(a), _utc_parts(b)
    else:
        pa, pb = a.parts, b.parts
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            return -1 if x < y else 1
    return 0 if len(pa) == len(pb) else None


# Units that compare after conversion: UCUM code -> (dimension, factor to the base unit).
_UNITS: dict[str, tuple[str, Decimal]] = {
    **{u: ("g", Decimal(f)) for u, f in (("kg", "1000"), ("g", "1"), ("mg", "0.001"), ("ug", "0.000001"))},
    **{u: ("m", Decimal(f)) for u, f in (("km", "1000"), ("m", "1"), ("cm", "0.01"), ("mm", "0.001"))},
    **{u: ("L", Decimal(f)) for u, f in (("L", "1"), ("dL", "0.1"), ("cL", "0.01"), ("mL", "0.001"))},
    **{
        u: ("s", Decimal(f))
        for u, f in (
            ("wk", "604800"),
            ("d", "86400"),
            ("h", "3600"),
            ("min", "60"),
            ("s", "1"),
            ("ms", "0.001"),
        )
    },
}
# Calendar duration keywords (https://hl7.org/fhirpath/N1/#time-valued-quantities): from a week
# down they equal the UCUM definite durations; years and months only compare with themselves.
_CALENDAR = {
    "year": "year",
    "month": "month",
    "week": "wk",
    "day": "d",
    "hour": "h",
    "minute": "min",
    "second": "s",
    "millisecond": "ms",
}


class Quantity:
    """A FHIRPath Quantity: a Decimal value and a unit (a UCUM code or a calendar keyword)."""

    __slots__ = ("unit", "value")

    def __init__(self, value: Decimal | int, unit: str) -> None:
        self.value = Decimal(value)
        self.unit = unit

    def __repr__(self) -> str:
        return f"Quantity({self.value}, {self.unit!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Quantity) and _quantity_cmp(self, other) == 0

    def __hash__(self) -> int:
        return hash(self.value)


def _unit_key(unit: str) -> str:
    word = unit[:-1] if unit.endswith("s") and unit[:-1] in _CALENDAR else unit
    return _CALENDAR.get(word, unit)


def _quantity_cmp(a: Quantity, b: Quantity) -> int | None:
    ua, ub = _unit_key(a.unit), _unit_key(b.unit)
    va, vb = a.value, b.value
    if ua != ub:
        da, db = _UNITS.get(ua), _UNITS.get(ub)
        if da is None or db is None or da[0] != db[0]:
            return None
        va, vb = va * da[1], vb * db[1]
    return (va > vb) - (va < vb)


def _as_quantity(item: Any) -> Quantity | None:
    if item.__class__ is Quantity:
        return item
    if item.__class__ is dict:
        value = _value(item.get("value"))
        if value.__class__ in (int, Decimal):
            unit = item.get("code") if item.get("system", UCUM) == UCUM else None
            if unit is None:
                unit = item.get("unit") or item.get("code") or "1"
            return Quantity(value, str(_value(unit)))
    return None


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Env:
    """What an evaluation can see besides its input node.

    ``resource`` is %resource, ``root_resource`` %rootResource (defaults to ``resource``),
    ``context`` %context (defaults to the node being evaluated), ``resolve`` maps a reference that
    is not ``#id`` to a resource (None: such references resolve to nothing), ``variables`` holds
    other %names, ``trace`` receives ``trace()`` output. Use one Env per resource: it caches
    per-resource work (typed descendants) keyed by object identity.
    """

    resource: Any = None
    root_resource: Any = None
    context: Any = None
    resolve: Callable[[str], dict[str, Any] | None] | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    trace: Callable[[str, Coll], None] | None = None
    root: Coll = field(default_factory=list, repr=False)
    index: int = field(default=0, repr=False)
    total: Coll = field(default_factory=list, repr=False)
    types: dict[int, str] = field(default_factory=dict, repr=False)
    contexts: dict[int, model.Context] = field(default_factory=dict, repr=False)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------------
# Navigation
# ---------------------------------------------------------------------------------------------


def _merge(value: Any, ext: Any, out: Coll) -> None:
    """Append the items of property ``value`` with its ``_name`` part ``ext`` to ``out``."""
    if value.__class__ is list:
        exts = ext if ext.__class__ is list else ()
        for i, item in enumerate(value):
            extra = exts[i] if i < len(exts) else None
            if extra is not None:
                out.append(Prim(item, extra))
            elif item is not None:
                out.append(item)
        for extra in exts[len(value) :]:
            if extra is not None:
                out.append(Prim(None, extra))
    elif value is None:
        for extra in ext if ext.__class__ is list else (ext,):
            if extra is not None:
                out.append(Prim(None, extra))
    elif ext is not None:
        out.append(Prim(value, ext))
    else:
        out.append(value)


def _prop(node: dict[str, Any], name: str, uname: str) -> Coll:
    """The collection of property ``name`` of a JSON object (no choice handling)."""
    value = node.get(name)
    if value is None:
        ext = node.get(uname)
        if ext is None:
            return EMPTY
        out: Coll = []
        _merge(None, ext, out)
        return out
    cls = value.__class__
    if cls is dict:
        return [value]
    if cls is list:
        if value and value[0].__class__ is dict:
            return value  # type: ignore[no-any-return]
        ext = node.get(uname)
        if ext is None and None not in value:
            return value  # type: ignore[no-any-return]
        out = []
        _merge(value, ext, out)
        return out
    ext = node.get(uname)
    return [value] if ext is None else [Prim(value, ext)]


def property_values(node: Any, name: str) -> Coll:
    """FHIRPath ``node.name`` for one JSON object or :class:`Prim` (choice names included)."""
    return _navigate([node], name, Env(), typed=False)


def _choice_suffixes() -> dict[str, dict[str, str]]:
    """Choice element name -> {property suffix -> FHIR type code}, over all R4 types.

    Precomputed by the generator (``r4-index.json``) so that no type model is loaded for it.
    """
    return model.choice_suffixes()


@lru_cache(maxsize=1)
def _choice_keys() -> dict[str, frozenset[str]]:
    """Choice element name -> every property name it can take (``valueString``, ``_valueString``)."""
    return {
        name: frozenset(k for suffix in suffixes for k in (name + suffix, "_" + name + suffix))
        for name, suffixes in _choice_suffixes().items()
    }


def _choice_lookup(node: dict[str, Any], name: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    """(property, type code) of the choice element ``name[x]`` present in ``node``, if any."""
    n = len(name)
    for key in node:
        base = key[1:] if key[:1] == "_" else key  # key[:1]: a JSON key may be empty
        if len(base) > n and base.startswith(name):
            code = suffixes.get(base[n:])
            # A choice is never repeated: a list here is an ordinary element (Device.property.valueCode).
            if code is not None and node[key].__class__ is not list:
                return base, code
    return None


def _nav_choice(node: dict[str, Any], name: str, suffixes: dict[str, str], env: Env, typed: bool) -> Coll:
    found = _choice_lookup(node, name, suffixes)
    if found is None:
        return EMPTY
    prop, code = found
    items = _prop(node, prop, "_" + prop)
    if not typed:
        return items
    return [_typed(item, code, env) for item in items]


def _typed(item: Any, code: str, env: Env) -> Any:
    """Attach a known FHIR type: Prim for primitives, the Env side table for objects."""
    cls = item.__class__
    if cls is dict:
        env.types[id(item)] = code
        return item
    if cls is Prim:
        return Prim(item.value, item.ext, code)
    return Prim(item, None, code)


def _navigate(focus: Coll, name: str, env: Env, typed: bool) -> Coll:
    uname = "_" + name
    suffixes = _choice_suffixes().get(name)
    keys = _choice_keys().get(name, frozenset())
    out: Coll = []
    for item in focus:
        cls = item.__class__
        if cls is dict:
            # _prop's cases inline. _choice_lookup finds nothing when none of the choice's property
            # names is present.
            v = item.get(name)
            if v is None and uname not in item:
                if suffixes is None or keys.isdisjoint(item):
                    continue
                got = _nav_choice(item, name, suffixes, env, typed)
            elif v.__class__ is list and v and v[0].__class__ is dict:
                got = v
            elif v.__class__ is dict:
                got = [v]
            elif v is not None and v.__class__ is not list:
                ext = item.get(uname)
                got = [v] if ext is None else [Prim(v, ext)]
            else:
                got = _prop(item, name, uname)
                if not got and suffixes is not None and not keys.isdisjoint(item):
                    got = _nav_choice(item, name, suffixes, env, typed)
        elif cls is Prim and item.ext is not None:
            got = _prop(item.ext, name, uname) if name in ("id", "extension") else EMPTY
        else:
            continue
        if len(focus) == 1:
            return got
        out.extend(got)
    return out


def _member(name: str, typed: bool) -> Op:
    return _typed_member(name) if typed else _plain_member(name, False)


def _typed_member(name: str) -> Op:
    """Navigation that also types what it finds when the parent's type is known (typed mode)."""
    plain = _plain_member(name, True)

    def nav(focus: Coll, this: Coll, env: Env) -> Coll:
        out: Coll = []
        for item in focus:
            got = plain([item], this, env)
            ctx = _context_of(item, env) if got else None
            spec = ctx.children.get(name) if ctx is not None else None
            if spec is None:
                out.extend(got)
                continue
            for child in got:
                code, child_ctx = _child_type(spec, child)
                if child.__class__ is dict:
                    _record(child, code, child_ctx, env)
                    out.append(child)
                else:
                    out.append(_typed(child, code, env))
        return out

    return nav


def _plain_member(name: str, typed: bool) -> Op:
    uname = "_" + name
    suffixes = _choice_suffixes().get(name)
    keys = _choice_keys().get(name, frozenset())

    def nav(focus: Coll, this: Coll, env: Env) -> Coll:
        if len(focus) == 1:
            item = focus[0]
            if item.__class__ is dict:
                v = item.get(name)
                cls = v.__class__
                if cls is list:
                    if v and v[0].__class__ is dict:
                        return v  # type: ignore[no-any-return]
                elif cls is dict:
                    return [v]
                elif v is not None:
                    ext = item.get(uname)
                    return [v] if ext is None else [Prim(v, ext)]
                elif uname not in item:
                    if suffixes is None or keys.isdisjoint(item):
                        return EMPTY
                    return _nav_choice(item, name, suffixes, env, typed)
                return _prop(item, name, uname)
        return _navigate(focus, name, env, typed)

    return nav


def _member_exists(name: str, typed: bool) -> BFn:
    """``name.exists()`` on the focus without building the collection."""
    uname = "_" + name
    nav = _member(name, typed)
    keys = _choice_keys().get(name)

    def exists(focus: Coll, this: Coll, env: Env) -> bool:
        if len(focus) == 1:
            item = focus[0]
            if item.__class__ is dict:
                v = item.get(name)
                if v is not None:
                    if v.__class__ is not list or (v and v[0] is not None):
                        return True
                elif uname not in item:
                    if keys is None or keys.isdisjoint(item):
                        return False
                    # A choice (value[x]) is never a list; a list is an ordinary element. A plain
                    # loop: any() with a generator costs twice as much on this hot path (ext-1).
                    for k, value in item.items():  # noqa: SIM110
                        if k in keys and value.__class__ is not list:
                            return True
                    return False
        return bool(nav(focus, this, env))

    return exists


def _type_root(name: str, typed: bool) -> Op:
    """A leading type name (``Appointment.status``): keeps resources of that type, else navigates."""
    nav = _member(name, typed)

    def root(focus: Coll, this: Coll, env: Env) -> Coll:
        out: Coll = []
        for item in focus:
            if item.__class__ is dict and "resourceType" in item:
                if _is_subtype(item["resourceType"], name):
                    out.append(item)
            else:
                out.extend(nav([item], this, env))
        return out

    return root


# ---------------------------------------------------------------------------------------------
# Children and descendants
# ---------------------------------------------------------------------------------------------


def _children_untyped(item: Any) -> Coll:
    out: Coll = []
    cls = item.__class__
    if cls is dict:
        for key, value in item.items():
            if key[:1] == "_":
                if key[1:] not in item:
                    _merge(None, value, out)
            elif key != "resourceType":
                _merge(value, item.get("_" + key), out)
    elif cls is Prim and item.ext is not None:
        for value in item.ext.values():
            _merge(value, None, out)
    return out


def _children_count(coll: Coll) -> Coll:
    if len(coll) == 1:
        return [_child_count(coll[0])]
    return [sum(_child_count(x) for x in coll)]


def _child_count(item: Any) -> int:
    """``children().count()`` without building the collection."""
    n = 0
    cls = item.__class__
    if cls is dict:
        for key, value in item.items():
            if key[:1] == "_":
                if key[1:] in item:
                    continue
            elif key == "resourceType":
                continue
            n += len(value) if value.__class__ is list else 1
    elif cls is Prim and item.ext is not None:
        for value in item.ext.values():
            n += len(value) if value.__class__ is list else 1
    return n


def _context_of(item: Any, env: Env) -> model.Context | None:
    """The model context of a JSON object whose type is known, else None."""
    if item.__class__ is not dict:
        return None
    name = item.get("resourceType")
    if name is None:
        found = env.contexts.get(id(item))
        if found is not None:
            return found
        name = env.types.get(id(item))
    if name is None or not model.has_type(name):
        return None
    return model.context_for(name)


def _record(child: dict[str, Any], code: str, ctx: model.Context | None, env: Env) -> None:
    """Remember the type (and model context) of a JSON object reached by typed navigation."""
    env.types.setdefault(id(child), code)
    if ctx is not None:
        env.contexts.setdefault(id(child), ctx)


def _child_type(child: model.Child, value: Any) -> tuple[str, model.Context | None]:
    code = child.type_code
    if code in ("Resource", "DomainResource"):
        rt = value.get("resourceType") if value.__class__ is dict else None
        if isinstance(rt, str) and model.is_resource_type(rt):
            return rt, model.context_for(rt)
        return code, None
    if child.is_primitive:
        return code, None
    ctx = child.context() if model.has_type(code) or code in ("BackboneElement", "Element") else None
    return code, ctx


def _children_typed(item: Any, ctx: model.Context | None, env: Env, out: list[tuple[Any, Any]]) -> None:
    """Append (child, context) pairs, typing primitives (Prim) and objects (Env side table)."""
    if item.__class__ is not dict or ctx is None:
        for child in _children_untyped(item):
            out.append((child, _context_of(child, env)))
        return
    specs = ctx.children
    for key, value in item.items():
        if key[:1] == "_":
            if key[1:] in item:
                continue
            name, value, ext = key[1:], None, value
        elif key == "resourceType":
            continue
        else:
            name, ext = key, item.get("_" + key)
        spec = specs.get(name)
        items: Coll = []
        _merge(value, ext, items)
        for child in items:
            if spec is None:
                out.append((child, _context_of(child, env)))
                continue
            code, child_ctx = _child_type(spec, child)
            if child.__class__ is dict:
                _record(child, code, child_ctx, env)
                out.append((child, child_ctx))
            else:
                out.append((_typed(child, code, env), None))


def _children(focus: Coll, env: Env, typed: bool) -> Coll:
    if not typed:
        out: Coll = []
        for item in focus:
            out.extend(_children_untyped(item))
        return out
    pairs: list[tuple[Any, Any]] = []
    for item in focus:
        _children_typed(item, _context_of(item, env), env, pairs)
    return [child for child, _ in pairs]


def _descendants_of(item: Any, env: Env, typed: bool) -> Coll:
    key = ("typed" if typed else "untyped", id(item))
    found: Coll | None = env.cache.get(key)
    if found is not None:
        return found
    out: Coll = []
    if typed:
        level: list[tuple[Any, Any]] = [(item, _context_of(item, env))]
        while level:
            nxt: list[tuple[Any, Any]] = []
            for node, ctx in level:
                _children_typed(node, ctx, env, nxt)
            out.extend(child for child, _ in nxt)
            level = nxt
    else:
        items: Coll = [item]
        while items:
            items = _children(items, env, False)
            out.extend(items)
    if item.__class__ is dict:
        env.cache[key] = out
    return out


def _child_objects(coll: Coll, env: Env) -> Coll:
    """The JSON objects among the children of the items of ``coll`` (for ``children().name``)."""
    out: Coll = []
    for item in coll:
        if item.__class__ is dict:
            # Plain loops: extend() with a generator costs more than the short lists here.
            for key, value in item.items():
                if value.__class__ is dict:
                    if key[:1] != "_":
                        out.append(value)
                elif value.__class__ is list and key[:1] != "_":
                    for x in value:
                        if x.__class__ is dict:
                            out.append(x)
        elif item.__class__ is Prim and item.ext is not None:
            for x in item.ext.get("extension") or ():
                if x.__class__ is dict:
                    out.append(x)
    return out


def _descendant_objects(coll: Coll, env: Env) -> Coll:
    """The JSON objects among the descendants (for ``descendants().name``), breadth first."""
    single = len(coll) == 1 and coll[0].__class__ is dict
    key = ("objects", id(coll[0])) if single else None
    if key is not None and key in env.cache:
        cached: Coll = env.cache[key]
        return cached
    out: Coll = []
    level: Coll = [x.ext for x in coll if x.__class__ is Prim and x.ext is not None]
    level += [x for x in coll if x.__class__ is dict]
    holders = len(level) - sum(1 for x in coll if x.__class__ is dict)
    while level:
        nxt: Coll = []
        nxt_holders: Coll = []
        for i, node in enumerate(level):
            if i < holders:  # the _name part of a primitive: its extensions are its children
                for x in node.get("extension") or ():
                    if x.__class__ is dict:
                        nxt.append(x)
                continue
            # The key is looked at only for an object or a list: most values are primitives.
            for k, value in node.items():
                cls = value.__class__
                if cls is dict:
                    (nxt_holders if k[:1] == "_" else nxt).append(value)
                elif cls is list:
                    into = nxt_holders if k[:1] == "_" else nxt
                    for x in value:
                        if x.__class__ is dict:
                            into.append(x)
        out.extend(nxt)
        level = nxt_holders + nxt
        holders = len(nxt_holders)
    if key is not None:
        env.cache[key] = out
    return out


def _descendants(focus: Coll, env: Env, typed: bool) -> Coll:
    if len(focus) == 1:
        return _descendants_of(focus[0], env, typed)
    out: Coll = []
    for item in focus:
        out.extend(_descendants_of(item, env, typed))
    return out


# ---------------------------------------------------------------------------------------------
# Singletons, equality, comparison
# ---------------------------------------------------------------------------------------------


def _value(item: Any) -> Any:
    return item.value if item.__class__ is Prim else item


def _single(coll: Coll, what: str = "a single item") -> Any:
    """The one item's value; None when the collection (or the primitive's value) is empty."""
    if not coll:
        return None
    if len(coll) > 1:
        raise EvaluationError(f"expected {what}, got a collection of {len(coll)} items")
    item = coll[0]
    return item.value if item.__class__ is Prim else item


def _bool3(coll: Coll) -> bool | None:
    """Singleton evaluation to Boolean: empty -> None, one non-Boolean item -> True."""
    if not coll:
        return None
    if len(coll) > 1:
        raise EvaluationError(f"expected a single Boolean, got a collection of {len(coll)} items")
    item = coll[0]
    if item is True or item is False:
        return item
    if item.__class__ is Prim and (item.value is True or item.value is False):
        return item.value
    return True


def _eq_item(a: Any, b: Any) -> bool | None:
    """FHIRPath ``=`` on two items: True/False, or None (empty) for dates of different precision."""
    if a.__class__ is Prim:
        a = a.value
    if b.__class__ is Prim:
        b = b.value
    if a is None or b is None:
        return None
    ca, cb = a.__class__, b.__class__
    if ca is cb and ca is not Temporal and ca is not Quantity and ca is not dict:
        return a == b  # type: ignore[no-any-return]
    if ca is bool or cb is bool:
        return False
    if ca in (int, Decimal) and cb in (int, Decimal):
        return a == b  # type: ignore[no-any-return]
    if ca is Temporal or cb is Temporal:
        ta, tb = _to_temporal(a), _to_temporal(b)
        if ta is None or tb is None or (ta.kind == "time") != (tb.kind == "time"):
            return False
        c = _temporal_cmp(ta, tb)
        return None if c is None else c == 0
    if ca is Quantity or cb is Quantity:
        qa, qb = _as_quantity(a), _as_quantity(b)
        if qa is None or qb is None:
            return False
        c = _quantity_cmp(qa, qb)
        return None if c is None else c == 0
    if ca is dict and cb is dict:
        return a == b  # type: ignore[no-any-return]
    return False


def _to_temporal(value: Any) -> Temporal | None:
    if value.__class__ is Temporal:
        return value
    if value.__class__ is str:
        return parse_temporal(value)
    return None


def _norm_str(s: str) -> str:
    return " ".join(s.lower().split())


def _equiv_item(a: Any, b: Any) -> bool:
    a, b = _value(a), _value(b)
    if a is None or b is None:
        return a is None and b is None
    if a.__class__ is str and b.__class__ is str:
        return _norm_str(a) == _norm_str(b)
    if a.__class__ in (int, Decimal) and b.__class__ in (int, Decimal) and bool not in (a.__class__, b.__class__):
        da, db = Decimal(a), Decimal(b)
        places = min(-da.as_tuple().exponent, -db.as_tuple().exponent)  # type: ignore[operator]
        exp = Decimal(1).scaleb(-max(places, 0))
        return da.quantize(exp, ROUND_HALF_UP) == db.quantize(exp, ROUND_HALF_UP)
    if a.__class__ is dict and b.__class__ is dict:
        return a.keys() == b.keys() and all(_equiv_item(a[k], b[k]) for k in a)
    if a.__class__ is list and b.__class__ is list:
        return _equiv_coll(a, b)
    r = _eq_item(a, b)
    return r is True


def _equiv_coll(a: Coll, b: Coll) -> bool:
    if len(a) != len(b):
        return False
    rest = list(b)
    for x in a:
        for i, y in enumerate(rest):
            if _equiv_item(x, y):
                del rest[i]
                break
        else:
            return False
    return True


def _compare(a: Coll, b: Coll) -> int | None:
    """Order two singletons: -1/0/1, or None for empty/incomparable precision or units."""
    x, y = _single(a, "a single item to compare"), _single(b, "a single item to compare")
    if x is None or y is None:
        return None
    cx, cy = x.__class__, y.__class__
    if cx in (int, Decimal) and cy in (int, Decimal) and cx is not bool and cy is not bool:
        return (x > y) - (x < y)  # type: ignore[no-any-return]
    if cx is str and cy is str:
        if _same_shape(x, y):
            return (x > y) - (x < y)  # type: ignore[no-any-return]
        tx, ty = parse_temporal(x), parse_temporal(y)
        if tx is not None and ty is not None and (tx.kind == "time") == (ty.kind == "time"):
            return _temporal_cmp(tx, ty)
        return (x > y) - (x < y)  # type: ignore[no-any-return]
    if cx is Temporal or cy is Temporal:
        tx, ty = _to_temporal(x), _to_temporal(y)
        if tx is None or ty is None:
            raise EvaluationError(f"cannot compare {x!r} with {y!r}")
        return _temporal_cmp(tx, ty)
    qx, qy = _as_quantity(x), _as_quantity(y)
    if qx is not None and qy is not None:
        return _quantity_cmp(qx, qy)
    raise EvaluationError(f"cannot compare {type(x).__name__} with {type(y).__name__}")


def _same_shape(x: str, y: str) -> bool:
    """Two strings whose order as dates/times (if they are) is their string order: same length
    (so same precision) and no time zone, or the same time zone."""
    if len(x) != len(y):
        return False
    if ":" not in x and ":" not in y:
        return True
    if x[-1] == "Z":
        return y[-1] == "Z"
    return len(x) >= 6 and x[-6] in "+-" and x[-6:] == y[-6:]


def _hash_key(item: Any) -> Any:
    """A hashable key such that equal keys mean FHIRPath-equal items; None when there is none."""
    v = _value(item)
    cls = v.__class__
    if cls is str:
        return v
    if cls is bool:
        return ("b", v)
    if cls is int or cls is Decimal:
        return ("n", v)
    return None


def _distinct(items: Coll) -> Coll:
    out: Coll = []
    seen: set[Any] = set()
    others: Coll = []
    for item in items:
        key = item if item.__class__ is str else _hash_key(item)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        else:
            if any(_eq_item(item, o) is True for o in others):
                continue
            others.append(item)
        out.append(item)
    return out


def _is_distinct(items: Coll) -> bool:
    """``isDistinct()``: ``_distinct`` drops no item. Strings, numbers and Booleans are counted
    in a set; with any other item, ``_distinct`` decides."""
    if len(items) < 2:
        return True
    seen: set[Any] = set()
    repeated = False
    for item in items:
        key = item if item.__class__ is str else _hash_key(item)
        if key is None:
            return len(_distinct(items)) == len(items)
        if key in seen:
            repeated = True
        seen.add(key)
    return not repeated


def _contains_item(coll: Coll, item: Any) -> bool:
    return any(_eq_item(x, item) is True for x in coll)


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------

_SYSTEM_TYPES = frozenset({"Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity"})
# FHIR primitive -> the System type it converts to (https://hl7.org/fhir/R4/fhirpath.html#types).
_FHIR_TO_SYSTEM = {
    "boolean": "Boolean",
    "integer": "Integer",
    "positiveInt": "Integer",
    "unsignedInt": "Integer",
    "decimal": "Decimal",
    "date": "Date",
    "dateTime": "DateTime",
    "instant": "DateTime",
    "time": "Time",
}


@lru_cache(maxsize=4096)
def _is_subtype(name: str, target: str) -> bool:
    """``name`` is ``target`` or derives from it in the R4 model."""
    seen = 0
    current: str | None = name
    while current is not None and seen < 20:
        if current == target:
            return True
        raw = model._types().get(current)
        current = raw.get("base") if raw is not None else ("Resource" if current == "DomainResource" else None)
        seen += 1
    return False


def _fhir_type(item: Any, env: Env) -> str | None:
    cls = item.__class__
    if cls is dict:
        rt = item.get("resourceType")
        return rt if rt is not None else env.types.get(id(item))
    if cls is Prim:
        if item.type is not None:
            return item.type  # type: ignore[no-any-return]
        return _fhir_type(item.value, env) if item.value is not None else None
    if cls is bool:
        return "boolean"
    if cls is int:
        return "integer"
    if cls is Decimal:
        return "decimal"
    if cls is str:
        return "string"
    if cls is Temporal:
        return item.kind  # type: ignore[no-any-return]
    if cls is Quantity:
        return "Quantity"
    return None


def _system_type(item: Any, env: Env) -> str | None:
    fhir = _fhir_type(item, env)
    if fhir is None:
        return None
    if item.__class__ is dict:
        return "Quantity" if _is_subtype(fhir, "Quantity") else None
    if fhir in _FHIR_TO_SYSTEM:
        return _FHIR_TO_SYSTEM[fhir]
    if model.is_primitive(fhir) or fhir == "string":
        return "String"
    return "Quantity" if fhir == "Quantity" else None


def _type_matcher(spec: str) -> Callable[[Any, Env], bool]:
    """Compile a type specifier (``Quantity``, ``FHIR.uri``, ``System.String``)."""
    parts = spec.replace("`", "").split(".")
    if len(parts) == 2 and parts[0] in ("FHIR", "System"):
        namespace, name = parts
    elif len(parts) == 1:
        name = parts[0]
        known = model.has_type(name) or name in ("Resource", "DomainResource")
        namespace = "FHIR" if known or name not in _SYSTEM_TYPES else "System"
        if namespace == "FHIR" and not known and not name[:1].isupper():
            raise UnsupportedExpression(f"unknown type {spec!r}")
    else:
        raise UnsupportedExpression(f"unsupported type specifier {spec!r}")
    if namespace == "System":
        return lambda item, env: _system_type(item, env) == name

    subtype: dict[str, bool] = {}  # type code -> _is_subtype(code, name): dom-3 tests every node

    def matches(item: Any, env: Env) -> bool:
        # A primitive reached by typed navigation carries its type (the usual case in dom-3).
        actual = item.type if item.__class__ is Prim and item.type is not None else _fhir_type(item, env)
        if actual is None:
            return name == "Element" and item.__class__ is dict
        found = subtype.get(actual)
        if found is None:
            found = subtype[actual] = _is_subtype(actual, name)
        return found

    return matches


# ---------------------------------------------------------------------------------------------
# Narrative (htmlChecks)
# ---------------------------------------------------------------------------------------------

_XHTML = "http://www.w3.org/1999/xhtml"
# The HL7 Java validator's lists (XhtmlNode / checkInnerNames), used by htmlChecks().
_HTML_ELEMENTS = (
    "p br div h1 h2 h3 h4 h5 h6 a span b em i strong small big tt dfn q var abbr acronym cite blockquote "
    "hr address bdo kbd sub sup ul ol li dl dt dd pre table caption colgroup col thead tr tfoot tbody th "
    "td code samp img map area"
)
_HTML_ATTRIBUTES = (
    "title style class id lang xml:lang dir accesskey tabindex span width align valign char charoff abbr "
    "axis headers scope rowspan colspan"
)
_HTML_ELEMENT_ATTRIBUTES = (
    "a.href a.name img.src img.border div.xmlns blockquote.cite q.cite a.charset a.type a.hreflang a.rel "
    "a.rev a.shape a.coords img.alt img.longdesc img.height img.width img.usemap img.ismap map.name "
    "area.shape area.coords area.href area.nohref area.alt table.summary table.width table.border "
    "table.frame table.rules table.cellspacing table.cellpadding pre.space td.nowrap"
)
_HTML_BLOCKS = ("div", "blockquote", "table", "ol", "ul", "p")


_HTML_TAGS = frozenset(f"{{{_XHTML}}}{name}" for name in _HTML_ELEMENTS.split())
_HTML_ATTRIBUTE_SET = frozenset(_HTML_ATTRIBUTES.split())
_HTML_COMBO_SET = frozenset(_HTML_ELEMENT_ATTRIBUTES.split())
_XML_NS = "{http://www.w3.org/XML/1998/namespace}"
_HTML_NESTING = etree.XPath(
    "boolean(descendant::h:p//*[" + " or ".join(f"self::h:{b}" for b in _HTML_BLOCKS) + "] or descendant::h:a//h:a)",
    namespaces={"h": _XHTML},
)
_HTML_CONTENT = etree.XPath("normalize-space(string(.)) != '' or boolean(descendant::h:img)", namespaces={"h": _XHTML})


def _html_attribute_ok(tag: str, name: str) -> bool:
    if name.startswith(_XML_NS):
        name = "xml:" + name[len(_XML_NS) :]
    return name in _HTML_ATTRIBUTE_SET or f"{tag[len(_XHTML) + 2 :]}.{name}" in _HTML_COMBO_SET


def _html_tree_ok(root: Any) -> bool:
    """Allowed elements and attributes only, no block inside <p>, no <a> inside <a>."""
    for element in root.iter(etree.Element):
        tag = element.tag
        if tag not in _HTML_TAGS:
            return False
        attributes = element.attrib
        if len(attributes) and not all(_html_attribute_ok(tag, str(a)) for a in attributes):
            return False
    return not _HTML_NESTING(root)


_ENTITY_RE = re.compile(r"&([A-Za-z][A-Za-z0-9]*);")
_XML_ENTITIES = frozenset({"lt", "gt", "amp", "quot", "apos"})
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def _html_entity(m: re.Match[str]) -> str:
    name = m.group(1)
    code = html.entities.name2codepoint.get(name)
    return m.group(0) if name in _XML_ENTITIES or code is None else f"&#{code};"


@lru_cache(maxsize=256)
def html_checks(text: str) -> bool:
    """The narrative rules of https://hl7.org/fhir/R4/narrative.html#xhtml (txt-1 and txt-2), as the
    HL7 Java validator checks them: a well-formed XHTML ``div`` with only the allowed elements and
    attributes, no block element inside ``<p>``, no ``<a>`` inside ``<a>``, and some non-whitespace
    text or an image. HTML named entities (``&nbsp;``) are accepted."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        return False
    if "&" in text:
        text = _ENTITY_RE.sub(_html_entity, text)
    try:
        root = etree.fromstring(text.encode("utf-8"), _XML_PARSER)
    except etree.XMLSyntaxError:
        return False
    return root.tag == f"{{{_XHTML}}}div" and _html_tree_ok(root) and bool(_HTML_CONTENT(root))


# ---------------------------------------------------------------------------------------------
# resolve()
# ---------------------------------------------------------------------------------------------


def _reference_of(item: Any) -> str | None:
    v = _value(item)
    if v.__class__ is str:
        return v
    if v.__class__ is dict:
        ref = _value(v.get("reference"))
        return ref if ref.__class__ is str else None
    return None


def _resolve_one(ref: str, env: Env) -> Any:
    if ref.startswith("#"):
        root = env.root_resource if env.root_resource is not None else env.resource
        if root.__class__ is not dict:
            return None
        if ref == "#":
            return root
        for contained in root.get("contained") or ():
            if contained.__class__ is dict and contained.get("id") == ref[1:]:
                return contained
        return None
    return env.resolve(ref) if env.resolve is not None else None


def bundle_resolver(bundle: dict[str, Any]) -> Callable[[str], dict[str, Any] | None]:
    """An ``Env.resolve`` for references inside a Bundle: by fullUrl, or ``Type/id`` (optionally
    with ``/_history/v``), absolute or relative to an entry's server base
    (https://hl7.org/fhir/R4/bundle.html#references)."""
    index: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if entry.__class__ is dict else None
        if resource.__class__ is not dict:
            continue
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str):
            index.setdefault(full_url, resource)
        rt, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(rt, str) and isinstance(rid, str):
            index.setdefault(f"{rt}/{rid}", resource)
            if isinstance(full_url, str) and full_url.endswith(f"/{rt}/{rid}"):
                index.setdefault(full_url, resource)

    def resolve(reference: str) -> dict[str, Any] | None:
        found = index.get(reference)
        if found is None and "/_history/" in reference:
            found = index.get(reference.split("/_history/")[0])
        if found is None:
            m = re.search(r"([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})$", reference.split("/_history/")[0])
            found = index.get(m.group(1)) if m else None
        return found

    return resolve


# ---------------------------------------------------------------------------------------------
# Operators. Logical operators, comparisons and Boolean functions are compiled to closures that
# return True/False/None (empty) so that invariants build no lists; _B2L turns them back into
# collections where a collection is needed.
# ---------------------------------------------------------------------------------------------

_B2L: dict[bool | None, Coll] = {True: TRUE, False: FALSE, None: EMPTY}


def _as_list(b: BFn) -> Fn:
    return lambda focus, this, env: _B2L[b(focus, this, env)]


def _as_bool(fn: Fn) -> BFn:
    return lambda focus, this, env: _bool3(fn(focus, this, env))


def _op_or(operands: list[BFn]) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        unknown = False
        for operand in operands:
            r = operand(focus, this, env)
            if r is True:
                return True
            if r is None:
                unknown = True
        return None if unknown else False

    return f


def _op_and(operands: list[BFn]) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        unknown = False
        for operand in operands:
            r = operand(focus, this, env)
            if r is False:
                return False
            if r is None:
                unknown = True
        return None if unknown else True

    return f


def _op_xor(left: BFn, right: BFn) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        a = left(focus, this, env)
        if a is None:
            return None
        b = right(focus, this, env)
        return None if b is None else a != b

    return f


def _op_implies(left: BFn, right: BFn) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        a = left(focus, this, env)
        if a is False:
            return True
        b = right(focus, this, env)
        if b is True:
            return True
        return False if a is True and b is False else None

    return f


def _eq3(a: Coll, b: Coll) -> bool | None:
    if not a or not b:
        return None
    if len(a) == 1 and len(b) == 1:
        x, y = a[0], b[0]
        if x.__class__ is str and y.__class__ is str:
            return x == y
        return _eq_item(x, y)
    if len(a) != len(b):
        return False
    unknown = False
    for x, y in zip(a, b, strict=True):
        r = _eq_item(x, y)
        if r is False:
            return False
        if r is None:
            unknown = True
    return None if unknown else True


def _op_eq(left: Fn, right: Fn, negate: bool) -> BFn:
    def eq(focus: Coll, this: Coll, env: Env) -> bool | None:
        a = left(focus, this, env)
        if not a:
            return None
        return _eq3(a, right(focus, this, env))

    def ne(focus: Coll, this: Coll, env: Env) -> bool | None:
        r = eq(focus, this, env)
        return None if r is None else not r

    return ne if negate else eq


def _op_eq_bool(left: BFn, right: BFn, negate: bool) -> BFn:
    """``=``/``!=`` between two Boolean-valued operands (e.g. ext-1)."""

    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        a = left(focus, this, env)
        if a is None:
            return None
        b = right(focus, this, env)
        return None if b is None else (a == b) != negate

    return f


def _op_eq_member_literal(name: str, const: str, left: Fn, negate: bool) -> BFn:
    """``code = 'Reference'``: compare the JSON string directly when there is one."""
    general = _op_eq(left, lambda f, t, e: [const], negate)

    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        if len(focus) == 1:
            item = focus[0]
            if item.__class__ is dict:
                v = item.get(name)
                if v.__class__ is str:
                    return (v == const) != negate
        return general(focus, this, env)

    return f


def _op_equiv(left: Fn, right: Fn, negate: bool) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        a, b = left(focus, this, env), right(focus, this, env)
        r = (not a and not b) or (bool(a) and bool(b) and _equiv_coll(a, b))
        return r != negate

    return f


def _op_compare(left: Fn, right: Fn, test: Callable[[int], bool]) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        a = left(focus, this, env)
        if not a:
            return None
        b = right(focus, this, env)
        if not b:
            return None
        if len(a) == 1 and len(b) == 1 and a[0].__class__ is int and b[0].__class__ is int:
            return test(a[0] - b[0])
        c = _compare(a, b)
        return None if c is None else test(c)

    return f


def _op_in(left: Fn, right: Fn, reverse: bool) -> BFn:
    def f(focus: Coll, this: Coll, env: Env) -> bool | None:
        item_coll, coll = left(focus, this, env), right(focus, this, env)
        if reverse:
            item_coll, coll = coll, item_coll
        if not item_coll:
            return None
        if len(item_coll) > 1:
            raise EvaluationError("membership test needs a single item")
        return _contains_item(coll, item_coll[0])

    return f


def _op_union(left: Fn, right: Fn) -> Fn:
    def f(focus: Coll, this: Coll, env: Env) -> Coll:
        return _distinct(left(focus, this, env) + right(focus, this, env))

    return f


def _op_concat(left: Fn, right: Fn) -> Fn:
    def f(focus: Coll, this: Coll, env: Env) -> Coll:
        a, b = _single(left(focus, this, env)), _single(right(focus, this, env))
        return [_as_str(a, "&") + _as_str(b, "&")]

    return f


def _as_str(v: Any, op: str) -> str:
    if v is None:
        return ""
    if v.__class__ is not str:
        raise EvaluationError(f"{op} needs strings, got {type(v).__name__}")
    return v


def _number(v: Any) -> bool:
    return v.__class__ is int or v.__class__ is Decimal


def _arith(op: str, a: Any, b: Any) -> Any:
    if op == "+" and a.__class__ is str and b.__class__ is str:
        return a + b
    if not (_number(a) and _number(b)):
        qa, qb = _as_quantity(a), _as_quantity(b)
        if qa is not None and qb is not None and op in "+-" and _unit_key(qa.unit) == _unit_key(qb.unit):
            return Quantity(qa.value + qb.value if op == "+" else qa.value - qb.value, qa.unit)
        raise EvaluationError(f"operator {op} is not supported for {type(a).__name__} and {type(b).__name__}")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return None
    if op == "/":
        return Decimal(a) / Decimal(b)
    if op == "div":
        return int(Decimal(a) / Decimal(b))
    r = Decimal(a) % Decimal(b)  # truncated remainder, sign of the dividend
    return int(r) if a.__class__ is int and b.__class__ is int else r


# Integer + - * and mod without _arith's dispatch: arithmetic-heavy invariants (a check digit) run
# these many times per evaluation. ``mod`` only for a non-negative dividend below Decimal's
# precision and a positive divisor, where Python's floored % is FHIRPath's truncated remainder.
_INT_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _op_arith(left: Fn, right: Fn, op: str) -> Fn:
    int_op = _INT_OPS.get(op)
    mod = op == "mod"

    def f(focus: Coll, this: Coll, env: Env) -> Coll:
        got = left(focus, this, env)
        a = got[0] if len(got) == 1 and got[0].__class__ is int else _single(got)
        if a is None:
            return EMPTY
        got = right(focus, this, env)
        b = got[0] if len(got) == 1 and got[0].__class__ is int else _single(got)
        if b is None:
            return EMPTY
        if a.__class__ is int and b.__class__ is int:
            if int_op is not None:
                return [int_op(a, b)]
            if mod and 0 <= a < 10**27 and b > 0:
                return [a % b]
        r = _arith(op, a, b)
        return EMPTY if r is None else [r]

    return f


def _is_result(coll: Coll, matcher: Callable[[Any, Env], bool], env: Env) -> bool | None:
    if not coll:
        return None
    if len(coll) > 1:
        raise EvaluationError("'is' needs a single item")
    return matcher(coll[0], env)


# ---------------------------------------------------------------------------------------------
# Functions. A builder takes the compiler and the parameter ASTs and returns an operation on the
# function's input collection: op(input, this, env) -> list, or -> bool | None for Boolean
# functions (registered with boolean=True).
# ---------------------------------------------------------------------------------------------

Builder = Callable[["_Compiler", list[AST]], Callable[[Coll, Coll, "Env"], Any]]


class _Func(NamedTuple):
    low: int
    high: int
    builder: Builder
    boolean: bool


_FUNCTIONS: dict[str, _Func] = {}


def _function(name: str, low: int = 0, high: int = 0, boolean: bool = False) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        _FUNCTIONS[name] = _Func(low, high, builder, boolean)
        return builder

    return register


def _simple(name: str, fn: Callable[[Coll], Any], boolean: bool = False) -> None:
    """Register a function without parameters that maps its input collection."""
    _FUNCTIONS[name] = _Func(0, 0, lambda c, p: lambda coll, this, env: fn(coll), boolean)


def _single_fn(c: Coll) -> Coll:
    if len(c) > 1:
        raise EvaluationError("single() on a collection of several items")
    return c


def _has_value(c: Coll) -> bool:
    if len(c) != 1:
        return False
    item = c[0]
    if item.__class__ is Prim:
        return item.value is not None
    return item.__class__ is not dict


def _bools(c: Coll, name: str) -> list[bool]:
    out = []
    for item in c:
        v = _value(item)
        if v is not True and v is not False:
            raise EvaluationError(f"{name}() needs Booleans")
        out.append(v)
    return out


_simple("count", lambda c: [len(c)])
_simple("first", lambda c: c[:1])
_simple("last", lambda c: c[-1:])
_simple("tail", lambda c: c[1:])
_simple("distinct", _distinct)
_simple("single", _single_fn)
_simple("empty", lambda c: not c, boolean=True)
_simple("isDistinct", _is_distinct, boolean=True)
_simple("hasValue", _has_value, boolean=True)
_simple("allTrue", lambda c: all(_bools(c, "allTrue")), boolean=True)
_simple("anyTrue", lambda c: any(_bools(c, "anyTrue")), boolean=True)
_simple("allFalse", lambda c: not any(_bools(c, "allFalse")), boolean=True)
_simple("anyFalse", lambda c: not all(_bools(c, "anyFalse")), boolean=True)


def _not(b: bool | None) -> bool | None:
    return None if b is None else not b


_simple("not", lambda c: _not(_bool3(c)), boolean=True)


@_function("exists", 0, 1, boolean=True)
def _b_exists(comp: _Compiler, params: list[AST]) -> BoolOp:
    if not params:
        return lambda coll, this, env: bool(coll)
    crit = comp.lambda_bool(params[0])

    def op(coll: Coll, this: Coll, env: Env) -> bool | None:
        for i, item in enumerate(coll):
            env.index = i
            one = [item]
            if crit(one, one, env) is True:
                return True
        return False

    return op


@_function("all", 1, 1, boolean=True)
def _b_all(comp: _Compiler, params: list[AST]) -> BoolOp:
    crit = comp.lambda_bool(params[0])

    def op(coll: Coll, this: Coll, env: Env) -> bool | None:
        for i, item in enumerate(coll):
            env.index = i
            one = [item]
            if crit(one, one, env) is not True:
                return False
        return True

    return op


@_function("where", 1, 1)
def _b_where(comp: _Compiler, params: list[AST]) -> Op:
    crit = comp.lambda_bool(params[0])

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        out: Coll = []
        for i, item in enumerate(coll):
            env.index = i
            one = [item]
            if crit(one, one, env) is True:
                out.append(item)
        return out

    return op


@_function("select", 1, 1)
def _b_select(comp: _Compiler, params: list[AST]) -> Op:
    names = _member_path(params[0])
    if names is not None:  # select(code) is navigation: type.select(code) = type.code
        return _path(tuple(_member(n, comp.typed) for n in names))
    proj = comp.lambda_body(params[0])

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        out: Coll = []
        for i, item in enumerate(coll):
            env.index = i
            one = [item]
            out.extend(proj(one, one, env))
        return out

    return op


@_function("repeat", 1, 1)
def _b_repeat(comp: _Compiler, params: list[AST]) -> Op:
    proj = comp.lambda_body(params[0])

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        out: Coll = []
        pending = list(coll)
        while pending:
            item = pending.pop(0)
            one = [item]
            for found in proj(one, one, env):
                if not _contains_item(out, found):
                    out.append(found)
                    pending.append(found)
        return out

    return op


@_function("aggregate", 1, 2)
def _b_aggregate(comp: _Compiler, params: list[AST]) -> Op:
    step = comp.lambda_body(params[0])
    init = comp.compile(params[1]) if len(params) > 1 else None

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        saved = env.total
        env.total = init(this, this, env) if init is not None else EMPTY
        try:
            for i, item in enumerate(coll):
                env.index = i
                one = [item]
                env.total = step(one, one, env)
            return env.total
        finally:
            env.total = saved

    return op


@_function("iif", 2, 3)
def _b_iif(comp: _Compiler, params: list[AST]) -> Op:
    # The criterion and results are evaluated on the input collection (fhirpathpy and the HL7
    # Java validator do so; ctm-1 relies on it: member.resolve().iif(empty(), ...)).
    crit, yes = comp.compile_bool(params[0]), comp.compile(params[1])
    no = comp.compile(params[2]) if len(params) > 2 else None

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        if crit(coll, coll, env) is True:
            return yes(coll, coll, env)
        return no(coll, coll, env) if no is not None else EMPTY

    return op


@_function("trace", 1, 2)
def _b_trace(comp: _Compiler, params: list[AST]) -> Op:
    name = comp.compile(params[0])
    proj = comp.compile(params[1]) if len(params) > 1 else None

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        if env.trace is not None:
            label = _single(name(this, this, env))
            env.trace(str(label), proj(coll, coll, env) if proj is not None else list(coll))
        return coll

    return op


def _collection_op(name: str, fn: Callable[[Coll, Coll], Any], boolean: bool = False) -> None:
    def build(comp: _Compiler, params: list[AST]) -> Callable[[Coll, Coll, Env], Any]:
        other = comp.compile(params[0])
        return lambda coll, this, env: fn(coll, other(this, this, env))

    _FUNCTIONS[name] = _Func(1, 1, build, boolean)


_collection_op("union", lambda a, b: _distinct(a + b))
_collection_op("combine", lambda a, b: a + b)
_collection_op("intersect", lambda a, b: _distinct([x for x in a if _contains_item(b, x)]))
_collection_op("exclude", lambda a, b: [x for x in a if not _contains_item(b, x)])
_collection_op("subsetOf", lambda a, b: all(_contains_item(b, x) for x in a), boolean=True)
_collection_op("supersetOf", lambda a, b: all(_contains_item(a, x) for x in b), boolean=True)


def _int_param(comp: _Compiler, param: AST, name: str) -> Callable[[Coll, Env], int | None]:
    fn = comp.compile(param)

    def get(this: Coll, env: Env) -> int | None:
        v = _single(fn(this, this, env))
        if v is None:
            return None
        if v.__class__ is not int:
            raise EvaluationError(f"{name}() needs an Integer argument")
        return v

    return get


@_function("skip", 1, 1)
def _b_skip(comp: _Compiler, params: list[AST]) -> Op:
    n = _int_param(comp, params[0], "skip")

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        k = n(this, env)
        return EMPTY if k is None else coll[max(k, 0) :]

    return op


@_function("take", 1, 1)
def _b_take(comp: _Compiler, params: list[AST]) -> Op:
    n = _int_param(comp, params[0], "take")

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        k = n(this, env)
        return EMPTY if k is None or k <= 0 else coll[:k]

    return op


def _type_param(params: list[AST]) -> str:
    """The type name given to ofType/is/as as a function parameter (parsed as an expression)."""
    node = params[0]
    text = node.get("text")
    if node["type"] not in ("TermExpression", "InvocationExpression") or not text:
        raise UnsupportedExpression("expected a type name")
    if not re.fullmatch(r"[A-Za-z_`][A-Za-z0-9_`]*(\.[A-Za-z_`][A-Za-z0-9_`]*)?", text):
        raise UnsupportedExpression(f"expected a type name, got {text!r}")
    return str(text)


@_function("ofType", 1, 1)
def _b_of_type(comp: _Compiler, params: list[AST]) -> Op:
    matcher = _type_matcher(_type_param(params))
    return lambda coll, this, env: [x for x in coll if matcher(x, env)]


_FUNCTIONS["as"] = _FUNCTIONS["ofType"]


@_function("is", 1, 1, boolean=True)
def _b_is(comp: _Compiler, params: list[AST]) -> BoolOp:
    matcher = _type_matcher(_type_param(params))
    return lambda coll, this, env: _is_result(coll, matcher, env)


@_function("children")
def _b_children(comp: _Compiler, params: list[AST]) -> Op:
    typed = comp.typed
    return lambda coll, this, env: _children(coll, env, typed)


@_function("descendants")
def _b_descendants(comp: _Compiler, params: list[AST]) -> Op:
    typed = comp.typed
    return lambda coll, this, env: _descendants(coll, env, typed)


@_function("extension", 1, 1)
def _b_extension(comp: _Compiler, params: list[AST]) -> Op:
    url_fn = comp.compile(params[0])

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        url = _single(url_fn(this, this, env))
        if url is None:
            return EMPTY
        out: Coll = []
        for item in coll:
            holder = item.ext if item.__class__ is Prim else item
            if holder.__class__ is dict:
                for ext in holder.get("extension") or ():
                    if ext.__class__ is dict and ext.get("url") == url:
                        out.append(ext)
        return out

    return op


@_function("resolve")
def _b_resolve(comp: _Compiler, params: list[AST]) -> Op:
    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        out: Coll = []
        for item in coll:
            ref = _reference_of(item)
            found = _resolve_one(ref, env) if ref is not None else None
            if found is not None:
                out.append(found)
        return out

    return op


def _html_checks_fn(coll: Coll) -> bool | None:
    v = _single(coll)
    if v is None:
        return None
    return v.__class__ is str and html_checks(v)


_simple("htmlChecks", _html_checks_fn, boolean=True)


# -- strings ----------------------------------------------------------------------------------


def _input_str(coll: Coll, name: str) -> str | None:
    v = _single(coll, f"a single String for {name}()")
    if v is None:
        return None
    if v.__class__ is not str:
        raise EvaluationError(f"{name}() needs a String, got {type(v).__name__}")
    return v


def _string_fn(name: str, n_args: int, fn: Callable[..., Any], boolean: bool = False) -> None:
    """Register a String function: fn(input, *args) with String/Integer args; empty in, empty out."""

    def build(comp: _Compiler, params: list[AST]) -> Callable[[Coll, Coll, Env], Any]:
        consts = [_literal(p) for p in params]
        if all(c is not None for c in consts):
            # Literal arguments (the usual case: startsWith('#'), matches('...')) are bound once.
            return _string_call(name, fn, consts, boolean)
        args = [comp.compile(p) for p in params]

        def call(coll: Coll, this: Coll, env: Env) -> Any:
            s = _input_str(coll, name)
            if s is None:
                return None
            values = []
            for arg in args:
                v = _single(arg(this, this, env))
                if v is None:
                    return None
                values.append(v)
            return fn(s, *values)

        if boolean:
            return call

        def op(coll: Coll, this: Coll, env: Env) -> Coll:
            r = call(coll, this, env)
            if r is None:
                return EMPTY
            return r if r.__class__ is list else [r]

        return op

    _FUNCTIONS[name] = _Func(n_args if name != "substring" else 1, n_args, build, boolean)
    _STRING_FUNCTIONS[name] = fn


_STRING_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def _literal(node: AST) -> Any:
    """The value of a String or Integer literal parameter, else None."""
    if node["type"] != "TermExpression" or node["children"][0]["type"] != "LiteralTerm":
        return None
    literal = node["children"][0]["children"][0]
    if literal["type"] == "StringLiteral":
        return _unescape(literal["text"][1:-1])
    if literal["type"] == "NumberLiteral" and "." not in literal["text"]:
        return int(literal["text"])
    return None


def _string_unary(name: str, fn: Callable[..., Any], consts: list[Any]) -> Callable[[str], Any]:
    """A string function with its literal arguments bound (the regex of matches() compiled)."""
    if name == "matches":
        try:
            pattern = _regex(consts[0])
        except EvaluationError as exc:
            raise UnsupportedExpression(str(exc)) from exc
        return lambda s: pattern.search(s) is not None
    if name == "startsWith":
        prefix = consts[0]
        return lambda s: s.startswith(prefix)
    if name == "substring" and all(c.__class__ is int for c in consts):
        # _substring with its Integer arguments bound
        start = consts[0]
        if start < 0:
            return lambda s: None
        if len(consts) == 1:
            return lambda s: s[start:] if start < len(s) else None
        end = start + max(consts[1], 0)
        return lambda s: s[start:end] if start < len(s) else None
    return lambda s: fn(s, *consts)


def _string_call(name: str, fn: Callable[..., Any], consts: list[Any], boolean: bool) -> Callable[..., Any]:
    unary = _string_unary(name, fn, consts)

    def call(coll: Coll, this: Coll, env: Env) -> Any:
        if not coll:
            return None
        if len(coll) > 1:
            raise EvaluationError(f"{name}() needs a single String, got a collection of {len(coll)} items")
        s = coll[0]
        if s.__class__ is not str:
            s = _input_str(coll, name)
            if s is None:
                return None
        return unary(s)

    if boolean:
        return call

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        r = unary(coll[0]) if len(coll) == 1 and coll[0].__class__ is str else call(coll, this, env)
        if r is None:
            return EMPTY
        return r if r.__class__ is list else [r]

    return op


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise EvaluationError(f"invalid regular expression {pattern!r}: {exc}") from exc


def _substring(s: str, start: Any, length: Any = None) -> str | None:
    if start.__class__ is not int or start < 0 or start >= len(s):
        return None
    if length is None:
        return s[start:]
    return s[start : start + max(int(length), 0)]


def _replace_matches(s: str, pattern: str, repl: str) -> str:
    return _regex(pattern).sub(re.sub(r"\$(\d+)", r"\\\1", repl), s)


def _replace(s: str, old: str, new: str) -> str:
    if old == "":
        return new + new.join(s) + new
    return s.replace(old, new)


_string_fn("startsWith", 1, lambda s, p: s.startswith(p), boolean=True)
_string_fn("endsWith", 1, lambda s, p: s.endswith(p), boolean=True)
_string_fn("contains", 1, lambda s, p: p in s, boolean=True)
_string_fn("matches", 1, lambda s, p: _regex(p).search(s) is not None, boolean=True)
_string_fn("replaceMatches", 2, _replace_matches)
_string_fn("replace", 2, _replace)
_string_fn("length", 0, len)
_string_fn("substring", 2, _substring)
_string_fn("upper", 0, str.upper)
_string_fn("lower", 0, str.lower)
_string_fn("indexOf", 1, lambda s, p: s.find(p))
_string_fn("trim", 0, str.strip)
_string_fn("split", 1, lambda s, sep: s.split(sep))
_string_fn("toChars", 0, list)


@_function("join", 0, 1)
def _b_join(comp: _Compiler, params: list[AST]) -> Op:
    sep_fn = comp.compile(params[0]) if params else None

    def op(coll: Coll, this: Coll, env: Env) -> Coll:
        sep = _single(sep_fn(this, this, env)) if sep_fn is not None else ""
        return [str(sep or "").join(_as_str(_value(x), "join") for x in coll)]

    return op


# -- conversions ------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?\d+")
_DEC_RE = re.compile(r"[+-]?\d+(\.\d+)?")
_QTY_RE = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*(?:'([^']+)'|([a-z]+))?")


def _to_integer(v: Any) -> Any:
    if v is True or v is False:
        return int(v)
    if v.__class__ is int:
        return v
    if v.__class__ is str and _INT_RE.fullmatch(v):
        return int(v)
    return None


def _to_decimal(v: Any) -> Any:
    if v is True or v is False:
        return Decimal(int(v))
    if v.__class__ in (int, Decimal):
        return Decimal(v)
    if v.__class__ is str and _DEC_RE.fullmatch(v):
        return Decimal(v)
    return None


def _to_boolean(v: Any) -> Any:
    if v is True or v is False:
        return v
    if v.__class__ in (int, Decimal):
        return True if v == 1 else False if v == 0 else None
    if v.__class__ is str:
        low = v.lower()
        if low in ("true", "t", "yes", "y", "1", "1.0"):
            return True
        if low in ("false", "f", "no", "n", "0", "0.0"):
            return False
    return None


def _to_string(v: Any) -> Any:
    if v is True or v is False:
        return "true" if v else "false"
    if v.__class__ in (str, int, Decimal):
        return str(v)
    if v.__class__ is Temporal:
        return v.text
    if v.__class__ is Quantity:
        return f"{v.value} '{v.unit}'"
    return None


def _to_kind(kind: str) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        if v.__class__ is Temporal:
            if kind == "dateTime" and v.kind == "date":
                return Temporal("dateTime", v.parts, v.tz, v.text)
            if kind == "date" and v.kind == "dateTime":
                return Temporal("date", v.parts[:3], None, v.text.split("T")[0])
            return v if v.kind == kind else None
        if v.__class__ is str:
            found = parse_temporal(v, "time" if kind == "time" else None)
            if found is None:
                return None
            return convert(found) if found.kind != kind else found
        return None

    return convert


def _to_quantity(v: Any) -> Any:
    if v.__class__ in (int, Decimal):
        return Quantity(v, "1")
    if v.__class__ is Quantity:
        return v
    if v.__class__ is dict:
        return _as_quantity(v)
    if v.__class__ is str:
        m = _QTY_RE.fullmatch(v.strip())
        if m:
            unit = m.group(2) or m.group(3) or "1"
            if m.group(3) and _unit_key(unit) == unit:
                return None
            return Quantity(Decimal(m.group(1)), unit)
    return None


_CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "Integer": _to_integer,
    "Decimal": _to_decimal,
    "Boolean": _to_boolean,
    "String": _to_string,
    "Date": _to_kind("date"),
    "DateTime": _to_kind("dateTime"),
    "Time": _to_kind("time"),
    "Quantity": _to_quantity,
}


def _converter(convert: Callable[[Any], Any]) -> Op:
    def to(coll: Coll, this: Coll, env: Env) -> Coll:
        if len(coll) == 1:
            v = coll[0]
            if v.__class__ is Prim:
                v = v.value
        else:
            v = _single(coll)
        if v is None:
            return EMPTY
        r = convert(v)
        return EMPTY if r is None else [r]

    return to


def _converts(convert: Callable[[Any], Any]) -> Callable[[Coll], bool | None]:
    def test(coll: Coll) -> bool | None:
        v = _single(coll)
        return None if v is None else convert(v) is not None

    return test


def _conversion(name: str, op: Op) -> None:
    """Register a conversion function (no parameters) as its operation itself: one call less."""
    _FUNCTIONS[name] = _Func(0, 0, lambda c, p: op, False)


for _name, _convert in _CONVERSIONS.items():
    _conversion("to" + _name, _converter(_convert))
    _simple("convertsTo" + _name, _converts(_convert), boolean=True)


# -- dates and math ---------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).astimezone()


_simple("today", lambda c: [parse_temporal(_now().date().isoformat())])
_simple("now", lambda c: [parse_temporal(_now().isoformat(timespec="milliseconds"))])
_simple("timeOfDay", lambda c: [parse_temporal(_now().time().isoformat(timespec="milliseconds"), "time")])


def _math_fn(name: str, fn: Callable[..., Any], n_args: int = 0) -> None:
    def build(comp: _Compiler, params: list[AST]) -> Op:
        args = [comp.compile(p) for p in params]

        def op(coll: Coll, this: Coll, env: Env) -> Coll:
            v = _single(coll)
            if v is None:
                return EMPTY
            if not _number(v):
                q = _as_quantity(v)
                if q is None or name not in ("abs", "ceiling", "floor", "round", "truncate"):
                    raise EvaluationError(f"{name}() needs a number")
                return [Quantity(fn(q.value), q.unit)]
            extra = [_single(a(this, this, env)) for a in args]
            try:
                r = fn(v, *extra)
            except (ValueError, ArithmeticError):
                return EMPTY
            return EMPTY if r is None else [r]

        return op

    _FUNCTIONS[name] = _Func(0 if name == "round" else n_args, n_args, build, False)


def _round(v: Any, places: Any = None) -> Any:
    return Decimal(v).quantize(Decimal(1).scaleb(-(places or 0)), ROUND_HALF_UP)


_math_fn("abs", abs)
_math_fn("ceiling", lambda v: math.ceil(v))
_math_fn("floor", lambda v: math.floor(v))
_math_fn("truncate", lambda v: int(v))
_math_fn("round", _round, 1)
_math_fn("sqrt", lambda v: None if v < 0 else Decimal(v).sqrt())
_math_fn("exp", lambda v: Decimal(v).exp())
_math_fn("ln", lambda v: Decimal(v).ln())
_math_fn("log", lambda v, base: Decimal(v).ln() / Decimal(base).ln(), 1)
_math_fn("power", lambda v, p: None if v < 0 and int(p) != p else v**p, 1)


def _aggregate_simple(name: str, fn: Callable[[list[Any]], Any]) -> None:
    def apply(c: Coll) -> Coll:
        values = [_value(x) for x in c]
        return EMPTY if not values else [fn(values)]

    _simple(name, apply)


_aggregate_simple("sum", sum)
_aggregate_simple("min", min)
_aggregate_simple("max", max)
_aggregate_simple("avg", lambda v: Decimal(sum(v)) / len(v))

#: Functions this evaluator does not implement, with the reason given by UnsupportedExpression.
UNSUPPORTED_FUNCTIONS = {
    "memberOf": "needs a terminology service",
    "subsumes": "needs a terminology service",
    "subsumedBy": "needs a terminology service",
    "conformsTo": "needs profile validation",
    "elementDefinition": "needs element definitions at runtime",
    "slice": "needs profile slicing",
    "checkModifiers": "needs profile validation",
    "type": "reflection is not implemented",
}


# ---------------------------------------------------------------------------------------------
# Compiler
# ---------------------------------------------------------------------------------------------

_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)


def _unescape(body: str) -> str:
    """FHIRPath string escapes (https://hl7.org/fhirpath/N1/#string); unknown ones are kept."""

    def sub(m: re.Match[str]) -> str:
        code = m.group(1)
        if code[0] == "u" and len(code) == 5:
            return chr(int(code[1:], 16))
        return _ESCAPES.get(code, m.group(0))

    return _ESCAPE_RE.sub(sub, body)


def _identifier(text: str) -> str:
    return _unescape(text[1:-1]) if text.startswith("`") else text


def _uses_types(node: AST) -> bool:
    if node.get("type") == "TypeExpression":
        return True
    if node.get("type") == "Functn" and node["children"][0].get("text") in ("ofType", "is", "as"):
        return True
    return any(_uses_types(c) for c in node.get("children", ()))


def _is_boolean_call(inv: AST) -> bool:
    name = _call_name(inv)
    spec = _FUNCTIONS.get(name) if name is not None else None
    return spec is not None and spec.boolean


def _call_name(inv: AST) -> str | None:
    """The function name of a FunctionInvocation node, else None."""
    if inv["type"] != "FunctionInvocation":
        return None
    return _identifier(inv["children"][0]["children"][0]["text"])


def _term_member(node: AST) -> str | None:
    """The name of a term that is a plain member (``binding``), else None."""
    if node["type"] != "TermExpression" or node["children"][0]["type"] != "InvocationTerm":
        return None
    inv = node["children"][0]["children"][0]
    if inv["type"] != "MemberInvocation":
        return None
    name = _identifier(inv["children"][0]["text"])
    return None if name[:1].isupper() else name


def _member_path(node: AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"] when every step is a plain member, else None."""
    if node["type"] == "TermExpression":
        name = _term_member(node)
        return None if name is None else [name]
    if node["type"] != "InvocationExpression" or node["children"][1]["type"] != "MemberInvocation":
        return None
    head = _member_path(node["children"][0])
    return None if head is None else [*head, _identifier(node["children"][1]["children"][0]["text"])]


def _path(steps: tuple[Op, ...]) -> Fn:
    if len(steps) == 1:
        return steps[0]

    def path(focus: Coll, this: Coll, env: Env) -> Coll:
        coll = focus
        for step in steps:
            coll = step(coll, this, env)
            if not coll:
                return EMPTY
        return coll

    return path


_LAMBDA_FUNCTIONS = frozenset({"where", "select", "all", "exists", "repeat", "aggregate", "iif"})
_OPERATORS = frozenset(
    {
        "InvocationExpression",
        "IndexerExpression",
        "PolarityExpression",
        "MultiplicativeExpression",
        "AdditiveExpression",
        "UnionExpression",
        "InequalityExpression",
        "TypeExpression",
        "EqualityExpression",
        "MembershipExpression",
        "AndExpression",
        "OrExpression",
        "ImpliesExpression",
    }
)


def _independent(node: AST) -> bool:
    """Whether ``node`` depends on neither $this nor %context (only literals and %resource...)."""
    kind = node["type"]
    if kind in ("LiteralTerm", "TypeSpecifier"):
        return True
    if kind == "ExternalConstantTerm":
        ident = node["children"][0]["children"][0]
        return "context" not in str(ident.get("text"))
    if kind in ("TermExpression", "ParenthesizedTerm"):
        return _independent(node["children"][0])
    if kind == "InvocationExpression":
        left, inv = node["children"]
        if not _independent(left) or inv["type"] not in ("MemberInvocation", "FunctionInvocation"):
            return False
        name = _call_name(inv)
        if name is None:
            return True
        if name == "trace":
            return False  # keep its side effect
        params = inv["children"][0]["children"][1]["children"] if not _no_params(inv) else []
        # Lambda parameters see the items of the (independent) input, not the outer $this.
        return (name in _LAMBDA_FUNCTIONS and "%context" not in str(params)) or all(_independent(p) for p in params)
    if kind in _OPERATORS:
        return all(_independent(c) for c in node["children"])
    return False


def _loop_invariant(node: AST) -> bool:
    """Worth memoising inside a lambda: independent of $this and not a bare literal/variable."""
    while node["type"] in ("TermExpression", "ParenthesizedTerm"):
        node = node["children"][0]
    return node["type"] in _OPERATORS and _independent(node)


def _memo(fn: Fn) -> Fn:
    """Evaluate a loop-invariant subexpression once per resource (the Env caches it)."""
    token = object()

    def memo(focus: Coll, this: Coll, env: Env) -> Coll:
        key = (id(token), id(env.resource), id(env.root_resource))
        found: Coll | None = env.cache.get(key)
        if found is None:
            found = fn(focus, this, env)
            env.cache[key] = found
        return found

    return memo


def _memo_bool(fn: BFn) -> BFn:
    token = object()

    def memo(focus: Coll, this: Coll, env: Env) -> bool | None:
        key = (id(token), id(env.resource), id(env.root_resource))
        if key in env.cache:
            return env.cache[key]  # type: ignore[no-any-return]
        found = fn(focus, this, env)
        env.cache[key] = found
        return found

    return memo


def _no_params(inv: AST) -> bool:
    return inv["type"] == "FunctionInvocation" and len(inv["children"][0]["children"]) == 1


#: Boolean functions without parameters that only look at their input, called inline.
_INLINE_BOOL: dict[str, Callable[[Coll], bool | None]] = {
    "exists": bool,
    "empty": lambda c: not c,
    "hasValue": lambda c: _has_value(c),
    "isDistinct": _is_distinct,
}


def _last_invocation(node: AST) -> AST | None:
    """The final invocation of ``a.b.f()`` or of a term ``f()``."""
    if node["type"] == "InvocationExpression":
        return node["children"][1]  # type: ignore[no-any-return]
    if node["type"] == "TermExpression" and node["children"][0]["type"] == "InvocationTerm":
        return node["children"][0]["children"][0]  # type: ignore[no-any-return]
    return None


def _bool_operands(node: AST, kind: str, op: str) -> list[AST]:
    """Flatten ``a or b or c`` (left-nested) into [a, b, c]."""
    if node["type"] == kind and node["terminalNodeText"][0] == op:
        left, right = node["children"]
        return [*_bool_operands(left, kind, op), right]
    return [node]


_CONSTANTS = {
    "ucum": UCUM,
    "sct": "http://snomed.info/sct",
    "loinc": "http://loinc.org",
}
_COMPARISONS: dict[str, Callable[[int], bool]] = {
    "<": lambda c: c < 0,
    "<=": lambda c: c <= 0,
    ">": lambda c: c > 0,
    ">=": lambda c: c >= 0,
}


class _Compiler:
    """AST -> closures. ``compile`` gives collection closures, ``compile_bool`` Boolean ones."""

    def __init__(self, typed: bool) -> None:
        self.typed = typed
        self.depth = 0  # nesting of lambda bodies (where, select, all, ...)

    def compile(self, node: AST) -> Fn:
        method = getattr(self, "c_" + node["type"], None)
        if method is not None:
            fn: Fn = method(node)
        elif hasattr(self, "b_" + node["type"]):
            fn = _as_list(self.compile_bool(node))
        else:
            raise UnsupportedExpression(f"unsupported syntax: {node['type']}")
        return _memo(fn) if self.depth and _loop_invariant(node) else fn

    def compile_bool(self, node: AST) -> BFn:
        method = getattr(self, "b_" + node["type"], None)
        found: BFn | None = method(node) if method is not None else None
        if found is None:
            return _as_bool(self.compile(node))
        return _memo_bool(found) if self.depth and _loop_invariant(node) else found

    def member_string_test(self, member: str, inv: AST) -> BFn | None:
        """``path.matches('...')``, ``fullUrl.contains('/_history/')``: test the JSON string."""
        name = _call_name(inv) or ""
        params = inv["children"][0]["children"][1]["children"] if not _no_params(inv) else []
        consts = [_literal(p) for p in params]
        spec = _FUNCTIONS[name]
        if any(c is None for c in consts) or not spec.low <= len(params) <= spec.high:
            return None
        unary = _string_unary(name, _STRING_FUNCTIONS[name], consts)
        general: BoolOp = spec.builder(self, params)
        nav = _member(member, self.typed)

        def test(focus: Coll, this: Coll, env: Env) -> bool | None:
            if len(focus) == 1:
                item = focus[0]
                if item.__class__ is dict:
                    v = item.get(member)
                    if v.__class__ is str:
                        return unary(v)  # type: ignore[no-any-return]
            return general(nav(focus, this, env), this, env)

        return test

    def iif_bool(self, inv: AST, source: Fn | None) -> BFn:
        """``iif(criterion, a, b)`` where a Boolean is wanted (eld-2): no result lists."""
        params = inv["children"][0]["children"][1]["children"] if not _no_params(inv) else []
        if not 2 <= len(params) <= 3:
            raise UnsupportedExpression(f"iif() takes 2..3 arguments, got {len(params)}")
        crit, yes = self.compile_bool(params[0]), self.compile_bool(params[1])
        no = self.compile_bool(params[2]) if len(params) > 2 else None

        def iif(focus: Coll, this: Coll, env: Env) -> bool | None:
            coll = source(focus, this, env) if source is not None else focus
            if crit(coll, coll, env) is True:
                return yes(coll, coll, env)
            return no(coll, coll, env) if no is not None else None

        return iif

    def lambda_body(self, node: AST) -> Fn:
        """Compile the body of where/select/all/...: evaluated once per item."""
        self.depth += 1
        try:
            return self.compile(node)
        finally:
            self.depth -= 1

    def lambda_bool(self, node: AST) -> BFn:
        self.depth += 1
        try:
            return self.compile_bool(node)
        finally:
            self.depth -= 1

    # -- terms ----------------------------------------------------------------------------
    def c_TermExpression(self, node: AST) -> Fn:
        return self.compile(node["children"][0])

    c_ParenthesizedTerm = c_TermExpression
    c_LiteralTerm = c_TermExpression

    def b_TermExpression(self, node: AST) -> BFn | None:
        child = node["children"][0]
        if child["type"] == "ParenthesizedTerm":
            return self.compile_bool(child["children"][0])
        if child["type"] == "InvocationTerm":
            inv = child["children"][0]
            if _call_name(inv) == "iif":
                return self.iif_bool(inv, None)
            inline = _INLINE_BOOL.get(_call_name(inv) or "") if _no_params(inv) else None
            if inline is not None:
                return lambda focus, this, env: inline(this)
            # At the start of a term the input collection is $this (focus is this there).
            return self.boolean_function(inv)
        return None

    def b_ParenthesizedTerm(self, node: AST) -> BFn:
        return self.compile_bool(node["children"][0])

    def c_InvocationTerm(self, node: AST) -> Fn:
        inv = node["children"][0]
        if inv["type"] == "MemberInvocation":
            name = _identifier(inv["children"][0]["text"])
            if name[:1].isupper() and (model.is_resource_type(name) or name in ("Resource", "DomainResource")):
                return _type_root(name, self.typed)
        # Terms are only evaluated where focus is $this, so the invocation applies to focus.
        return self.invocation(inv)

    def c_NullLiteral(self, node: AST) -> Fn:
        return lambda f, t, e: EMPTY

    def c_BooleanLiteral(self, node: AST) -> Fn:
        return (lambda f, t, e: TRUE) if node["text"] == "true" else (lambda f, t, e: FALSE)

    def c_StringLiteral(self, node: AST) -> Fn:
        const = [_unescape(node["text"][1:-1])]
        return lambda f, t, e: const

    def c_NumberLiteral(self, node: AST) -> Fn:
        text = node["text"]
        const = [Decimal(text) if "." in text else int(text)]
        return lambda f, t, e: const

    def c_DateTimeLiteral(self, node: AST) -> Fn:
        value = parse_temporal(node["text"][1:])
        if value is None:
            raise UnsupportedExpression(f"invalid date/time literal {node['text']}")
        const = [value]
        return lambda f, t, e: const

    def c_TimeLiteral(self, node: AST) -> Fn:
        value = parse_temporal(node["text"][2:], "time")
        if value is None:
            raise UnsupportedExpression(f"invalid time literal {node['text']}")
        const = [value]
        return lambda f, t, e: const

    def c_QuantityLiteral(self, node: AST) -> Fn:
        quantity = node["children"][0]
        number = quantity["terminalNodeText"][0]
        unit = "1"
        for child in quantity.get("children", ()):
            texts = child["terminalNodeText"] or [t for c in child.get("children", ()) for t in c["terminalNodeText"]]
            if texts:
                unit = texts[0]
        unit = _unescape(unit[1:-1]) if unit.startswith("'") else unit
        const = [Quantity(Decimal(number), unit)]
        return lambda f, t, e: const

    def c_ExternalConstantTerm(self, node: AST) -> Fn:
        ident = node["children"][0]["children"][0]
        text = ident.get("text") or ident["terminalNodeText"][0]
        name = _unescape(text[1:-1]) if text[:1] in ("`", "'") else text
        return _external_constant(name)

    # -- invocations ----------------------------------------------------------------------
    def invocation(self, node: AST) -> Op:
        kind = node["type"]
        if kind == "MemberInvocation":
            return _member(_identifier(node["children"][0]["text"]), self.typed)
        if kind == "FunctionInvocation":
            func, boolean = self.function(node["children"][0])
            if boolean:
                return lambda coll, this, env: _B2L[func(coll, this, env)]
            return func
        if kind == "ThisInvocation":
            return lambda focus, this, env: this
        if kind == "IndexInvocation":
            return lambda focus, this, env: [env.index]
        if kind == "TotalInvocation":
            return lambda focus, this, env: env.total
        raise UnsupportedExpression(f"unsupported invocation {kind}")

    def boolean_function(self, inv: AST) -> BoolOp | None:
        """The Boolean operation of an invocation of a Boolean function, else None."""
        if inv["type"] != "FunctionInvocation":
            return None
        func, boolean = self.function(inv["children"][0])
        return func if boolean else None

    def function(self, functn: AST) -> tuple[Callable[[Coll, Coll, Env], Any], bool]:
        name = _identifier(functn["children"][0]["text"])
        params = functn["children"][1]["children"] if len(functn["children"]) > 1 else []
        if name in UNSUPPORTED_FUNCTIONS:
            raise UnsupportedExpression(f"{name}() is not supported: {UNSUPPORTED_FUNCTIONS[name]}")
        spec = _FUNCTIONS.get(name)
        if spec is None:
            raise UnsupportedExpression(f"unknown function {name}()")
        if not spec.low <= len(params) <= spec.high:
            raise UnsupportedExpression(f"{name}() takes {spec.low}..{spec.high} arguments, got {len(params)}")
        return spec.builder(self, params), spec.boolean

    def c_InvocationExpression(self, node: AST) -> Fn:
        source, steps = self.invocations(node)
        return _chain(source, steps) if steps else source

    def invocations(self, node: AST) -> tuple[Fn, list[Op]]:
        """``a.f().g()`` as its source and the invocations applied to it in turn, so that the
        chain is one closure rather than one per step (a memoised part is a source of its own)."""
        left_node, inv = node["children"]
        fused = self.fused(left_node, inv)
        if fused is not None:
            return fused, []
        names = _member_path(node)
        if names is not None:
            return _path(tuple(_member(n, self.typed) for n in names)), []
        if left_node["type"] == "InvocationExpression" and not (self.depth and _loop_invariant(left_node)):
            source, steps = self.invocations(left_node)
        else:
            source, steps = self.compile(left_node), []
        if _call_name(inv) == "count" and _no_params(inv):
            left = _chain(source, steps) if steps else source
            return (lambda focus, this, env: [len(left(focus, this, env))]), []
        steps.append(self.invocation(inv))
        return source, steps

    def b_InvocationExpression(self, node: AST) -> BFn | None:
        left_node, inv = node["children"]
        name = _call_name(inv)
        if name == "iif":
            return self.iif_bool(inv, self.compile(left_node))
        if name == "not" and _no_params(inv):
            inner = self.compile_bool(left_node)
            return lambda focus, this, env: _not(inner(focus, this, env))
        inline = _INLINE_BOOL.get(name or "") if _no_params(inv) else None
        member = _term_member(left_node)
        if name in ("exists", "empty") and _no_params(inv) and member is not None:
            exists = _member_exists(member, self.typed)
            if name == "exists":
                return exists
            return lambda focus, this, env: not exists(focus, this, env)
        if inline is not None:
            source = self.compile(left_node)
            return lambda focus, this, env: inline(source(focus, this, env))
        if member is not None and name in _STRING_FUNCTIONS and _FUNCTIONS[name].boolean:
            fused = self.member_string_test(member, inv)
            if fused is not None:
                return fused
        func = self.boolean_function(inv)
        if func is None:
            return None
        left = self.compile(left_node)
        return lambda focus, this, env: func(left(focus, this, env), this, env)

    def fused(self, left_node: AST, inv: AST) -> Fn | None:
        """``children().count()``, ``children().x`` and ``descendants().x`` without building the
        intermediate collection of every child node."""
        last = _last_invocation(left_node)
        source_name = _call_name(last) if last is not None else None
        if source_name not in ("children", "descendants") or last is None or _call_name(last) is None:
            return None
        if left_node["type"] == "TermExpression":
            source: Fn = lambda focus, this, env: this  # noqa: E731
        else:
            source = self.compile(left_node["children"][0])
        if source_name == "children" and _call_name(inv) == "count" and _no_params(inv):
            return lambda focus, this, env: _children_count(source(focus, this, env))
        if inv["type"] != "MemberInvocation":
            return None
        name = _identifier(inv["children"][0]["text"])
        if name in ("id", "extension") or self.typed:
            return None  # typed mode walks the model instead, to know each node's type
        nav = _member(name, self.typed)
        objects = _child_objects if source_name == "children" else _descendant_objects

        def f(focus: Coll, this: Coll, env: Env) -> Coll:
            return nav(objects(source(focus, this, env), env), this, env)

        return f

    def c_IndexerExpression(self, node: AST) -> Fn:
        coll_fn, idx_fn = (self.compile(c) for c in node["children"])

        def f(focus: Coll, this: Coll, env: Env) -> Coll:
            coll = coll_fn(focus, this, env)
            i = _single(idx_fn(focus, this, env))
            if i is None:
                return EMPTY
            if i.__class__ is not int:
                raise EvaluationError("an index must be an Integer")
            return [coll[i]] if 0 <= i < len(coll) else EMPTY

        return f

    # -- operators ------------------------------------------------------------------------
    def operands(self, node: AST) -> tuple[Fn, Fn]:
        left, right = node["children"]
        return self.compile(left), self.compile(right)

    def c_PolarityExpression(self, node: AST) -> Fn:
        inner = self.compile(node["children"][0])
        if node["terminalNodeText"][0] == "+":
            return inner

        def negate(focus: Coll, this: Coll, env: Env) -> Coll:
            v = _single(inner(focus, this, env))
            if v is None:
                return EMPTY
            if _number(v):
                return [-v]
            if v.__class__ is Quantity:
                return [Quantity(-v.value, v.unit)]
            raise EvaluationError("unary minus needs a number")

        return negate

    def c_MultiplicativeExpression(self, node: AST) -> Fn:
        return _op_arith(*self.operands(node), node["terminalNodeText"][0])

    def c_AdditiveExpression(self, node: AST) -> Fn:
        op = node["terminalNodeText"][0]
        if op == "&":
            return _op_concat(*self.operands(node))
        return _op_arith(*self.operands(node), op)

    def c_UnionExpression(self, node: AST) -> Fn:
        return _op_union(*self.operands(node))

    def c_TypeExpression(self, node: AST) -> Fn:
        if node["terminalNodeText"][0] == "is":
            return _as_list(self.b_TypeExpression(node))
        left = self.compile(node["children"][0])
        matcher = _type_matcher(node["children"][1]["text"])
        return lambda focus, this, env: [x for x in left(focus, this, env) if matcher(x, env)]

    def b_TypeExpression(self, node: AST) -> BFn:
        if node["terminalNodeText"][0] != "is":
            return _as_bool(self.c_TypeExpression(node))
        left = self.compile(node["children"][0])
        matcher = _type_matcher(node["children"][1]["text"])
        return lambda focus, this, env: _is_result(left(focus, this, env), matcher, env)

    def b_InequalityExpression(self, node: AST) -> BFn:
        return _op_compare(*self.operands(node), _COMPARISONS[node["terminalNodeText"][0]])

    def b_EqualityExpression(self, node: AST) -> BFn:
        op = node["terminalNodeText"][0]
        if op in ("=", "!=") and all(self.is_boolean(n) for n in node["children"]):
            lb, rb = (self.compile_bool(n) for n in node["children"])
            return _op_eq_bool(lb, rb, negate=op == "!=")
        left, right = self.operands(node)
        name, const = _term_member(node["children"][0]), _literal(node["children"][1])
        if op in ("=", "!=") and name is not None and isinstance(const, str):
            return _op_eq_member_literal(name, const, left, negate=op == "!=")
        if op in ("=", "!="):
            return _op_eq(left, right, negate=op == "!=")
        return _op_equiv(left, right, negate=op == "!~")

    def is_boolean(self, node: AST) -> bool:
        """Whether ``node`` always gives a single Boolean or empty (so ``=`` can compare bools)."""
        kind = node["type"]
        if kind in ("AndExpression", "OrExpression", "ImpliesExpression", "InequalityExpression"):
            return True
        if kind == "EqualityExpression" or kind == "MembershipExpression":
            return True
        if kind == "TermExpression":
            child = node["children"][0]
            if child["type"] == "ParenthesizedTerm":
                return self.is_boolean(child["children"][0])
            if child["type"] == "LiteralTerm":
                return bool(child["children"][0]["type"] == "BooleanLiteral")
            inv = child["children"][0] if child["type"] == "InvocationTerm" else None
            return inv is not None and _is_boolean_call(inv)
        return kind == "InvocationExpression" and _is_boolean_call(node["children"][1])

    def b_MembershipExpression(self, node: AST) -> BFn:
        return _op_in(*self.operands(node), reverse=node["terminalNodeText"][0] == "contains")

    def b_AndExpression(self, node: AST) -> BFn:
        return _op_and([self.compile_bool(n) for n in _bool_operands(node, "AndExpression", "and")])

    def b_OrExpression(self, node: AST) -> BFn:
        if node["terminalNodeText"][0] == "xor":
            left, right = node["children"]
            return _op_xor(self.compile_bool(left), self.compile_bool(right))
        return _op_or([self.compile_bool(n) for n in _bool_operands(node, "OrExpression", "or")])

    def b_ImpliesExpression(self, node: AST) -> BFn:
        left, right = node["children"]
        return _op_implies(self.compile_bool(left), self.compile_bool(right))


def _chain(source: Fn, steps: list[Op]) -> Fn:
    """``source`` then each step on the collection the previous one gave (all with the same $this)."""
    if len(steps) == 1:
        (step,) = steps
        return lambda focus, this, env: step(source(focus, this, env), this, env)
    if len(steps) == 2:
        first, second = steps
        return lambda focus, this, env: second(first(source(focus, this, env), this, env), this, env)
    ops = tuple(steps)

    def f(focus: Coll, this: Coll, env: Env) -> Coll:
        coll = source(focus, this, env)
        for op in ops:
            coll = op(coll, this, env)
        return coll

    return f


def _external_constant(name: str) -> Fn:
    if name == "resource":
        return lambda f, t, env: [env.resource] if env.resource is not None else EMPTY
    if name == "rootResource":
        return lambda f, t, env: _root_resource(env)
    if name == "context":
        return lambda f, t, env: [env.context] if env.context is not None else env.root
    if name in _CONSTANTS:
        const = [_CONSTANTS[name]]
        return lambda f, t, env: const
    if name.startswith("vs-"):
        const = ["http://hl7.org/fhir/ValueSet/" + name[3:]]
        return lambda f, t, env: const
    if name.startswith("ext-"):
        const = ["http://hl7.org/fhir/StructureDefinition/" + name[4:]]
        return lambda f, t, env: const

    def variable(f: Coll, t: Coll, env: Env) -> Coll:
        if name not in env.variables:
            raise EvaluationError(f"undefined variable %{name}")
        value = env.variables[name]
        return list(value) if isinstance(value, list) else ([] if value is None else [value])

    return variable


def _root_resource(env: Env) -> Coll:
    root = env.root_resource if env.root_resource is not None else env.resource
    return [root] if root is not None else EMPTY


# ---------------------------------------------------------------------------------------------
# Parsing and the public API
# ---------------------------------------------------------------------------------------------


def _parse(expression: str) -> AST:
    """The AST of ``expression``: shipped for the R4 invariants, else parsed now."""
    shipped = model.fhirpath_tree(expression)
    return shipped if shipped is not None else parse_fhirpath(expression)


def parse_fhirpath(expression: str) -> AST:
    """The fhirpathpy AST of ``expression``; syntax errors raise UnsupportedExpression."""
    from antlr4 import CommonTokenStream, InputStream  # type: ignore[import-untyped]
    from antlr4.error.ErrorListener import ErrorListener  # type: ignore[import-untyped]
    from antlr4.tree.Tree import ParseTreeWalker  # type: ignore[import-untyped]
    from fhirpathpy.parser.ASTPathListener import ASTPathListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    class Raise(ErrorListener):  # type: ignore[misc]
        def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, msg: str, e: Any) -> None:
            raise UnsupportedExpression(f"syntax error at {line}:{column}: {msg}")

    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(Raise())
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(Raise())
    tree = parser.entireExpression()  # type: ignore[no-untyped-call]
    listener = ASTPathListener()  # type: ignore[no-untyped-call]
    ParseTreeWalker().walk(listener, tree)
    entire: AST = listener.parentStack[0]["children"][0]
    return entire["children"][0]  # type: ignore[no-any-return]


class Compiled:
    """A compiled expression.

    ``compiled(node, env)`` returns the result collection (a new list); ``compiled.test(node,
    env)`` evaluates it as an invariant (see :func:`evaluate_invariant`). ``node`` is a JSON value
    (dict, primitive or :class:`Prim`) or a list taken as the input collection.

    ``test`` runs the closures for the first evaluations, then Python code generated from the
    syntax tree (:mod:`adapter.fhir.fhirpath_codegen`) with the same results as
    :meth:`closure_test`: generating costs about a millisecond, which an expression evaluated a
    few times (the CLI on one file) never repays.
    """

    __slots__ = ("_ast", "_bool", "_calls", "_fn", "context", "expression", "test", "typed")

    #: True/False, or None for an empty result; several items raise EvaluationError.
    test: Callable[[Any, Env], bool | None]

    def __init__(self, expression: str, ast: AST, fn: Fn, test: BFn, typed: bool, context: bool) -> None:
        self.expression = expression
        self._ast = ast
        self._fn = fn
        self._bool = test
        self.typed = typed
        self.context = context  # uses %context (which defaults to the input node)
        self._calls = 0
        self.test = self._warming_test

    def __repr__(self) -> str:
        return f"Compiled({self.expression!r})"

    def __call__(self, node: Any, env: Env | None = None) -> Coll:
        return list(self.raw(node, env if env is not None else Env()))

    def raw(self, node: Any, env: Env) -> Coll:
        """Evaluate without copying the result (which must then not be mutated)."""
        root = node if node.__class__ is list else ([] if node is None else [node])
        env.root = root
        return self._fn(root, root, env)

    def closure_test(self, node: Any, env: Env) -> bool | None:
        """``test`` through the closures of the Boolean compilation (no generated code)."""
        root = node if node.__class__ is list else ([node] if node is not None else EMPTY)
        if self.context:
            env.root = root
        return self._bool(root, root, env)

    def _warming_test(self, node: Any, env: Env) -> bool | None:
        self._calls += 1
        if self._calls >= _GENERATE_AFTER and self.test == self._warming_test:
            from adapter.fhir.fhirpath_codegen import generated_test  # it builds on this module

            self.test = generated_test(self)
        return self.closure_test(node, env)


#: Evaluations of an expression through the closures before its test is generated (Compiled).
_GENERATE_AFTER = 32


_COMPILED: dict[str, Compiled] = {}


def compile_expression(expression: str) -> Compiled:
    """Compile (and cache) a FHIRPath expression; UnsupportedExpression when it cannot be."""
    found = _COMPILED.get(expression)
    if found is None:
        ast = _parse(expression)
        typed = _uses_types(ast)
        compiler = _Compiler(typed)
        context = "%context" in expression
        found = Compiled(expression, ast, compiler.compile(ast), compiler.compile_bool(ast), typed, context)
        _COMPILED[expression] = found
    return found


def compile_tree(key: str, ast: AST) -> Compiled:
    """Compile (and cache under ``key``) a syntax tree, e.g. one operand of a parsed union."""
    found = _COMPILED.get(key)
    if found is None:
        typed = _uses_types(ast)
        compiler = _Compiler(typed)
        found = Compiled(key, ast, compiler.compile(ast), compiler.compile_bool(ast), typed, "%context" in key)
        _COMPILED[key] = found
    return found


def parse_tree(expression: str, *, search: bool = False) -> AST:
    """The syntax tree of ``expression``: shipped pre-parsed for the R4 invariants and (``search``)
    the R4 SearchParameter expressions, parsed now otherwise."""
    shipped = model.fhirpath_tree(expression, search=search)
    return shipped if shipped is not None else parse_fhirpath(expression)


def evaluate_invariant(expression: str, node: Any, env: Env) -> bool | None:
    """True for ``[true]``, False for ``[false]``, None for an empty result (not violated).

    A single non-Boolean item counts as True (FHIRPath singleton evaluation); several items raise
    EvaluationError.
    """
    found = _COMPILED.get(expression)
    return (found if found is not None else compile_expression(expression)).test(node, env)


def iter_constraints() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(type name, element path, constraint) for every invariant in the R4 model."""
    for type_name in model._types():
        for path, element in model.type_model(type_name).elements.items():
            for constraint in element.raw.get("constraints", ()):
                yield type_name, path, constraint


def compile_all(expressions: Iterable[str]) -> dict[str, Compiled | UnsupportedExpression]:
    """Compile many expressions; failures are returned, not raised."""
    out: dict[str, Compiled | UnsupportedExpression] = {}
    for text in expressions:
        try:
            out[text] = compile_expression(text)
        except UnsupportedExpression as exc:
            out[text] = exc
    return out
