"""Finding and reading FHIR input: files, folders, NDJSON, stdin; JSON or XML detected from content.

Used by the ``spfhir`` command line. :func:`discover` turns the paths given on the command line into
:class:`Entry` objects (folders are searched recursively for ``*.json``, ``*.xml`` and ``*.ndjson``);
:func:`read_entry` reads one entry and yields a :class:`Source` per resource: one for a JSON or XML
file, one per non-blank line of NDJSON (https://hl7.org/fhir/R4/nd-json.html), labelled
``file:line``. A problem reading an input is never raised: it comes back as ``Source.error``, one
readable line such as ``not valid JSON: Expecting value at line 1 column 1``, so that the other
inputs are still read.

The format is detected from the content: when the first byte that is not whitespace (after a
UTF-8 byte order mark) is ``<`` the input is XML (https://hl7.org/fhir/R4/xml.html), otherwise JSON
(https://hl7.org/fhir/R4/json.html). The file extension is only a hint, used to word messages and to
recognise NDJSON. Files larger than the size limit (100 MB by default) are refused before they are
read.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from adapter.errors import AdapterError, InputTooLargeError, ParseError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EXTENSIONS",
    "STDIN",
    "Entry",
    "Source",
    "detect_format",
    "discover",
    "iter_sources",
    "load",
    "parse",
    "read_bytes",
    "read_entry",
]

#: Largest input read, per file (and for stdin), in bytes.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024

#: File name endings picked up when searching a folder (compared case-insensitively).
EXTENSIONS = (".json", ".xml", ".ndjson")

#: The path that stands for standard input.
STDIN = "-"
STDIN_LABEL = "<stdin>"

Format = Literal["json", "xml"]

_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Source:
    """One input resource: either parsed (``resource``) or the reason it could not be (``error``).

    ``error_code`` is the OperationOutcome issue type of the error (https://hl7.org/fhir/R4/valueset-issue-type.html):
    ``structure`` for input that is not JSON/XML, ``security`` for unsafe XML, ``too-costly`` for input
    over a limit, ``not-found`` for a missing file, ``exception`` for other read failures.
    """

    label: str
    resource: dict[str, Any] | None
    error: str | None = None
    format: Format | None = None
    error_code: str | None = None
    #: Where in the resource the parser stopped, as FHIRPath, when it knows (e.g. ``Patient``).
    error_expression: str | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """One input to read: a file, standard input (``path`` is None), or a problem found while searching."""

    label: str
    path: Path | None
    error: str | None = None
    error_code: str | None = None

    @property
    def is_stdin(self) -> bool:
        return self.path is None and self.error is None


def _size_text(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB" if size >= 1024 * 1024 else f"{size} bytes"


def _limit_text(limit: int) -> str:
    mb = limit / (1024 * 1024)
    return f"{mb:g} MB" if limit >= 1024 * 1024 else f"{limit} bytes"


#: Files of a FHIR NPM package that are not resources; skipped when a folder is searched.
PACKAGE_FILES = frozenset({"package.json", ".index.json"})


def _os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


def discover(paths: Iterable[str]) -> list[Entry]:
    """Expand the command-line paths: ``-`` is stdin, a folder yields its matching files (recursively,
    sorted, symlinked folders not followed), a file is taken whatever its name. Problems (a missing
    path, a folder without inputs) become entries with an ``error``."""
    entries: list[Entry] = []
    for raw in paths:
        if raw == STDIN:
            entries.append(Entry(STDIN_LABEL, None))
            continue
        path = Path(raw)
        try:
            is_dir = path.is_dir()
            exists = is_dir or path.exists()
        except OSError as exc:  # e.g. a name too long
            entries.append(Entry(raw, None, _os_error(exc), "exception"))
            continue
        if not exists:
            entries.append(Entry(raw, None, "no such file or folder", "not-found"))
        elif is_dir:
            found = list(_walk(path))
            if not found:
                entries.append(Entry(raw, None, "folder has no .json, .xml or .ndjson files", "not-found"))
            entries.extend(found)
        else:
            entries.append(Entry(raw, path))
    return entries


def _walk(folder: Path) -> Iterator[Entry]:
    problems: list[OSError] = []
    found: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=problems.append):
        dirnames.sort()
        for name in sorted(filenames):
            # A FHIR package folder's manifest and index are not resources (NPM package layout).
            if name.lower().endswith(EXTENSIONS) and name not in PACKAGE_FILES:
                path = Path(dirpath, name)
                found.append(Entry(str(path), path))
    yield from found
    for exc in problems:
        label = str(exc.filename) if exc.filename else str(folder)
        yield Entry(label, None, f"cannot read folder: {_os_error(exc)}", "exception")


def read_bytes(path: Path | None, max_bytes: int = DEFAULT_MAX_BYTES, stdin: BinaryIO | None = None) -> bytes:
    """The bytes of a file (or of stdin when ``path`` is None), refusing more than ``max_bytes``.

    A regular file's size is checked before anything is read; stdin, pipes and devices are read up
    to one byte past the limit. Raises :class:`InputTooLargeError` or :class:`OSError`.
    """
    if path is None:
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read(max_bytes + 1)
    else:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise InputTooLargeError(f"file too large: {_size_text(size)}, over the {_limit_text(max_bytes)} limit")
            data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputTooLargeError(f"input too large: over the {_limit_text(max_bytes)} limit")
    return data


def detect_format(data: bytes) -> Format:
    """``xml`` when the first byte that is not whitespace (after a UTF-8 BOM) is ``<``, else ``json``."""
    start = len(_BOM) if data.startswith(_BOM) else 0
    for index in range(start, min(len(data), start + 4096)):
        byte = data[index]
        if byte not in _WHITESPACE:
            return "xml" if byte == 0x3C else "json"
    stripped = data[start:].lstrip(_WHITESPACE)
    return "xml" if stripped.startswith(b"<") else "json"


def parse(data: bytes, fmt: Format | None = None) -> dict[str, Any]:
    """Parse one FHIR resource (JSON or XML, detected unless ``fmt`` is given).

    Raises :class:`ParseError` (or another :class:`AdapterError`) when it is not a resource.
    """
    if not data.removeprefix(_BOM).strip(_WHITESPACE):
        raise ParseError("empty input: no JSON or XML content")
    fmt = fmt or detect_format(data)
    if fmt == "xml":
        from adapter.fhir import xml_format

        resource = xml_format.loads(data)
    else:
        from adapter.fhir import json_format

        resource = json_format.loads(data)
    if not isinstance(resource, dict):
        raise ParseError(f"not a FHIR resource: the JSON is {_json_kind(resource)}, not an object")
    return resource


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def load(path: str, max_bytes: int = DEFAULT_MAX_BYTES, stdin: BinaryIO | None = None) -> Source:
    """Read and parse exactly one resource from a file or ``-`` (stdin); NDJSON is not split.

    Errors come back in ``Source.error`` as for :func:`read_entry`.
    """
    entry = Entry(STDIN_LABEL, None) if path == STDIN else Entry(path, Path(path))
    data = _read(entry, max_bytes, stdin)
    if isinstance(data, Source):
        return data
    source = _parse_source(entry.label, data)
    if source.error is not None and source.format == "json" and _looks_like_ndjson(data):
        return Source(entry.label, None, "NDJSON with several resources: expected exactly one", "json", "structure")
    return source


def _read(entry: Entry, max_bytes: int, stdin: BinaryIO | None) -> bytes | Source:
    """The entry's bytes, or a :class:`Source` with the reason they cannot be had."""
    if entry.error is not None:
        return Source(entry.label, None, entry.error, error_code=entry.error_code or "exception")
    try:
        return read_bytes(entry.path, max_bytes, stdin)
    except AdapterError as exc:
        return Source(entry.label, None, exc.message, error_code=exc.issue_code)
    except IsADirectoryError:
        return Source(entry.label, None, "is a folder, not a file", error_code="exception")
    except FileNotFoundError:
        return Source(entry.label, None, "no such file or folder", error_code="not-found")
    except OSError as exc:
        return Source(entry.label, None, f"cannot read: {_os_error(exc).lower()}", error_code="exception")


def _parse_source(label: str, data: bytes, fmt: Format | None = None) -> Source:
    fmt = fmt or detect_format(data)
    try:
        return Source(label, parse(data, fmt), format=fmt)
    except AdapterError as exc:
        return Source(label, None, exc.message, fmt, exc.issue_code, exc.expression)
    except (UnicodeError, ValueError) as exc:  # a parser's own error that escaped its wrapping
        return Source(label, None, f"cannot parse {fmt.upper()}: {exc}", format=fmt, error_code="structure")
    except RecursionError:
        return Source(label, None, "nested too deeply", format=fmt, error_code="too-costly")


def read_entry(entry: Entry, max_bytes: int = DEFAULT_MAX_BYTES, stdin: BinaryIO | None = None) -> Iterator[Source]:
    """The sources of one entry: one for a JSON or XML document, one per line of NDJSON.

    NDJSON is recognised by the ``.ndjson`` extension, or (for any JSON input) by content that is
    not one JSON document but whose first line is a JSON object on its own.
    """
    data = _read(entry, max_bytes, stdin)
    if isinstance(data, Source):
        yield data
        return
    fmt = detect_format(data)
    if fmt == "json" and entry.path is not None and entry.path.suffix.lower() == ".ndjson":
        yield from _ndjson(entry.label, data)
        return
    source = _parse_source(entry.label, data, fmt)
    if source.error is not None and fmt == "json" and _looks_like_ndjson(data):
        yield from _ndjson(entry.label, data)
        return
    yield source


def _looks_like_ndjson(data: bytes) -> bool:
    """Several non-blank lines, and the first is a complete JSON object by itself."""
    lines: list[bytes] = []
    for line in io.BytesIO(data):
        if line.strip(_WHITESPACE):
            lines.append(line)
            if len(lines) == 2:
                break
    if len(lines) < 2:
        return False
    from adapter.fhir import json_format

    try:
        return isinstance(json_format.loads(lines[0].removeprefix(_BOM)), dict)
    except AdapterError:
        return False


def _ndjson(label: str, data: bytes) -> Iterator[Source]:
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    found = False
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip(_WHITESPACE):
            continue
        found = True
        yield _parse_source(f"{label}:{number}", line, "json")
    if not found:
        yield Source(label, None, "empty input: no NDJSON lines", format="json", error_code="structure")


def iter_sources(
    paths: Iterable[str], max_bytes: int = DEFAULT_MAX_BYTES, stdin: BinaryIO | None = None
) -> Iterator[Source]:
    """Every source of the given paths, in order (see :func:`discover` and :func:`read_entry`)."""
    for entry in discover(paths):
        yield from read_entry(entry, max_bytes, stdin)
