"""The ``spfhir`` command line: validate (exit codes, inputs, reports) and convert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from adapter import cli
from adapter.fhir import json_format

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

runner = CliRunner()

VALID_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "sp-patient-2",
    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
    "gender": "female",
    "birthDate": "1990-01-31",
}
BAD_GENDER = {**VALID_PATIENT, "gender": "mail"}
BAD_DATE = {**VALID_PATIENT, "birthDate": "1990-13-01"}
UNKNOWN_ELEMENT = {**VALID_PATIENT, "foo": 1}


def billion_laughs() -> bytes:
    """The classic entity-expansion bomb: 10**9 "lol"s from a 1 kB document."""
    entities = ['<!ENTITY lol "lol">'] + [
        f'<!ENTITY lol{n} "{("&lol" + ("" if n == 2 else str(n - 1)) + ";") * 10}">' for n in range(2, 10)
    ]
    return (
        '<?xml version="1.0"?>\n<!DOCTYPE Patient [\n' + "\n".join(entities) + "\n]>\n"
        '<Patient xmlns="http://hl7.org/fhir"><id value="&lol9;"/></Patient>\n'
    ).encode()


def write(path: Path, data: bytes | str | dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        data = json.dumps(data, indent=2)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def run(*args: str | Path, input: bytes | str | None = None) -> Any:
    # A fixed width for the text table (pytest-xdist workers, CI runners set COLUMNS differently).
    return runner.invoke(cli.app, [str(a) for a in args], input=input, env={"COLUMNS": "200"})


def run_process(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real console-script entry point (adapter.cli:main) in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", "from adapter.cli import main; main()", *map(str, args)],
        cwd=ROOT,
        input=input,
        capture_output=True,
        timeout=60,
        check=False,
    )


def json_results(result: Any) -> list[dict[str, Any]]:
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- exit codes ------------------------------------------------------------------------------------


def test_valid_examples_exit_0() -> None:
    result = run("validate", EXAMPLES, "--format", "json")
    assert result.exit_code == 0, result.stdout + result.stderr
    files = {Path(item["file"]).name for item in json_results(result)}
    assert files == {"patient.json", "patient.xml", "organization.json", "servicerequest.json", "bundle.json"}
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("resource", "expression"),
    [(BAD_GENDER, "Patient.gender"), (BAD_DATE, "Patient.birthDate"), (UNKNOWN_ELEMENT, "Patient.foo")],
)
def test_invalid_resource_exits_1_with_the_expression(
    tmp_path: Path, resource: dict[str, Any], expression: str
) -> None:
    path = write(tmp_path / "bad.json", resource)
    result = run("validate", path, "--format", "json")
    assert result.exit_code == 1, result.stdout + result.stderr
    [item] = json_results(result)
    assert item["valid"] is False
    errors = [i for i in item["outcome"]["issue"] if i["severity"] == "error"]
    assert any(expression in i.get("expression", []) for i in errors), errors


def test_a_number_python_cannot_hold_is_one_readable_line_and_exit_2(tmp_path: Path) -> None:
    """An integer of 5,000 digits escaped the JSON parser as ValueError ("internal error")."""
    path = tmp_path / "big.json"
    path.write_text('{"resourceType": "Patient", "multipleBirthInteger": ' + "1" * 5000 + "}")
    result = run("validate", "--quiet", path)
    assert result.exit_code == 2
    assert error_lines(result.stderr) == [f"error: {path}: not valid JSON: a number has too many digits"]


def test_missing_file_exits_2_but_other_inputs_are_still_validated(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", VALID_PATIENT)
    bad = write(tmp_path / "bad.json", BAD_GENDER)
    result = run("validate", tmp_path / "missing.json", good, bad, "--format", "json")
    assert result.exit_code == 2
    assert error_lines(result.stderr) == [f"error: {tmp_path / 'missing.json'}: no such file or folder"]
    items = json_results(result)
    assert [(Path(i["file"]).name, i["valid"]) for i in items] == [
        ("missing.json", False),
        ("good.json", True),
        ("bad.json", False),
    ]
    assert items[0]["outcome"]["issue"][0]["severity"] == "fatal"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("validate").exit_code == 2
    assert run("validate", EXAMPLES / "patient.json", "--format", "yaml").exit_code == 2
    assert run("convert", EXAMPLES / "patient.json").exit_code == 2  # --to is required
    assert run("convert", EXAMPLES / "patient.json", "--to", "turtle").exit_code == 2


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("spfhir ")
    assert result.stdout.strip() != "spfhir"


# -- inputs ----------------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    write(folder / "patient.json", VALID_PATIENT)
    write(folder / "referrals" / "patient.xml", (EXAMPLES / "patient.xml").read_bytes())
    write(folder / "referrals" / "wrong-gender.json", BAD_GENDER)
    write(
        folder / "referrals" / "bulk" / "export.ndjson",
        "\n".join(json.dumps(r) for r in [VALID_PATIENT, BAD_DATE, VALID_PATIENT]) + "\n",
    )
    write(folder / "garbage.json", b"\x00\x9f\x92\x96 not fhir \xff")
    write(folder / "readme.txt", "ignored: not a FHIR file extension")
    return folder


def test_folder_is_searched_recursively_with_mixed_files(mixed_folder: Path) -> None:
    result = run("validate", mixed_folder, "--format", "json")
    assert result.exit_code == 2  # the garbage file cannot be read
    validity = {str(Path(i["file"]).relative_to(mixed_folder)): i["valid"] for i in json_results(result)}
    assert validity == {
        "patient.json": True,
        "garbage.json": False,
        "referrals/patient.xml": True,
        "referrals/wrong-gender.json": False,
        "referrals/bulk/export.ndjson:1": True,
        "referrals/bulk/export.ndjson:2": False,
        "referrals/bulk/export.ndjson:3": True,
    }
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {mixed_folder / 'garbage.json'}: not UTF-8")


def test_folder_without_the_garbage_file_exits_1(mixed_folder: Path) -> None:
    (mixed_folder / "garbage.json").unlink()
    result = run("validate", mixed_folder, "--quiet")
    assert result.exit_code == 1
    assert result.stderr == ""


def test_stdin_json_xml_and_ndjson() -> None:
    patient_json = (EXAMPLES / "patient.json").read_bytes()
    ok = run("validate", "-", "--format", "json", input=patient_json)
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    assert [i["file"] for i in json_results(ok)] == ["<stdin>"]

    xml = run("validate", "-", "--format", "json", input=(EXAMPLES / "patient.xml").read_bytes())
    assert xml.exit_code == 0, xml.stdout + xml.stderr

    bad = run("validate", "-", "--format", "json", input=json.dumps(BAD_GENDER))
    assert bad.exit_code == 1

    lines = json.dumps(VALID_PATIENT) + "\n" + json.dumps(BAD_DATE) + "\n"
    ndjson = run("validate", "-", "--format", "json", input=lines)
    assert ndjson.exit_code == 1
    assert [(i["file"], i["valid"]) for i in json_results(ndjson)] == [
        ("<stdin>:1", True),
        ("<stdin>:2", False),
    ]


def test_truncated_json_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.json", json.dumps(VALID_PATIENT)[:40])
    result = run("validate", path)
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {path}: not valid JSON: ")


def test_not_json_message_matches_the_documented_form(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", "not json")
    result = run("validate", path, "--quiet")
    assert error_lines(result.stderr) == [f"error: {path}: not valid JSON: Expecting value at line 1 column 1"]


def test_non_utf8_file_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(
        tmp_path / "latin1.json",
        json.dumps({**VALID_PATIENT, "name": [{"family": "Zoë"}]}, ensure_ascii=False).encode("latin-1"),
    )
    result = run("validate", path)
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {path}: not UTF-8: byte 0xeb")


def test_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    with huge.open("wb") as handle:
        handle.truncate(200 * 1024 * 1024)
    good = write(tmp_path / "good.json", VALID_PATIENT)
    result = run("validate", huge, good, "--format", "json")
    assert result.exit_code == 2
    assert error_lines(result.stderr) == [f"error: {huge}: file too large: 200.0 MB, over the 100 MB limit"]
    assert [i["valid"] for i in json_results(result)] == [False, True]


def test_billion_laughs_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path / "lol.xml", billion_laughs())
    done = run_process("validate", path)
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    [line] = error_lines(stderr)
    assert line.startswith(f"error: {path}: ")


def test_no_traceback_from_the_entry_point_for_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path / "garbage.xml", b"<Patient xmlns='http://hl7.org/fhir'><id value='x'/>")
    done = run_process("validate", path, tmp_path / "absent.json")
    assert done.returncode == 2
    lines = error_lines(done.stderr.decode())
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines


# -- reports ---------------------------------------------------------------------------------------


def test_json_report_shape_and_valid_matches_errors(mixed_folder: Path) -> None:
    result = run("validate", mixed_folder, "--format", "json")
    items = json_results(result)
    assert len(items) == 7
    for item in items:
        assert set(item) == {"file", "valid", "outcome"}
        outcome = item["outcome"]
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"], "an OperationOutcome has at least one issue"
        for issue in outcome["issue"]:
            assert issue["severity"] in {"fatal", "error", "warning", "information"}
            assert isinstance(issue["code"], str) and issue["code"]
        has_error = any(i["severity"] in ("error", "fatal") for i in outcome["issue"])
        assert item["valid"] is not has_error, item


def test_json_report_to_output_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", BAD_GENDER)
    report = tmp_path / "report.json"
    result = run("validate", bad, "--format", "json", "-o", report)
    assert result.exit_code == 1
    assert result.stdout == ""
    [item] = json.loads(report.read_text())
    assert item["valid"] is False


def test_junit_report(mixed_folder: Path, tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    result = run("validate", mixed_folder, "--format", "junit", "--output", report)
    assert result.exit_code == 2
    root = ET.parse(report).getroot()
    cases = root.findall(".//testcase")
    by_name = {str(Path(c.get("name", "")).relative_to(mixed_folder)): c for c in cases}
    assert len(cases) == len(by_name) == 7
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("7", "2", "1")

    failed = {name for name, c in by_name.items() if c.find("failure") is not None}
    errored = {name for name, c in by_name.items() if c.find("error") is not None}
    assert failed == {"referrals/wrong-gender.json", "referrals/bulk/export.ndjson:2"}
    assert errored == {"garbage.json"}
    failure = by_name["referrals/wrong-gender.json"].find("failure")
    assert failure is not None and failure.text is not None
    assert "Patient.gender" in failure.text and "mail" in failure.text
    date_failure = by_name["referrals/bulk/export.ndjson:2"].find("failure")
    assert date_failure is not None and "Patient.birthDate" in (date_failure.text or "")


def test_junit_report_parses_with_lxml(tmp_path: Path) -> None:
    from lxml import etree

    write(tmp_path / "a.json", VALID_PATIENT)
    write(tmp_path / "b.json", UNKNOWN_ELEMENT)
    result = run("validate", tmp_path, "--format", "junit")
    assert result.exit_code == 1
    root = etree.fromstring(result.stdout_bytes)
    assert len(root.findall(".//testcase")) == 2
    assert [c.get("name").endswith("b.json") for c in root.iterfind(".//testcase[failure]")] == [True]


def test_text_report_shows_table_with_expression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "good.json", VALID_PATIENT)
    write(tmp_path / "wrong.json", BAD_GENDER)
    monkeypatch.chdir(tmp_path)  # short labels, so that no cell wraps
    result = run("validate", ".")
    assert result.exit_code == 1
    out = result.stdout
    for heading in ("File", "Type", "Errors", "Warnings", "Issues"):
        assert heading in out
    assert "Patient.gender" in out
    assert "good.json" in out and "wrong.json" in out
    wrong_row = next(line for line in out.splitlines() if "wrong.json" in line)
    cells = [cell.strip() for cell in wrong_row.split("│")]
    assert cells[2:5] == ["Patient", "1", "1"], cells  # the warning: dom-6, no narrative
    good_row = next(line for line in out.splitlines() if "good.json" in line)
    assert [cell.strip() for cell in good_row.split("│")][2:6] == [
        "Patient",
        "0",
        "1",
        "warning Patient: dom-6: A resource should have narrative for robust management",
    ]
    assert out.rstrip().splitlines()[-1].startswith("2 inputs: 1 valid, 1 invalid (1 error")


def test_text_report_lists_unreadable_inputs(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", "{")
    result = run("validate", bad)
    assert result.exit_code == 2
    assert "unreadable" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == "1 input: 0 valid, 0 invalid, 1 unreadable (0 errors, 0 warnings)"


def test_quiet_prints_only_errors_and_summary(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", VALID_PATIENT)
    wrong = write(tmp_path / "wrong.json", {**BAD_GENDER, "birthDate": "1990-13-01"})
    result = run("validate", good, wrong, "--quiet")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("2 inputs: 1 valid, 1 invalid (")
    assert len(lines) >= 3
    for line in lines[:-1]:
        assert line.startswith(f"{wrong}: error: ")
    assert any("Patient.gender" in line for line in lines)
    assert any("Patient.birthDate" in line for line in lines)
    assert "good.json" not in result.stdout
    assert "│" not in result.stdout and "┃" not in result.stdout


def test_quiet_valid_input_prints_just_the_summary() -> None:
    result = run("validate", EXAMPLES / "patient.json", "-q")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["1 input: 1 valid, 0 invalid (0 errors, 0 warnings)"]


def test_progress_bar_path_keeps_reporting_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_progress", lambda total: cli._Progress(total))
    for index in range(5):
        write(tmp_path / f"p{index}.json", VALID_PATIENT)
    write(tmp_path / "p5.json", "{")
    result = run("validate", tmp_path, "--format", "json")
    assert result.exit_code == 2
    assert len(json_results(result)) == 6
    assert f"error: {tmp_path / 'p5.json'}: not valid JSON" in result.stderr


def test_bundle_entry_errors_carry_the_entry_path(tmp_path: Path) -> None:
    bundle = json.loads((EXAMPLES / "bundle.json").read_text())
    bundle["entry"][2]["resource"]["status"] = "pending"  # not in the required request-status binding
    path = write(tmp_path / "bundle.json", bundle)
    result = run("validate", path, "--quiet")
    assert result.exit_code == 1
    assert "Bundle.entry[2].resource" in result.stdout
    assert "Bundle (3 entries)" in run("validate", path).stdout


# -- convert ---------------------------------------------------------------------------------------


def test_convert_json_to_xml_to_json_round_trip(tmp_path: Path) -> None:
    xml_path = tmp_path / "patient.xml"
    to_xml = run("convert", EXAMPLES / "patient.json", "--to", "xml", "-o", xml_path)
    assert to_xml.exit_code == 0, to_xml.stderr
    root = ET.parse(xml_path).getroot()
    assert root.tag == "{http://hl7.org/fhir}Patient"

    back = run("convert", xml_path, "--to", "json")
    assert back.exit_code == 0, back.stderr
    assert json_format.loads(back.stdout_bytes) == json_format.loads((EXAMPLES / "patient.json").read_bytes())


def test_convert_bundle_round_trip_keeps_decimals(tmp_path: Path) -> None:
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Weight"},
        "valueQuantity": {"value": Decimal("72.50"), "unit": "kg"},
    }
    source = write(tmp_path / "obs.json", json_format.dumps(obs))
    xml = run("convert", source, "--to", "xml")
    assert xml.exit_code == 0, xml.stderr
    assert b'value="72.50"' in xml.stdout_bytes
    back = run("convert", "-", "--to", "json", input=xml.stdout_bytes)
    assert back.exit_code == 0, back.stderr
    assert b"72.50" in back.stdout_bytes
    assert json_format.loads(back.stdout_bytes) == obs


def test_convert_pretty_and_stdin_stdout() -> None:
    compact = run("convert", "-", "--to", "json", input=(EXAMPLES / "patient.xml").read_bytes())
    pretty = run("convert", "-", "--to", "json", "--pretty", input=(EXAMPLES / "patient.xml").read_bytes())
    assert compact.exit_code == pretty.exit_code == 0
    assert len(compact.stdout.strip().splitlines()) == 1
    assert len(pretty.stdout.splitlines()) > 10
    assert json.loads(compact.stdout) == json.loads(pretty.stdout)

    xml_compact = run("convert", EXAMPLES / "patient.json", "--to", "xml")
    xml_pretty = run("convert", EXAMPLES / "patient.json", "--to", "xml", "--pretty")
    assert xml_pretty.stdout.count("\n") > xml_compact.stdout.count("\n")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"<Patient xmlns='http://hl7.org/fhir'>", ""),
    ],
)
def test_convert_errors_are_one_line_exit_2(tmp_path: Path, content: bytes, expected: str) -> None:
    path = write(tmp_path / "in.json", content)
    out = tmp_path / "out.xml"
    result = run("convert", path, "--to", "xml", "-o", out)
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {path}: {expected}")
    assert not out.exists(), "no partial output on error"


def test_convert_missing_input(tmp_path: Path) -> None:
    result = run("convert", tmp_path / "nope.json", "--to", "json")
    assert result.exit_code == 2
    assert error_lines(result.stderr) == [f"error: {tmp_path / 'nope.json'}: no such file or folder"]


def test_convert_unknown_resource_type_to_xml(tmp_path: Path) -> None:
    path = write(tmp_path / "odd.json", {"resourceType": "SocialPrescription", "id": "x"})
    done = run_process("convert", path, "--to", "xml")
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    [line] = error_lines(stderr)
    assert line.startswith(f"error: {path}: ")


def test_convert_unwritable_output(tmp_path: Path) -> None:
    result = run("convert", EXAMPLES / "patient.json", "--to", "json", "-o", tmp_path / "no" / "such" / "dir.json")
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: cannot write {tmp_path / 'no' / 'such' / 'dir.json'}")


# -- start-up discipline ---------------------------------------------------------------------------


def test_importing_the_cli_stays_light() -> None:
    code = (
        "import sys, adapter.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'lxml', 'fhirpathpy', 'orjson')"
        " or m.startswith('adapter.validation') or m == 'adapter.fhir.model'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- robustness ------------------------------------------------------------------------------------


def test_text_report_to_file_has_no_terminal_codes(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", BAD_DATE)
    report = tmp_path / "report.txt"
    result = run("validate", bad, "-o", report)
    assert result.exit_code == 1
    assert result.stdout == ""
    text = report.read_text()
    assert "\x1b[" not in text
    assert "Patient.birthDate" in text
    assert text.rstrip().splitlines()[-1].startswith("1 input: 0 valid, 1 invalid (1 error")


def test_junit_survives_control_characters_in_diagnostics(tmp_path: Path) -> None:
    write(tmp_path / "ctl.json", '{"resourceType": "Patient", "bad\\u0001name": 1, "gender": "x\\u0007"}')
    result = run("validate", tmp_path, "--format", "junit")
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout_bytes)
    [case] = root.iter("testcase")
    failure = case.find("failure")
    assert failure is not None and "badname" in (failure.text or "")


def test_internal_validator_error_is_one_line_and_others_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter.validation.structure import StructuralValidator

    original = StructuralValidator.validate

    def flaky(self: StructuralValidator, resource: Any, profiles: Any = ()) -> Any:
        if resource.get("id") == "boom":
            raise KeyError("unexpected")
        return original(self, resource)

    monkeypatch.setattr(StructuralValidator, "validate", flaky)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    boom = write(tmp_path / "a.json", {**VALID_PATIENT, "id": "boom"})
    write(tmp_path / "b.json", BAD_GENDER)
    result = run("validate", tmp_path, "--format", "json")
    assert result.exit_code == 2
    assert error_lines(result.stderr) == [f"error: {boom}: internal error while validating: KeyError: 'unexpected'"]
    assert [i["valid"] for i in json_results(result)] == [False, False]


def test_stdin_and_files_together(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", VALID_PATIENT)
    result = run("validate", good, "-", "--format", "json", input=json.dumps(UNKNOWN_ELEMENT))
    assert result.exit_code == 1
    assert [(i["file"], i["valid"]) for i in json_results(result)] == [(str(good), True), ("<stdin>", False)]


def test_convert_refuses_ndjson_with_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path / "bulk.ndjson", json.dumps(VALID_PATIENT) + "\n" + json.dumps(VALID_PATIENT) + "\n")
    result = run("convert", path, "--to", "xml")
    assert result.exit_code == 2
    assert error_lines(result.stderr) == [f"error: {path}: NDJSON with several resources: expected exactly one"]


def test_output_to_a_device_or_symlink_is_written_in_place(tmp_path: Path) -> None:
    # Renaming a temporary file over /dev/null would replace the device with a regular file.
    result = run("validate", EXAMPLES / "patient.json", "--format", "json", "-o", os.devnull)
    assert result.exit_code == 0
    assert not Path(os.devnull).is_file()
    real = write(tmp_path / "real.json", "old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert run("convert", EXAMPLES / "patient.json", "--to", "json", "-o", link).exit_code == 0
    assert link.is_symlink()
    assert json.loads(real.read_text())["resourceType"] == "Patient"


def test_default_profiles_from_the_environment_and_an_unknown_profile(tmp_path: Path) -> None:
    patient = tmp_path / "patient.json"
    patient.write_text('{"resourceType": "Patient", "gender": "male"}')
    sp_patient = "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Patient"
    env = {**os.environ, "SPFHIR_DEFAULT_PROFILES": json.dumps({"Patient": [sp_patient]})}
    checked = subprocess.run(
        [sys.executable, "-c", "from adapter.cli import main; main()", "validate", str(patient), "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert checked.returncode == 1 and "nhsNumber" in checked.stdout
    unknown = subprocess.run(
        [
            sys.executable,
            "-c",
            "from adapter.cli import main; main()",
            "validate",
            str(patient),
            "--profile",
            "https://x.example/p",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert (
        unknown.returncode == 2
        and unknown.stderr == "error: profile https://x.example/p is not in the loaded packages\n"
    )


def test_tx_asks_a_terminology_server_for_what_cannot_be_expanded_locally(tmp_path: Path) -> None:
    """--tx reaches a real (local) server's ValueSet/$validate-code; without it the binding is 'not checked'."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Tx(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps({"resourceType": "Parameters", "parameter": [{"name": "result", "valueBoolean": False}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    patient = tmp_path / "patient.json"
    ukcore = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
    coding = {"system": "http://snomed.info/sct", "code": "87915002"}
    patient.write_text(
        json.dumps({"resourceType": "Patient", "meta": {"profile": [ukcore]}, "maritalStatus": {"coding": [coding]}})
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), Tx)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tx = f"http://127.0.0.1:{server.server_address[1]}"
        run = [sys.executable, "-c", "from adapter.cli import main; main()", "validate", str(patient), "-f", "json"]
        local = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=60)
        remote = subprocess.run([*run, "--tx", tx], capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        server.shutdown()
    local_issues = json.loads(local.stdout)[0]["outcome"]["issue"]
    assert any(
        "not checked: https://fhir.hl7.org.uk/ValueSet/UKCore-PersonMaritalStatusCode" in i["diagnostics"]
        for i in local_issues
    )
    [warning] = [i for i in json.loads(remote.stdout)[0]["outcome"]["issue"] if i["code"] == "code-invalid"]
    assert warning["severity"] == "warning" and "extensible" in warning["diagnostics"]
    assert asked and asked[0].startswith("/ValueSet/$validate-code?") and "code=87915002" in asked[0]
