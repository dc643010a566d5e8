"""Input discovery and reading for the command line (adapter.fhir.sources)."""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from adapter.fhir import sources
from adapter.fhir.sources import Entry, Source, detect_format, discover, iter_sources, load, read_entry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female"}
BILLION_LAUGHS = (Path(__file__).parent / "data" / "xml" / "billion-laughs.xml").read_bytes()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def read_all(path: Path, **kwargs: object) -> list[Source]:
    return list(read_entry(Entry(str(path), path), **kwargs))  # type: ignore[arg-type]


# -- format detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"<Patient/>", "xml"),
        (b"  \r\n\t<?xml version='1.0'?><Patient/>", "xml"),
        (b"\xef\xbb\xbf<Patient/>", "xml"),
        (b"\xef\xbb\xbf  \n<Patient/>", "xml"),
        (b'{"resourceType": "Patient"}', "json"),
        (b'\n\n  {"a": "<b>"}', "json"),
        (b"garbage <not xml first>", "json"),
        (b"", "json"),
        (b" " * 5000 + b"<Patient/>", "xml"),
    ],
)
def test_detect_format_uses_first_non_whitespace_byte(data: bytes, expected: str) -> None:
    assert detect_format(data) == expected


def test_extension_is_only_a_hint(tmp_path: Path) -> None:
    xml_named_json = write(tmp_path / "patient.json", (EXAMPLES / "patient.xml").read_bytes())
    json_named_xml = write(tmp_path / "patient.xml", (EXAMPLES / "patient.json").read_bytes())
    [from_xml] = read_all(xml_named_json)
    [from_json] = read_all(json_named_xml)
    assert from_xml.error is None, from_xml.error
    assert from_json.error is None, from_json.error
    assert (from_xml.format, from_json.format) == ("xml", "json")
    assert from_xml.resource == from_json.resource


def test_xml_and_json_examples_parse_to_the_same_resource() -> None:
    from_xml = load(str(EXAMPLES / "patient.xml"))
    from_json = load(str(EXAMPLES / "patient.json"))
    assert from_xml.error is None and from_json.error is None
    assert from_xml.resource == from_json.resource
    assert from_json.resource is not None
    assert from_json.resource["identifier"][0]["value"] == "9990000018"


# -- discovery ---------------------------------------------------------------------------------------


def test_discover_folders_recursively_sorted_with_matching_extensions(tmp_path: Path) -> None:
    write(tmp_path / "b.json", "{}")
    write(tmp_path / "a" / "deep" / "x.XML", "<a/>")
    write(tmp_path / "a" / "lines.ndjson", "{}")
    write(tmp_path / "a" / "notes.txt", "not fhir")
    write(tmp_path / "c.json.bak", "{}")
    single = write(tmp_path / "other" / "explicit.txt", "{}")
    entries = discover([str(tmp_path), str(single)])
    labels = [Path(e.label).relative_to(tmp_path).as_posix() for e in entries]
    assert labels == [
        "b.json",
        "a/lines.ndjson",
        "a/deep/x.XML",
        "other/explicit.txt",
    ]
    assert all(e.error is None and e.path is not None for e in entries)


def test_discover_walks_subfolders_in_name_order(tmp_path: Path) -> None:
    for name in ["z.json", "m/a.json", "a/z.json", "a/a.json"]:
        write(tmp_path / name, "{}")
    labels = [Path(e.label).relative_to(tmp_path).as_posix() for e in discover([str(tmp_path)])]
    # Files of a folder first, then its subfolders in name order (os.walk, top-down, sorted).
    assert labels == ["z.json", "a/a.json", "a/z.json", "m/a.json"]


