"""Source records: read CSV, JSON, NDJSON or XML one record at a time, then check and type each
record against its spec's fields.

Readers stream: CSV and NDJSON line by line, XML element by element (lxml ``iterparse``, hardened:
no DTD, no entities, no network), so memory stays bounded whatever the input size. A JSON document
(an array of records, or an object holding one under the spec's ``source.record`` key) is read
whole. CSV encodings: UTF-8 with or without a byte order mark, else Windows-1252 (what Excel writes
on Windows), detected from the first 64 KiB unless given.

:func:`extract` turns one raw record into typed values (dates as FHIR dates, booleans, integers,
Decimals, checked NHS numbers) and says which fields it filled with defaults and which source
fields it does not know; a value that breaks the spec is a :class:`MappingError` naming the record
and the field.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import IO, Any, cast
from zoneinfo import ZoneInfo

import orjson
from lxml import etree
from nhs_number.validate import is_valid as nhs_number_is_valid

from adapter.errors import ParseError, UnsafeXmlError
from adapter.fhir import json_format
from adapter.mapping.base import MappingError
from adapter.mapping.spec import FieldSpec, MappingSpec, SourceFormat

__all__ = ["RawRecord", "Record", "detect_format", "extract", "read_records"]

# Local times in English exports are UK civil time; FHIR dateTime with a time needs an offset
# (https://hl7.org/fhir/R4/datatypes.html#dateTime).
_LONDON = ZoneInfo("Europe/London")
_ODS = re.compile(r"[A-Z0-9]{3,10}")
_NHS_NUMBER_SEPARATORS = re.compile(r"[\s-]")
_SAMPLE = 65536


def _normal(name: str) -> str:
    """A header name as compared with field names and aliases: case, spaces and punctuation ignored."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(slots=True)
class RawRecord:
    """One record as read: its number (1-based; CSV: the data row), and its content."""

    number: int
    data: Any
    #: Source fields (CSV columns) the spec does not declare and that hold a value.
    extra: list[str] = field(default_factory=list)
    #: Why the record cannot be taken as read (a CSV row with the wrong number of cells).
    error: str | None = None


@dataclass(slots=True)
class Record:
    """One record checked against the spec: typed values by field name (groups: lists of dicts)."""

    number: int
    values: dict[str, Any]
    unused: list[str]
    defaults: list[str]


def detect_format(name: str, sample: bytes) -> SourceFormat:
    """The format of an input from its file name, else from its first bytes."""
    lower = name.lower()
    for suffix, fmt in ((".ndjson", "ndjson"), (".jsonl", "ndjson"), (".json", "json"), (".xml", "xml")):
        if lower.endswith(suffix):
            return fmt  # type: ignore[return-value]
    if lower.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    head = sample.lstrip(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"<"):
        return "xml"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        first = head.split(b"\n", 1)[0].strip()
        try:
            orjson.loads(first)
            return "ndjson"
        except orjson.JSONDecodeError:
            return "json"
    return "csv"


def _encoding(sample: bytes, given: str) -> str:
    if given != "auto":
        return given
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    try:
        # A multi-byte character may be cut at the end of the sample.
        sample.decode("utf-8") if len(sample) < _SAMPLE else sample[:-4].decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "cp1252"


def read_records(
    spec: MappingSpec,
    stream: IO[bytes],
    *,
    format: SourceFormat | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    name: str = "-",
) -> Iterator[RawRecord]:
    """The records of ``stream`` (a binary file), one at a time."""
    # A buffer the size of the sample, so that peek() sees all of it (a file's own buffer is 4-8 KiB).
    buffered = io.BufferedReader(cast(io.RawIOBase, stream), buffer_size=_SAMPLE)
    sample = buffered.peek(_SAMPLE)[:_SAMPLE]
    fmt = format or detect_format(name, sample)
    if fmt == "csv":
        yield from _csv(spec, buffered, _encoding(sample, encoding or spec.encoding), delimiter or spec.delimiter)
    elif fmt == "ndjson":
        yield from _ndjson(buffered)
    elif fmt == "json":
        yield from _json(spec, buffered)
    else:
        yield from _xml(spec, buffered, sample)


