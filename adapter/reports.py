"""Reports of ``spfhir validate``: a rich text table, JSON, JUnit XML, and the quiet one-line-per-error form.

Each input (a file, a stdin document or an NDJSON line) gives one :class:`Result`. An input that
could not be read (not JSON/XML, too large, unsafe XML, missing) has ``problem`` set instead of
issues; it counts as invalid and, in the JSON and JUnit reports, carries one ``fatal`` issue
(https://hl7.org/fhir/R4/valueset-issue-severity.html: "no further checking could be performed").

Formats:

- JSON: an array with one ``{"file", "valid", "outcome"}`` object per input, ``outcome`` being an
  R4 OperationOutcome (https://hl7.org/fhir/R4/operationoutcome.html).
- JUnit XML (the schema CI systems read: https://github.com/testmoapp/junitxml): one ``testcase``
  per input, a ``failure`` listing the error issues of an invalid resource, an ``error`` for an
  input that could not be read; warnings go to ``system-out``.
- Text: a table (file, resource type, errors, warnings, the first issues with their FHIRPath
  expression) and a summary line; ``quiet`` prints only the error issues and the summary line.

rich is imported only by :func:`write_table`, so the JSON, JUnit and quiet reports stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapter.validation.base import Issue, operation_outcome

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Result",
    "Summary",
    "issue_line",
    "json_report",
    "junit_report",
    "quiet_lines",
    "summarise",
    "summary_line",
    "write_table",
]

#: Issues shown per input in the text table.
TABLE_ISSUES = 3


@dataclass(slots=True)
class Result:
    """The outcome of one input."""

    label: str
    resource_type: str | None = None
    issues: list[Issue] = field(default_factory=list)
    #: Why the input could not be checked at all (unreadable input, or an internal failure).
    problem: str | None = None
    problem_code: str = "exception"
    problem_expression: str | None = None
    #: Number of entries, for a Bundle.
    entries: int | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None and not any(issue.is_error for issue in self.issues)

    @property
    def errors(self) -> list[Issue]:
        return [issue for issue in self.issues if issue.is_error]

    @property
    def warnings(self) -> list[Issue]:
        return [issue for issue in self.issues if issue.severity == "warning"]

    def all_issues(self) -> list[Issue]:
        """The issues, with the read problem as a ``fatal`` issue first."""
        if self.problem is None:
            return list(self.issues)
        return [Issue("fatal", self.problem_code, self.problem, self.problem_expression), *self.issues]

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.all_issues())

    @property
    def type_text(self) -> str:
        if self.resource_type is None:
            return "-"
        if self.entries is not None:
            noun = "entry" if self.entries == 1 else "entries"
            return f"{self.resource_type} ({self.entries} {noun})"
        return self.resource_type


@dataclass(frozen=True, slots=True)
class Summary:
    inputs: int
    valid: int
    invalid: int
    unreadable: int
    errors: int
    warnings: int


def summarise(results: Sequence[Result]) -> Summary:
    unreadable = sum(1 for r in results if r.problem is not None)
    valid = sum(1 for r in results if r.valid)
    return Summary(
        inputs=len(results),
        valid=valid,
        invalid=len(results) - valid - unreadable,
        unreadable=unreadable,
        errors=sum(len(r.errors) for r in results),
        warnings=sum(len(r.warnings) for r in results),
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def summary_line(results: Sequence[Result]) -> str:
    """e.g. ``3 inputs: 1 valid, 1 invalid, 1 unreadable (4 errors, 2 warnings)``."""
    s = summarise(results)
    parts = [f"{s.valid} valid", f"{s.invalid} invalid"]
    if s.unreadable:
        parts.append(f"{s.unreadable} unreadable")
    return (
        f"{_plural(s.inputs, 'input')}: {', '.join(parts)} "
        f"({_plural(s.errors, 'error')}, {_plural(s.warnings, 'warning')})"
    )


def issue_line(issue: Issue) -> str:
    """``Expression: diagnostics`` (or just the diagnostics when the issue has no expression)."""
    return f"{issue.expression}: {issue.diagnostics}" if issue.expression else issue.diagnostics


def quiet_lines(results: Sequence[Result]) -> list[str]:
    """One line per error issue of a readable input: ``file: error: Expression: diagnostics``.

    Unreadable inputs are left out: the command reports them on stderr.
    """
    return [
        f"{r.label}: {issue.severity}: {issue_line(issue)}" for r in results if r.problem is None for issue in r.errors
    ]


# -- JSON ------------------------------------------------------------------------------------------


def json_report(results: Sequence[Result]) -> bytes:
    """``[{"file": ..., "valid": ..., "outcome": <OperationOutcome>}, ...]`` as indented UTF-8 JSON."""
    import orjson

    items = [{"file": r.label, "valid": r.valid, "outcome": r.outcome()} for r in results]
    return orjson.dumps(items, option=orjson.OPT_INDENT_2) + b"\n"


# -- JUnit -----------------------------------------------------------------------------------------


def junit_report(results: Sequence[Result], suite: str = "spfhir validate") -> bytes:
    """JUnit XML: one ``testcase`` per input; ``failure`` for invalid, ``error`` for unreadable."""
    from xml.etree import ElementTree as ET

    s = summarise(results)
    counts = {
        "tests": str(s.inputs),
        "failures": str(s.invalid),
        "errors": str(s.unreadable),
        "skipped": "0",
    }
    root = ET.Element("testsuites", {"name": suite, **counts})
    testsuite = ET.SubElement(root, "testsuite", {"name": suite, **counts})
    for r in results:
        case = ET.SubElement(
            testsuite,
            "testcase",
            {"name": r.label, "classname": f"fhir.{r.resource_type or 'unreadable'}", "file": r.label},
        )
        if r.problem is not None:
            node = ET.SubElement(case, "error", {"message": _xml_safe(r.problem), "type": r.problem_code})
            node.text = _xml_safe(r.problem)
        elif not r.valid:
            errors = r.errors
            node = ET.SubElement(
                case,
                "failure",
                {
                    "message": f"{_plural(len(errors), 'error')}: {_xml_safe(issue_line(errors[0]))}",
                    "type": "invalid",
                },
            )
            node.text = "\n".join(_xml_safe(f"{i.severity} [{i.code}] {issue_line(i)}") for i in errors)
        if r.warnings:
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join(_xml_safe(f"warning [{i.code}] {issue_line(i)}") for i in r.warnings)
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _xml_safe(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (control characters from a hostile input's diagnostics)."""
    return "".join(
        c for c in text if c in "\t\n\r" or ("\x20" <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd") or c > "\uffff"
    )


# -- text ------------------------------------------------------------------------------------------


def write_table(console: Console, results: Sequence[Result]) -> None:
    """The summary table and the summary line, on a rich console."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", show_lines=False, expand=False)
    table.add_column("File", overflow="fold")
    table.add_column("Type", overflow="fold")
    table.add_column("Errors", justify="right")
    table.add_column("Warnings", justify="right")
    table.add_column("Issues", overflow="fold")
    for r in results:
        issues = Text()
        if r.problem is not None:
            issues.append("unreadable: ", style="bold red")
            issues.append(r.problem)
            errors = Text("-", style="red")
        else:
            shown = (r.errors + [i for i in r.issues if not i.is_error])[:TABLE_ISSUES]
            for index, issue in enumerate(shown):
                if index:
                    issues.append("\n")
                style = "red" if issue.is_error else ("yellow" if issue.severity == "warning" else "dim")
                issues.append(f"{issue.severity} ", style=style)
                if issue.expression:
                    issues.append(issue.expression, style="cyan")
                    issues.append(": ")
                issues.append(issue.diagnostics)
            hidden = len(r.issues) - len(shown)
            if hidden > 0:
                issues.append(f"\n... {hidden} more", style="dim")
            if not r.issues:
                issues.append("ok", style="green")
            errors = Text(str(len(r.errors)), style="red" if r.errors else "green")
        warnings = len(r.warnings) if r.problem is None else 0
        table.add_row(
            Text(r.label),
            Text(r.type_text),
            errors,
            Text(str(warnings), style="yellow" if warnings else ""),
            issues,
        )
    console.print(table)
    s = summarise(results)
    style = "bold red" if s.invalid or s.unreadable else "bold green"
    console.print(Text(summary_line(results), style=style), soft_wrap=True)
