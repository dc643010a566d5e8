"""R4 invariants (``ElementDefinition.constraint``) evaluated during the structural walk.

Each invariant's FHIRPath is compiled once (:mod:`adapter.fhir.fhirpath`) and evaluated on every
node of the element it is defined on. A few are evaluated natively instead, because they apply to
every element and are cheaper to check in the walk itself: ele-1 (value or children), ext-1
(extension or value, not both), and txt-1/txt-2 (narrative xhtml, :mod:`adapter.validation.xhtml`).
Invariants that cannot be evaluated are listed, with the reason, in :data:`NOT_EVALUATED` and in
``docs/validation.md``; they are never reported as passed.

Absent-element shortcut: most invariants only look at a few child elements of their node
(``min.empty() or max.empty() or ...``). When an expression navigates only from the node itself
(no ``%`` variables, no ``$this``, no function applied to the node as a whole except ``iif``), its
result on a node where none of the names it mentions is present equals its result on an empty
node, computed once. The names are collected lexically (a superset: type names and nested names
count too), which can only make the shortcut apply less often, never wrongly.
"""

from __future__ import annotations

import re
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

_STRING = re.compile(r"'(?:[^'\\]|\\.)*'")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
_UNSAFE = ("%", "$", "`")
# Operators that may stand before a parenthesis, and iif, whose arguments start from the node's children.
_ROOT_OK = frozenset({"iif", "and", "or", "xor", "implies", "in", "contains", "div", "mod", "is", "as"})

# (key, severity, human, compiled, names or None, result when no named element is present)
Compiled = tuple[tuple[str, str, str, Any, frozenset[str] | None, Any], ...]


def _names(expression: str) -> frozenset[str] | None:
    """Names the expression may navigate from its node, or None when it looks at the node itself."""
    text = _STRING.sub("''", expression)
    if any(mark in text for mark in _UNSAFE):
        return None
    for call in _CALL.finditer(text):
        before = text[: call.start()].rstrip()
        if call.group(1) not in _ROOT_OK and not before.endswith("."):
            return None  # a function applied to the node itself (exists(), empty(), ...)
    return frozenset(_IDENTIFIER.findall(text))


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
        names = _names(constraint["expression"])
        absent: Any = None
        if names is not None:
            try:
                absent = fn.test({}, Env())
            except Exception:
                names = None
        out.append((key, constraint["severity"], constraint["human"], fn, names, absent))
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
        present: frozenset[str] | set[str] | None = None,
    ) -> None:
        """Evaluate the invariants of ``elements`` on ``node``.

        ``present`` holds the element names present in ``node`` (for the absent-element shortcut);
        None evaluates every invariant.
        """
        for element in elements:
            for key, severity, human, fn, names, absent in _compiled(element):
                if present is not None and names is not None and names.isdisjoint(present):
                    result = absent
                else:
                    try:
                        result = fn.test(node, env)
                    except Exception as exc:  # an evaluation error is reported, never passed silently
                        message = f"Invariant {key} could not be evaluated: {exc}"
                        issues.append(Issue("warning", "invariant", message, render(path)))
                        continue
                # An empty result is "not violated" (https://hl7.org/fhirpath/N1/#singleton-evaluation-of-collections)
                if result is False:
                    issues.append(Issue(_severity(severity), "invariant", f"{key}: {human}", render(path)))


@cache
def elements_for(ctx: Context, via: ElementDef | None) -> tuple[ElementDef, ...]:
    """Elements whose invariants apply to a node of ``ctx`` reached through element ``via``."""
    own = ctx.element
    found = [e for e in (own, via) if e is not None and _compiled(e)]
    if len(found) == 2 and found[0] is found[1]:
        found.pop()
    return tuple(found)


def elements_for_primitive(element: ElementDef) -> tuple[ElementDef, ...]:
    return (element,) if _compiled(element) else ()


def _severity(severity: str) -> str:
    return "error" if severity == "error" else "warning"