def _csv(spec: MappingSpec, stream: IO[bytes], encoding: str, delimiter: str) -> Iterator[RawRecord]:
    text = io.TextIOWrapper(stream, encoding=encoding, newline="")
    try:
        header_line = text.readline()
        if delimiter == "auto":
            try:
                delimiter = csv.Sniffer().sniff(header_line, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        header = next(csv.reader([header_line], delimiter=delimiter), [])
        names: dict[str, str] = {}
        for spec_field in spec.fields:
            for alias in (spec_field.name, *spec_field.aliases):
                names.setdefault(_normal(alias), spec_field.name)
        columns = [names.get(_normal(column)) for column in header]
        if not any(columns):
            raise ParseError(f"the CSV header names none of the fields of mapping {spec.name!r}", expression="header")
        reader = csv.reader(text, delimiter=delimiter)
        for number, row in enumerate(reader, start=1):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                # An unquoted delimiter in a value shifts every later cell: refuse the row rather
                # than map the wrong cells (RFC 4180 section 2: each line has the same fields).
                message = f"the row has {len(row)} cells and the header {len(header)} (an unquoted {delimiter!r}?)"
                yield RawRecord(number, None, error=message)
                continue
            data: dict[str, str] = {}
            extra = []
            clash = None
            for index, cell in enumerate(row):
                target = columns[index]
                if target is None:
                    if cell.strip():
                        extra.append(header[index])
                elif cell.strip():
                    if data.get(target, cell).strip() != cell.strip():
                        clash = f"two columns give {target}: {data[target]!r} and {cell!r}"
                    data.setdefault(target, cell)
            yield RawRecord(number, data, extra, clash)
    except UnicodeDecodeError as exc:
        raise ParseError(f"the CSV is not valid {encoding} (pass --encoding): {exc.reason}") from exc
    except csv.Error as exc:
        raise ParseError(f"the CSV cannot be read: {exc}") from exc
    finally:
        # Leave the caller's stream open (it closes it); it may be closed already.
        with contextlib.suppress(ValueError):
            text.detach()


def _ndjson(stream: IO[bytes]) -> Iterator[RawRecord]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            # FHIR JSON rules: decimals kept as written (64.20 stays 64.20), as Decimal.
            data = json_format.loads(line)
        except ParseError as exc:
            raise ParseError(f"line {number}: {exc.message}", expression=f"record[{number}]") from exc
        yield RawRecord(number, data)


def _json(spec: MappingSpec, stream: IO[bytes]) -> Iterator[RawRecord]:
    document = json_format.loads(stream.read())
    if isinstance(document, dict) and spec.record and isinstance(document.get(spec.record), list):
        document = document[spec.record]
    records = document if isinstance(document, list) else [document]
    for number, data in enumerate(records, start=1):
        yield RawRecord(number, data)


def _xml(spec: MappingSpec, stream: IO[bytes], sample: bytes) -> Iterator[RawRecord]:
    # Hardened as the FHIR XML codec is: a document type declaration is refused outright (checked
    # on the parsed document, whatever its encoding), and the parser resolves no entities and
    # fetches nothing (https://cwe.mitre.org/data/definitions/776.html). Records match by local
    # name, so a namespaced export is read too.
    tag = "{*}" + (spec.record or "record").lstrip("/")
    events = etree.iterparse(
        stream,
        events=("start", "end"),
        tag=tag,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )
    number = 0
    checked = False
    try:
        for event, element in events:
            if not checked:
                checked = True
                docinfo = element.getroottree().docinfo
                if docinfo.doctype or docinfo.internalDTD is not None:
                    raise UnsafeXmlError("the XML has a document type declaration; DTDs and entities are not accepted")
            if event == "start":
                continue
            number += 1
            # A copy of the record, so it stays whole after the reader moves on (and frees the
            # document's records as it goes: memory stays bounded).
            record = copy.deepcopy(element)
            element.clear()
            while element.getprevious() is not None:
                del element.getparent()[0]
            yield RawRecord(number, record)
    except etree.XMLSyntaxError as exc:
        raise ParseError(f"not well-formed XML: {exc}", expression=f"record[{number + 1}]") from exc


# --------------------------------------------------------------------------------------------
# Checking and typing one record
# --------------------------------------------------------------------------------------------


def _json_values(data: dict[str, Any], spec_field: FieldSpec) -> list[Any]:
    # Most values are found under the field's own path: the aliases are tried only then.
    value = _json_value(data, spec_field.path or spec_field.name)
    if value is None:
        for alias in spec_field.aliases:
            value = _json_value(data, alias)
            if value is not None:
                break
        else:
            return []
    return value if isinstance(value, list) else [value]


def _json_value(data: dict[str, Any], path: str) -> Any:
    if "." not in path:
        return data.get(path)  # most paths are one key: no split
    value: Any = data
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _xml_values(element: Any, spec_field: FieldSpec) -> list[Any]:
    if spec_field.path:
        nodes = element.xpath(spec_field.path)
    else:
        # A child element named like the field, in any namespace.
        nodes = element.xpath("*[local-name() = $name]", name=spec_field.name)
    values: list[Any] = []
    for node in nodes if isinstance(nodes, list) else [nodes]:
        if spec_field.type == "group":
            values.append(node)
        elif isinstance(node, str):
            values.append(str(node))
        elif node is not None:
            values.append("".join(node.itertext()))
    return values


def _raw_values(data: Any, spec_field: FieldSpec) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, dict):
        values = _json_values(data, spec_field)
    elif isinstance(data, etree._Element):
        values = _xml_values(data, spec_field)
    else:
        raise MappingError(f"expected an object with fields, found {type(data).__name__}")
    if spec_field.repeats and spec_field.type != "group":
        # "Loneliness;Low mood" in one CSV cell or XML element is two values.
        return [part for value in values for part in str(value).split(spec_field.separator) if part.strip()]
    return values


