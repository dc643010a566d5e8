"""R4 invariants (``ElementDefinition.constraint``) evaluated during the structural walk.

Each invariant's FHIRPath is compiled once (``adapter.fhir.fhirpath``) and evaluated on every node
of the element it is defined on. A few are evaluated natively instead, because they apply to every
element and are cheaper to check in the walk itself: ele-1 (value or children), ext-1 (extension or
value, not both), and txt-1/txt-2 (narrative xhtml, :mod:`adapter.validation.xhtml`).
Invariants that cannot be evaluated are listed, with the reason, in :data:`NOT_EVALUATED` and in
``docs/validation.md``; they are never reported as passed.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from adapter.fhir.fhirpath import Env, UnsupportedExpression, compile_expression
from adapter.fhir.model import Context, ElementDef
from adapter.validation.base import Issue
from adapter.validation.paths import Path, render

__all__ = ["NATIVE", "NOT_EVALUATED", "InvariantChecker", "elements_for", "elements_for_primitive"]

#: Checked by the walk itself, not through FHIRPath.
NATIVE = frozenset({"ele-1", "ext-1", "txt-1", "txt-2"})

#: key -> reason, for invariants whose FHIRPath cannot be evaluated (filled as they are met).
NOT_EVALUATED: dict[str, str] = {}

Compiled = tuple[tuple[str, str, str, Any], ...]


@cache
def _compiled(element: ElementDef) -> Compiled:
    out = []
    for constraint in element.raw.get("constraints", ()):
        key = constraint["key"]
        if key in NATIVE:
            continue
        try:
            fn = compile_expression(constraint["expression"])
        except UnsupportedExpression as exc:
            NOT_EVALUATED[key] = str(exc)
            continue
        out.append((key, constraint["severity"], constraint["human"], fn))
    return tuple(out)


class InvariantChecker:
    """Evaluates compiled invariants; one instance per validator (stateless between resources)."""

    def check(
        self,
        node: Any,
        elements: tuple[ElementDef, ...],
        path: Path,
        env: Env,
        issues: list[Issue],
    ) -> None:
        for element in elements:
            for key, severity, human, fn in _compiled(element):
                try:
                    result = fn(node, env)
                except Exception as exc:  # an evaluation error is reported, never passed silently
                    issues.append(
                        Issue(
                            "warning",
                            "invariant",
                            f"Invariant {key} could not be evaluated: {exc}",
                            render(path),
                        )
                    )
                    continue
                if result == [False]:
                    issues.append(Issue(_severity(severity), "invariant", f"{key}: {human}", render(path)))


@cache
def elements_for(ctx: Context, via: ElementDef | None) -> tuple[ElementDef, ...]:
    own = ctx.element
    found = [e for e in (own, via) if e is not None and _compiled(e)]
    if len(found) == 2 and found[0] is found[1]:
        found.pop()
    return tuple(found)


def elements_for_primitive(element: ElementDef) -> tuple[ElementDef, ...]:
    return (element,) if _compiled(element) else ()


def _severity(severity: str) -> str:
    return "error" if severity == "error" else "warning"