def test_discover_reports_missing_paths_and_empty_folders_without_raising(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    entries = discover([str(tmp_path / "missing.json"), str(tmp_path / "empty"), "-"])
    assert [e.error for e in entries] == [
        "no such file or folder",
        "folder has no .json, .xml or .ndjson files",
        None,
    ]
    assert entries[2].is_stdin and entries[2].label == "<stdin>"
    [missing] = read_entry(entries[0])
    assert missing.resource is None and missing.error == "no such file or folder"
    assert missing.error_code == "not-found"


# -- reading -----------------------------------------------------------------------------------------


def test_json_file_is_parsed_with_exact_decimals(tmp_path: Path) -> None:
    path = write(tmp_path / "obs.json", '{"resourceType": "Observation", "valueQuantity": {"value": 0.40}}')
    [source] = read_all(path)
    assert source == Source(str(path), source.resource, None, "json")
    assert source.resource is not None
    assert str(source.resource["valueQuantity"]["value"]) == "0.40"
    assert isinstance(source.resource["valueQuantity"]["value"], Decimal)


def test_truncated_json_gives_a_readable_error(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.json", '{"resourceType": "Patient", "id": "p1", "name": [{"family": "Sm')
    [source] = read_all(path)
    assert source.resource is None
    assert source.error is not None and source.error.startswith("not valid JSON: ")
    assert "line 1 column" in source.error
    assert source.error_code == "structure"


def test_not_json_at_all(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", "hello")
    [source] = read_all(path)
    assert source.error == "not valid JSON: Expecting value at line 1 column 1"


def test_non_utf8_file_gives_encoding_error(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.json", '{"resourceType": "Patient", "name": [{"family": "Zoë"}]}'.encode("latin-1"))
    [source] = read_all(path)
    assert source.resource is None
    assert source.error is not None and source.error.startswith("not UTF-8: byte 0xeb")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps(PATIENT).encode())
    [source] = read_all(path)
    assert source.error is None
    assert source.resource == PATIENT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty input: no JSON or XML content"),
        (b" \n\t ", "empty input: no JSON or XML content"),
        (b"\xef\xbb\xbf\n", "empty input: no JSON or XML content"),
        (b"[1, 2]", "not a FHIR resource: the JSON is an array, not an object"),
        (b'"Patient"', "not a FHIR resource: the JSON is a string, not an object"),
        (b"null", "not a FHIR resource: the JSON is null, not an object"),
    ],
)
def test_input_that_is_not_a_resource(tmp_path: Path, content: bytes, message: str) -> None:
    [source] = read_all(write(tmp_path / "x.json", content))
    assert (source.resource, source.error) == (None, message)


def test_size_limit_is_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: 200 MB of nothing, instantly
    start = time.perf_counter()
    [source] = read_all(path)
    assert time.perf_counter() - start < 0.5
    assert source.resource is None
    # The size in the message comes from stat(): the file was refused, not read.
    assert source.error == "file too large: 200.0 MB, over the 100 MB limit"
    assert source.error_code == "too-costly"


def test_size_limit_boundary(tmp_path: Path) -> None:
    data = json.dumps(PATIENT).encode()
    path = write(tmp_path / "p.json", data)
    [at_limit] = read_all(path, max_bytes=len(data))
    [over] = read_all(path, max_bytes=len(data) - 1)
    assert at_limit.resource == PATIENT
    assert over.resource is None and over.error is not None and "too large" in over.error


def test_stdin_is_read_with_the_limit() -> None:
    data = json.dumps(PATIENT).encode()
    [source] = read_entry(Entry("<stdin>", None), stdin=io.BytesIO(data))
    assert (source.label, source.resource) == ("<stdin>", PATIENT)
    [over] = read_entry(Entry("<stdin>", None), max_bytes=10, stdin=io.BytesIO(data))
    assert over.error == "input too large: over the 10 bytes limit"


def test_load_reads_stdin_for_dash() -> None:
    source = load("-", stdin=io.BytesIO((EXAMPLES / "patient.xml").read_bytes()))
    assert source.format == "xml"
    assert source.resource is not None and source.resource["resourceType"] == "Patient"


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    start = time.perf_counter()
    [source] = read_all(write(tmp_path / "lol.xml", BILLION_LAUGHS))
    assert time.perf_counter() - start < 2
    assert source.resource is None
    assert source.error is not None and "\n" not in source.error
    assert source.error_code == "security"


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path: Path) -> None:
    [source] = read_all(write(tmp_path / "deep.json", '{"a":' * 100_000 + "1" + "}" * 100_000))
    assert source.resource is None
    assert source.error_code == "too-costly"


# -- NDJSON ------------------------------------------------------------------------------------------


def test_ndjson_lines_are_separate_inputs_labelled_by_line(tmp_path: Path) -> None:
    lines = [
        json.dumps(PATIENT),
        "",
        json.dumps({"resourceType": "Organization", "id": "o1"}),
        '{"resourceType": "Patient", "id": ',
        "   ",
        json.dumps({"resourceType": "Patient", "id": "p2"}),
    ]
    path = write(tmp_path / "bulk.ndjson", "\n".join(lines) + "\n")
    found = read_all(path)
    assert [s.label for s in found] == [f"{path}:1", f"{path}:3", f"{path}:4", f"{path}:6"]
    assert [s.resource["id"] if s.resource else None for s in found] == ["p1", "o1", None, "p2"]
    assert found[2].error is not None and found[2].error.startswith("not valid JSON")


def test_ndjson_with_crlf_and_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "b.ndjson", b"\xef\xbb\xbf" + b'{"resourceType":"Patient"}\r\n{"resourceType":"Group"}\r\n')
    assert [s.resource for s in read_all(path)] == [{"resourceType": "Patient"}, {"resourceType": "Group"}]


def test_ndjson_content_in_a_json_file_is_split(tmp_path: Path) -> None:
    path = write(tmp_path / "export.json", json.dumps(PATIENT) + "\n" + json.dumps(PATIENT) + "\n")
    found = read_all(path)
    assert [s.label for s in found] == [f"{path}:1", f"{path}:2"]
    assert all(s.resource == PATIENT for s in found)


def test_a_pretty_printed_json_file_is_not_mistaken_for_ndjson(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", json.dumps(PATIENT, indent=2) + "\n")
    [source] = read_all(path)
    assert (source.label, source.resource) == (str(path), PATIENT)
    # ... nor a broken one, whose first line is not a complete object.
    broken = write(tmp_path / "broken.json", json.dumps(PATIENT, indent=2)[:-3])
    [source] = read_all(broken)
    assert source.label == str(broken) and source.error is not None


def test_empty_ndjson_file(tmp_path: Path) -> None:
    [source] = read_all(write(tmp_path / "empty.ndjson", "\n\n"))
    assert source.error == "empty input: no NDJSON lines"


def test_iter_sources_keeps_going_after_problems(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", json.dumps(PATIENT))
    bad = write(tmp_path / "bad.json", "{")
    found = list(iter_sources([str(bad), str(tmp_path / "nope.json"), str(good)]))
    assert [s.resource is not None for s in found] == [False, False, True]
    assert found[2].label == str(good)


def test_default_limit_is_100_mb() -> None:
    assert sources.DEFAULT_MAX_BYTES == 100 * 1024 * 1024