def _fail(message: str, number: int, name: str) -> MappingError:
    return MappingError(message, record=number, field=name)


def convert(spec: MappingSpec, spec_field: FieldSpec, raw: Any, number: int, name: str) -> Any:
    """One source value typed as its field says, or :class:`MappingError`."""
    if isinstance(raw, bool):
        raw = "true" if raw else "false"
    text = str(raw).strip()
    if spec_field.case == "upper":
        text = text.upper()
    elif spec_field.case == "lower":
        text = text.lower()
    kind = spec_field.type
    shown = text if len(text) <= 40 else text[:37] + "..."
    if spec_field.pattern is not None and not spec_field.pattern.fullmatch(text):
        raise _fail(f"{shown!r} does not have the expected form", number, name)
    if spec_field.allowed and text not in spec_field.allowed:
        raise _fail(f"{shown!r} is not one of {', '.join(spec_field.allowed)}", number, name)
    if spec_field.lookup is not None:
        canonical = spec.lookups[spec_field.lookup].canonical(text)
        if canonical is None:
            known = ", ".join(spec.lookups[spec_field.lookup].canonical_sources)
            raise _fail(f"{shown!r} is not a known value (known: {known})", number, name)
        # Aliases (F, Female) stand for one value: records are compared and written back canonically.
        text = canonical
    if kind in ("string", "code"):
        return text
    if kind == "nhs-number":
        digits = _NHS_NUMBER_SEPARATORS.sub("", text)
        if not (digits.isdigit() and len(digits) == 10 and nhs_number_is_valid(digits)):
            raise _fail(f"{shown!r} is not a valid NHS number (10 digits, Modulus 11 check digit)", number, name)
        return digits
    if kind == "ods-code":
        code = text.upper()
        if not _ODS.fullmatch(code):
            raise _fail(f"{shown!r} is not an ODS code (3-10 letters and digits)", number, name)
        return code
    if kind == "boolean":
        if text.lower() in spec_field.true_values:
            return True
        if text.lower() in spec_field.false_values:
            return False
        raise _fail(
            f"{shown!r} is not yes/no ({', '.join(spec_field.true_values + spec_field.false_values)})", number, name
        )
    if kind in ("integer", "decimal"):
        try:
            number_value: Decimal | int = int(text) if kind == "integer" else Decimal(text)
        except (ValueError, InvalidOperation):
            raise _fail(f"{shown!r} is not {'an integer' if kind == 'integer' else 'a number'}", number, name) from None
        if isinstance(number_value, Decimal) and not number_value.is_finite():
            raise _fail(f"{shown!r} is not a number", number, name)
        if spec_field.minimum is not None and number_value < spec_field.minimum:
            raise _fail(f"{text} is below the minimum {spec_field.minimum}", number, name)
        if spec_field.maximum is not None and number_value > spec_field.maximum:
            raise _fail(f"{text} is above the maximum {spec_field.maximum}", number, name)
        return number_value
    # date, datetime
    for fmt in spec_field.formats:
        moment = _strptime(text, fmt)
        if moment is None:
            continue
        if kind == "date":
            return moment.date().isoformat()
        if moment.tzinfo is None:
            local = moment.replace(tzinfo=_LONDON)
            # The hour the clocks skip in March never happened in UK civil time: refuse it rather
            # than store another instant. (An hour that happens twice in October is taken as BST,
            # its first occurrence.)
            if local.astimezone(UTC).astimezone(_LONDON).replace(tzinfo=None) != moment:
                raise _fail(f"{shown!r} does not exist in UK time (the clocks went forward)", number, name)
            moment = local
        return moment.isoformat()
    raise _fail(f"{shown!r} is not a date in the form {' or '.join(spec_field.formats)}", number, name)


