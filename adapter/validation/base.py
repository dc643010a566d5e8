"""The ``Validator`` seam: check a resource and report issues shaped like ``OperationOutcome.issue``.

Implementations:

- :class:`adapter.validation.structure.StructuralValidator`: R4 core structure, primitive
  formats, required bindings to locally expanded ValueSets, references and R4 invariants,
  driven by the compiled model in ``adapter/fhir/definitions``.

See https://hl7.org/fhir/R4/validation.html and https://hl7.org/fhir/R4/operationoutcome.html.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Issue", "Validator", "has_errors", "operation_outcome"]


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding, with the fields of ``OperationOutcome.issue``.

    ``code`` is from http://hl7.org/fhir/issue-type (structure, required, value, invariant,
    code-invalid, ...); ``expression`` is a FHIRPath with indexes, e.g.
    ``Bundle.entry[3].resource.subject``.
    """

    severity: str  # fatal | error | warning | information
    code: str
    diagnostics: str
    expression: str | None = None

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue

    @property
    def is_error(self) -> bool:
        return self.severity in ("error", "fatal")


class Validator(Protocol):
    def validate(self, resource: Any, profiles: Sequence[str] = ()) -> list[Issue]:
        """Validate one resource (parsed FHIR JSON) and return every issue found.

        See: https://hl7.org/fhir/R4/resource-operation-validate.html
        """
        ...


def has_errors(issues: Iterable[Issue]) -> bool:
    return any(issue.is_error for issue in issues)


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    """An OperationOutcome for the issues; an information issue when there are none (R4 requires one)."""
    items = [issue.to_fhir() for issue in issues]
    if not items:
        items = [{"severity": "information", "code": "informational", "diagnostics": "No issues found"}]
    return {"resourceType": "OperationOutcome", "issue": items}
