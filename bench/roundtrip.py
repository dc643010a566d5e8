"""Round trip of every official R4 example: JSON -> XML -> JSON, with timings.

For each file: ``json_format.loads`` -> ``xml_format.dumps`` -> ``xml_format.loads``, compared with
the parsed original. Decimals compare by their exact text (``0.40`` is not ``0.4``); a narrative
``div`` that differs as a string but is the same XHTML after C14N counts as equivalent, not exact.

Run from the project root: ``python -m bench.roundtrip`` (exit status 1 if any file fails).
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from lxml import etree

from adapter.errors import AdapterError
from adapter.fhir import json_format, xml_format
from bench.corpus import example_files, official_examples

__all__ = ["c14n", "compare", "main"]

_C14N_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def c14n(xhtml: str) -> bytes:
    """The canonical form (C14N 1.0, no comments) of an XHTML fragment."""
    return etree.tostring(etree.fromstring(xhtml.encode("utf-8"), _C14N_PARSER), method="c14n")


def compare(expected: Any, actual: Any, path: str = "") -> tuple[str, str] | None:
    """The first difference as ``(kind, reason)``; kind is ``div`` when only XHTML text differs.

    ``None`` when the two are exactly equal; ``("div", ...)`` when they differ only in narrative
    strings that are the same after C14N; ``("fail", ...)`` otherwise.
    """
    found: tuple[str, str] | None = None
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return "fail", f"{path}: expected an object, got {type(actual).__name__}"
        for key in expected.keys() | actual.keys():
            where = f"{path}.{key}" if path else key
            if key not in actual:
                return "fail", f"{where}: missing after round trip"
            if key not in expected:
                return "fail", f"{where}: added by round trip ({_short(actual[key])})"
            diff = compare(expected[key], actual[key], where)
            if diff is not None:
                if diff[0] == "fail":
                    return diff
                found = found or diff
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return "fail", f"{path}: expected {len(expected)} items, got {_short(actual)}"
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            diff = compare(left, right, f"{path}[{index}]")
            if diff is not None:
                if diff[0] == "fail":
                    return diff
                found = found or diff
        return found
    return _compare_scalar(expected, actual, path)


def _compare_scalar(expected: Any, actual: Any, path: str) -> tuple[str, str] | None:
    if isinstance(expected, bool) or isinstance(actual, bool):
        same = type(expected) is type(actual) and expected == actual
    elif isinstance(expected, Decimal | int) and isinstance(actual, Decimal | int):
        # A decimal written 100 in JSON parses as int, from XML as Decimal("100"): same text.
        same = str(expected) == str(actual) and not (isinstance(expected, Decimal) and type(actual) is int)
    else:
        same = type(expected) is type(actual) and expected == actual
    if same:
        return None
    if path.rsplit(".", 1)[-1] == "div" and isinstance(expected, str) and isinstance(actual, str):
        try:
            if c14n(expected) == c14n(actual):
                return "div", f"{path}: XHTML equal after C14N, not as a string: {_first_difference(expected, actual)}"
        except etree.XMLSyntaxError as exc:
            return "fail", f"{path}: XHTML does not parse: {exc}"
    return "fail", f"{path}: expected {_short(expected)}, got {_short(actual)}"


def _first_difference(expected: str, actual: str) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), min(len(expected), len(actual))
    )
    start = max(0, at - 15)
    return f"{expected[start : at + 15]!r} became {actual[start : at + 15]!r}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def main() -> int:
    folder = official_examples()
    if folder is None:
        print("official R4 examples not available (npm pack hl7.fhir.r4.examples@4.0.1 failed)")
        return 2
    files = example_files(folder)
    parsed: list[tuple[Path, Any]] = [(path, json_format.loads(path.read_bytes())) for path in files]
    failures: list[tuple[str, str]] = []
    div_only: list[tuple[str, str]] = []
    exact = 0
    to_xml = to_json = 0.0
    for path, resource in parsed:
        try:
            start = time.perf_counter()
            xml = xml_format.dumps(resource)
            middle = time.perf_counter()
            back = xml_format.loads(xml)
            to_json += time.perf_counter() - middle
            to_xml += middle - start
        except AdapterError as exc:
            failures.append((path.name, f"{type(exc).__name__}: {exc}"))
            continue
        diff = compare(resource, back)
        if diff is None:
            exact += 1
        elif diff[0] == "div":
            div_only.append((path.name, diff[1]))
        else:
            failures.append((path.name, diff[1]))
    count = len(parsed)
    print(f"official R4 examples: {count} files from {folder}")
    print(f"exact round trip:     {exact}")
    print(f"equivalent (only narrative XHTML differs as a string, equal after C14N): {len(div_only)}")
    for name, reason in div_only:
        print(f"  ~ {name}: {reason}")
    print(f"failed:               {len(failures)}")
    for name, reason in failures:
        print(f"  x {name}: {reason}")
    print(f"JSON -> XML: {to_xml:.2f} s, {count / to_xml:,.0f} files/s")
    print(f"XML -> JSON: {to_json:.2f} s, {count / to_json:,.0f} files/s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