#: Values :func:`convert` gave, by (id of the field, source text), with the spec and the field the
#: ids are of: an export repeats its codes, dates and organisations record after record.
_CONVERTED: dict[tuple[int, str], tuple[MappingSpec, FieldSpec, Any]] = {}
_CONVERTED_MAX = 20_000
#: Kinds whose conversion is worth remembering (not free text or NHS numbers: mostly different in
#: every record).
_REMEMBERED = frozenset(("code", "date", "datetime", "boolean", "ods-code", "integer", "decimal"))
#: Longer source text is converted every time: the cache's size stays bounded in bytes too.
_REMEMBERED_LENGTH = 64


def _converted(spec: MappingSpec, spec_field: FieldSpec, raw: Any, number: int, name: str) -> Any:
    """:func:`convert`, remembered (bounded) for source text of the kinds above. Only values are
    remembered (immutable: strings, booleans, numbers); a value that breaks the spec is refused
    again each time, naming its record."""
    if raw.__class__ is not str or len(raw) > _REMEMBERED_LENGTH or spec_field.type not in _REMEMBERED:
        return convert(spec, spec_field, raw, number, name)
    key = (id(spec_field), raw)
    known = _CONVERTED.get(key)
    if known is not None and known[0] is spec and known[1] is spec_field:
        return known[2]
    value = convert(spec, spec_field, raw, number, name)
    if len(_CONVERTED) >= _CONVERTED_MAX:
        _CONVERTED.clear()
    _CONVERTED[key] = (spec, spec_field, value)
    return value


@lru_cache(maxsize=4096)
def _strptime(text: str, fmt: str) -> datetime | None:
    """``datetime.strptime``, or None when ``text`` is not in the form ``fmt``. Cached (bounded): an
    export repeats its dates (referral days, contact times), and strptime is slow."""
    try:
        return datetime.strptime(text, fmt)
    except ValueError:
        return None


def _field_values(
    spec: MappingSpec, spec_field: FieldSpec, data: Any, number: int, name: str, defaults: list[str]
) -> Any:
    if data.__class__ is dict and not spec_field.repeats and spec_field.type != "group":
        # The commonest case, a CSV cell or a JSON string: what the general case below gives for
        # it, without the lists it makes (a blank one with a default or required is left to it).
        value = _json_value(data, spec_field.path or spec_field.name)
        if value.__class__ is str:
            if value.strip():
                return _converted(spec, spec_field, value, number, name)
            if spec_field.default is None and not spec_field.required:
                return None  # a blank cell of an optional field (the rest of a sparse CSV)
    raws = [
        raw for raw in _raw_values(data, spec_field) if raw is not None and (not isinstance(raw, str) or raw.strip())
    ]
    if not raws and spec_field.default is not None:
        defaults.append(f"{name}={spec_field.default}")
        raws = [spec_field.default]
    if not raws:
        if spec_field.required:
            raise _fail("is required and has no value", number, name)
        return None
    if spec_field.type == "group":
        items = []
        for index, item in enumerate(raws):
            typed: dict[str, Any] = {}
            for sub in spec_field.fields:
                value = _field_values(spec, sub, item, number, f"{name}[{index}].{sub.name}", defaults)
                if value is not None:
                    typed[sub.name] = value
            items.append(typed)
        return items
    typed_values = [_converted(spec, spec_field, raw, number, name) for raw in raws]
    if spec_field.repeats:
        return typed_values
    if len(typed_values) > 1:
        raise _fail(f"has {len(typed_values)} values; the field does not repeat", number, name)
    return typed_values[0]


def extract(spec: MappingSpec, raw: RawRecord) -> Record:
    """``raw`` checked against the spec's fields, typed; :class:`MappingError` on the first fault."""
    if raw.error is not None:
        raise MappingError(raw.error, record=raw.number)
    if not isinstance(raw.data, dict | etree._Element):
        raise MappingError(f"the record is not an object with fields but {type(raw.data).__name__}", record=raw.number)
    values: dict[str, Any] = {}
    defaults: list[str] = []
    for spec_field in spec.fields:
        value = _field_values(spec, spec_field, raw.data, raw.number, spec_field.name, defaults)
        if value is not None:
            values[spec_field.name] = value
    unused = list(raw.extra)
    if isinstance(raw.data, dict) and not raw.extra:
        keys = spec.json_keys
        unused = [key for key, value in raw.data.items() if key not in keys and value not in (None, "", [], {})]
    elif isinstance(raw.data, etree._Element):
        declared = {spec_field.path or spec_field.name for spec_field in spec.fields}
        unused = list(
            dict.fromkeys(
                etree.QName(child).localname
                for child in raw.data
                if isinstance(child.tag, str)
                and etree.QName(child).localname not in declared
                and "".join(str(text) for text in child.itertext()).strip()
            )
        )
    return Record(raw.number, values, unused, defaults)
