"""Parse a FHIR search (the query string, or the form body of ``POST [type]/_search``) into a
:class:`SearchQuery` that the stores turn into SQL.

Follows https://hl7.org/fhir/R4/search.html: parameters are ANDed, comma-separated values ORed
(``\\,`` ``\\|`` ``\\$`` ``\\\\`` escape); prefixes ``eq ne gt lt ge le sa eb ap`` on dates, numbers
and quantities; modifiers ``:missing`` (all types), ``:exact`` and ``:contains`` (string), a type
(``subject:Patient``) on references; chains (``patient.identifier=...``,
``subject:Patient.identifier=...``), any depth. Result parameters: ``_count``, ``_sort``,
``_include``, ``_revinclude`` (``:iterate`` is taken as one level), ``_summary`` (``count`` and
``false``), ``_elements``, ``_total``.

Parameters that are unknown, or known but not supported (composite and special parameters,
unsupported modifiers, ``_summary=true``...), raise :class:`~adapter.errors.InputError` under
``Prefer: handling=strict``; under ``lenient`` (the default) they are left out and listed in
:attr:`SearchQuery.ignored`, for the Bundle's OperationOutcome entry. A value that cannot be read
(``date=tomorrow``) is an error either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Literal
from urllib.parse import unquote_plus

from adapter.errors import InputError
from adapter.search.index import date_range, normalise, parse_reference
from adapter.search.parameters import COLUMN_PARAMETERS, SearchParam, parameters_for

__all__ = [
    "MAX_COUNT",
    "Criterion",
    "DateValue",
    "Include",
    "NumberValue",
    "ReferenceValue",
    "SearchQuery",
    "SortKey",
    "StringValue",
    "TokenValue",
    "parse_search",
    "parse_token_condition",
    "split_values",
    "unescape",
]

#: Page size when the request names none, and the largest page we return.
DEFAULT_COUNT = 20
MAX_COUNT = 1000

Prefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"]
_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
# Accepted and handled outside the search itself (content negotiation, pretty printing).
_IGNORED = frozenset({"_format", "_pretty"})
_RESULT = frozenset({"_count", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total"})


@dataclass(frozen=True, slots=True)
class TokenValue:
    """``code``, ``system|code``, ``|code`` (no system) or ``system|`` (any code in the system).

    ``system`` is None for "any system" and "" for "no system"; ``code`` None for any code.
    """

    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class StringValue:
    text: str
    normalised: str


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """``Type/id``, a bare ``id`` (type from the modifier or any target), or an absolute URL."""

    type: str | None
    id: str | None
    url: str


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: Prefix
    low: str
    high: str


@dataclass(frozen=True, slots=True)
class NumberValue:
    """A number (or a quantity's number, with optional system and code) with the range its
    written precision implies (``100`` is 99.5 to 100.5)."""

    prefix: Prefix
    value: float
    low: float
    high: float
    system: str | None = None
    code: str | None = None


Value = TokenValue | StringValue | ReferenceValue | DateValue | NumberValue


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter of the search, its values ORed; a chained one carries the criterion its
    references' targets must meet (``chain``), for the target types in ``targets``."""

    type: str
    param: SearchParam
    modifier: str | None
    values: tuple[Value, ...]
    missing: bool | None = None
    targets: tuple[str, ...] = ()
    chain: tuple[Criterion, ...] = ()


@dataclass(frozen=True, slots=True)
class SortKey:
    param: SearchParam
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """``_include=Source:param[:Target]`` or ``_revinclude=Source:param[:Target]``."""

    source: str
    param: str
    target: str | None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    type: str
    criteria: tuple[Criterion, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = DEFAULT_COUNT
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    summary_count: bool = False
    elements: tuple[str, ...] | None = None
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: The (name, value) pairs it was parsed from: a saved result set keeps them for its later pages.
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def criteria_text(self) -> str:
        """The search's criteria as one line (``identifier=a|b&name=x``), e.g. to lock on."""
        kept = (pair for pair in sorted(self.pairs) if not pair[0].startswith("_") or pair[0] in COLUMN_PARAMETERS)
        return "&".join(f"{name}={value}" for name, value in kept)


def split_values(text: str) -> list[str]:
    """Split a parameter value on unescaped commas; the parts keep their other escapes
    (``\\|`` must still be told from ``|`` by the token parser), see :func:`unescape`."""
    if "\\" not in text:
        # Nothing escaped (nearly every value): str.split, not a loop over the characters, which
        # was most of the cost of parsing an $ingest record's If-None-Exist conditions.
        return text.split(",")
    parts: list[str] = []
    start = 0
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == ",":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def escape(text: str) -> str:
    """A value with the search's special characters escaped, the inverse of :func:`unescape`
    (https://hl7.org/fhir/R4/search.html#escaping)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


def unescape(text: str) -> str:
    """Undo the search escapes ``\\,`` ``\\|`` ``\\$`` ``\\\\`` (https://hl7.org/fhir/R4/search.html#escaping)."""
    if "\\" not in text:
        return text
    return re.sub(r"\\(.)", r"\1", text)


def _split_pipe(text: str) -> tuple[str | None, str]:
    """``system|code`` on the first unescaped ``|``, each part unescaped; (None, code) without one."""
    if "\\" not in text:
        system, bar, code = text.partition("|")
        return (system, code) if bar else (None, text)
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "|":
            return unescape(text[:i]), unescape(text[i + 1 :])
        i += 1
    return None, unescape(text)


def _prefixed(text: str) -> tuple[Prefix, str]:
    if len(text) > 2 and text[:2] in _PREFIXES and (text[2].isdigit() or text[2] == "-"):
        return text[:2], text[2:]  # type: ignore[return-value]
    return "eq", text


def _number(text: str, name: str) -> tuple[float, float, float]:
    """The value of a number and the range its precision implies (https://hl7.org/fhir/R4/search.html#number)."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        raise InputError(f"{name}: {text!r} is not a number", expression=name)
    exponent = number.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)
    return float(number), float(number - half), float(number + half)


class _Parser:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.ignored: list[str] = []

    def unsupported(self, name: str, why: str) -> None:
        if self.strict:
            raise InputError(f"search parameter {name!r}: {why}", expression=name)
        self.ignored.append(f"{name}: {why}")

    def criterion(self, type: str, name: str, raw: str) -> Criterion | None:
        """The criterion for ``name=raw`` on ``type``; None when it is left out (lenient)."""
        head, dot, rest = name.partition(".")
        code, _, modifier = head.partition(":")
        param = parameters_for(type).get(code)
        if param is None:
            self.unsupported(name, f"not a search parameter of {type}")
            return None
        if not param.supported:
            self.unsupported(name, f"{param.type} parameters are not supported")
            return None
        if dot:
            return self.chained(type, name, param, modifier or None, rest, raw)
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise InputError(f"{name}: :missing takes true or false, not {raw!r}", expression=name)
            return Criterion(type, param, "missing", (), missing=raw == "true")
        targets: tuple[str, ...] = ()
        if modifier:
            if param.type == "string" and modifier in ("exact", "contains"):
                pass
            elif param.type == "reference" and modifier in param.targets:
                targets = (modifier,)
            else:
                self.unsupported(name, f"modifier :{modifier} is not supported on {param.type} parameters")
                return None
        values = tuple(self.value(param, name, item, modifier) for item in split_values(raw))
        return Criterion(type, param, modifier or None, values, targets=targets)

    def chained(
        self, type: str, name: str, param: SearchParam, modifier: str | None, rest: str, raw: str
    ) -> Criterion | None:
        if param.type != "reference":
            self.unsupported(name, f"only reference parameters can be chained, {param.code} is a {param.type}")
            return None
        if modifier is not None and modifier not in param.targets:
            self.unsupported(name, f"{modifier} is not a target type of {param.code}")
            return None
        candidates = (modifier,) if modifier else param.targets
        chain: list[Criterion] = []
        for target in candidates:
            if rest.split(".", 1)[0].split(":", 1)[0] not in parameters_for(target):
                continue
            inner = _Parser(strict=True)
            try:
                found = inner.criterion(target, rest, raw)
            except InputError as exc:
                if "not a search parameter" in str(exc) or modifier is not None:
                    raise InputError(f"{name}: {exc}", expression=name) from exc
                continue
            if found is not None:
                chain.append(found)
        if not chain:
            self.unsupported(name, f"no target type of {param.code} has a search parameter {rest!r}")
            return None
        return Criterion(type, param, modifier, (), targets=tuple(c.type for c in chain), chain=tuple(chain))

    def value(self, param: SearchParam, name: str, raw: str, modifier: str) -> Value:
        kind = param.type
        text = unescape(raw)
        if param.code == "_id" or kind == "uri":
            return TokenValue(None, unescape(text))
        if kind == "token":
            system, code = _split_pipe(raw)
            return TokenValue(system, code or None) if system is not None else TokenValue(None, code)
        if kind == "string":
            return StringValue(text, normalise(text))
        if kind == "reference":
            ref_type, ref_id = parse_reference(text)
            if ref_type is None and re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", text):
                return ReferenceValue(None, text, text)
            if ref_type is not None and param.targets and ref_type not in param.targets and modifier == "":
                raise InputError(f"{name}: {ref_type} is not a target type of {param.code}", expression=name)
            return ReferenceValue(ref_type, ref_id, text)
        prefix, rest = _prefixed(text)
        if kind == "date":
            found = date_range(rest)
            if found is None:
                raise InputError(f"{name}: {text!r} is not a date such as 2026-11-23", expression=name)
            return DateValue(prefix, *found)
        if kind == "number":
            return NumberValue(prefix, *_number(rest, name))
        # quantity: number|system|code (https://hl7.org/fhir/R4/search.html#quantity)
        number, unit = _split_pipe(_prefixed(raw)[1])
        if number is None:
            number, unit = unit, ""
        system, code = _split_pipe(unit) if unit else ("", "")
        if system is None:
            system, code = "", code
        return NumberValue(prefix, *_number(number, name), system or None, code or None)


def _count(raw: str, warnings: list[str]) -> int:
    if not raw.isdecimal():
        raise InputError(f"_count: {raw!r} is not a whole number", expression="_count")
    count = int(raw)
    if count > MAX_COUNT:
        warnings.append(f"_count {raw} is more than the largest page ({MAX_COUNT}); pages hold {MAX_COUNT}")
        return MAX_COUNT
    return count


def _include(raw: str, name: str, type: str, reverse: bool) -> Include:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"{name}: {raw!r} is not Type:parameter or Type:parameter:TargetType", expression=name)
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    param = parameters_for(source).get(code)
    if param is None or param.type != "reference":
        raise InputError(f"{name}: {source} has no reference parameter {code!r}", expression=name)
    if target is not None and param.targets and target not in param.targets:
        raise InputError(f"{name}: {target} is not a target type of {source}:{code}", expression=name)
    if not reverse and source != type:
        raise InputError(f"{name}: {raw!r} does not start with the searched type {type}", expression=name)
    return Include(source, code, target)


def parse_search(type: str, pairs: list[tuple[str, str]], *, strict: bool = False) -> SearchQuery:
    """The search of ``type`` that the (name, value) pairs of a query string ask for."""
    parser = _Parser(strict)
    warnings: list[str] = []
    criteria: list[Criterion] = []
    sort: list[SortKey] = []
    count = DEFAULT_COUNT
    includes: list[Include] = []
    revincludes: list[Include] = []
    summary_count = False
    elements: tuple[str, ...] | None = None
    for name, raw in pairs:
        base = name.split(":", 1)[0]
        if base in _IGNORED:
            continue
        if base in _RESULT:
            if base == "_count":
                count = _count(raw, warnings)
            elif base == "_sort":
                for item in (s.strip() for s in raw.split(",")):
                    code = item.removeprefix("-")
                    param = parameters_for(type).get(code)
                    if param is None or not param.supported:
                        parser.unsupported(f"_sort={item}", f"{code!r} is not a supported search parameter of {type}")
                        continue
                    sort.append(SortKey(param, item.startswith("-")))
            elif base in ("_include", "_revinclude"):
                modifier = name.partition(":")[2]
                if modifier not in ("", "iterate", "recurse"):
                    raise InputError(f"{name}: unknown modifier :{modifier}", expression=name)
                target_list = includes if base == "_include" else revincludes
                target_list.append(_include(raw, name, type, reverse=base == "_revinclude"))
            elif base == "_summary":
                if raw == "count":
                    summary_count = True
                elif raw != "false":
                    parser.unsupported(f"_summary={raw}", "only _summary=count and _summary=false are supported")
            elif base == "_elements":
                elements = tuple(e.strip() for e in raw.split(",") if e.strip())
            elif base == "_total" and raw not in ("none", "estimate", "accurate"):
                raise InputError(f"_total: {raw!r} is not none, estimate or accurate", expression="_total")
            continue
        if name.startswith("_") and base not in parameters_for(type) and base not in COLUMN_PARAMETERS:
            parser.unsupported(name, "this search result parameter is not supported")
            continue
        found = parser.criterion(type, name, raw)
        if found is not None:
            criteria.append(found)
    return SearchQuery(
        type=type,
        criteria=tuple(criteria),
        sort=tuple(sort),
        count=count,
        includes=tuple(includes),
        revincludes=tuple(revincludes),
        summary_count=summary_count,
        elements=elements,
        ignored=tuple(parser.ignored),
        warnings=tuple(warnings),
        pairs=tuple(pairs),
    )


@cache
def _plain_tokens(type: str) -> dict[str, SearchParam]:
    """The supported token parameters of ``type`` that :func:`parse_token_condition` takes (not
    ``_id``, whose value is not split on ``|``, nor the other ``_`` ones)."""
    return {
        code: param
        for code, param in parameters_for(type).items()
        if param.type == "token" and param.supported and not code.startswith("_")
    }


def parse_token_condition(type: str, text: str) -> SearchQuery | None:
    """What a conditional create's criteria ``text`` (``identifier=system|code``, or several joined
    by ``&``) parse to, as ``adapter.api.context.full_condition`` parses them (the query string decoded,
    then :func:`parse_search`, strict), when every criterion is a token parameter of ``type``
    without modifier, chain, comma, backslash or leading ``_``; None for anything else, which then
    goes that full way (and fails there when it should).

    The conditions of ``$ingest`` are all of this form: this makes the same query in about half
    the time (most of what is left is building the query's objects) (#5)."""
    if not text or "?" in text:
        return None
    parameters = _plain_tokens(type)
    criteria: list[Criterion] = []
    pairs: list[tuple[str, str]] = []
    for part in text.split("&"):
        name, equals, raw = part.partition("=")
        param = parameters.get(name)
        if param is None or not equals:
            return None
        # As urllib.parse.parse_qsl decodes a value.
        value = unquote_plus(raw) if "%" in raw or "+" in raw else raw
        if "\\" in value or "," in value:
            return None
        system, bar, code = value.partition("|")
        token = TokenValue(system, code or None) if bar else TokenValue(None, value)
        criteria.append(Criterion(type, param, None, (token,)))
        pairs.append((name, value))
    return SearchQuery(type=type, criteria=tuple(criteria), pairs=tuple(pairs))
