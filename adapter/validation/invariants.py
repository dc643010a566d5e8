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
node, computed once. The names are those that start a path (``contained`` in
``contained.meta.empty()``), collected lexically (a superset: function arguments and operator
words count too; after a leading type name, every name does), which can only make the shortcut
apply less often, never wrongly. They are turned once per context into the JSON property names
that stand for them (``valueQuantity`` and ``_value...`` for ``value``), so a node is tested
against its own keys (:func:`checks_for`).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, NamedTuple

from adapter.fhir.fhirpath import Env, UnsupportedExpression, compile_expression
from adapter.fhir.model import Context, ElementDef
from adapter.validation.base import Issue
from adapter.validation.paths import Path, render

__all__ = [
    "NATIVE",
    "NOT_EVALUATED",
    "Check",
    "InvariantChecker",
    "checks_for",
    "elements_for",
    "elements_for_primitive",
]

#: Checked by the walk itself, not through FHIRPath.
NATIVE = frozenset({"ele-1", "ext-1", "txt-1", "txt-2"})

#: key -> reason, for invariants whose FHIRPath cannot be evaluated (filled as they are met).
NOT_EVALUATED: dict[str, str] = {}

_STRING = re.compile(r"'(?:[^'\\]|\\.)*'")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DELIMITED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
_UNSAFE = ("%", "$", "`")
# Operators that may stand before a parenthesis, and iif, whose arguments start from the node's children.
_ROOT_OK = frozenset({"iif", "and", "or", "xor", "implies", "in", "contains", "div", "mod", "is", "as"})

# (key, severity, human, compiled, names or None, result when no named element is present)
Compiled = tuple[tuple[str, str, str, Any, frozenset[str] | None, Any], ...]


def _names(expression: str) -> frozenset[str] | None:
    """Names the expression may navigate from its node, or None when it looks at the node itself.

    Only a name that starts a path navigates from the node (``contained.meta.versionId.empty()``
    looks at ``contained``; ``meta`` is looked for in what that gives), so the names after a dot
    are left out, unless a path starts with a type name (``Appointment.status``, where the type
    stands for the node itself) or a comment could hide what starts a path: then every name counts.
    """
    # A delimited identifier (dom-6's text.`div`) is the identifier itself.
    text = _DELIMITED.sub(r"\1", _STRING.sub("''", expression))
    if any(mark in text for mark in _UNSAFE):
        return None
    for call in _CALL.finditer(text):
        before = text[: call.start()].rstrip()
        if call.group(1) not in _ROOT_OK and not before.endswith("."):
            return None  # a function applied to the node itself (exists(), empty(), ...)
    starts = frozenset(m.group() for m in _IDENTIFIER.finditer(text) if not text[: m.start()].rstrip().endswith("."))
    if "//" in text or "/*" in text or any(name[0].isupper() for name in starts):
        return frozenset(_IDENTIFIER.findall(text))
    return starts


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


class Check(NamedTuple):
    """One invariant as evaluated on the nodes of one context."""

    key: str
    severity: str  # the issue's: error or warning
    message: str
    fn: Any
    #: The JSON properties whose presence means the expression must run; None: it always runs.
    keys: frozenset[str] | None
    #: Its result when none of ``keys`` is present.
    absent: Any


def checks_for(elements: tuple[ElementDef, ...], names: dict[str, str] | None) -> tuple[Check, ...]:
    """The invariants of ``elements`` for nodes whose JSON properties map to element names by
    ``names`` (``valueQuantity`` -> ``value``; other properties are their own name); with None,
    every expression is evaluated (no absent-element shortcut).

    A node has none of the names an expression mentions exactly when it has none of ``keys``:
    the properties that map to one of the names, and the names no property maps from."""
    out = []
    for element in elements:
        for key, severity, human, fn, mentioned, absent in _compiled(element):
            keys = None
            if names is not None and mentioned is not None:
                keys = frozenset(
                    {k for k, name in names.items() if name in mentioned} | {m for m in mentioned if m not in names}
                )
            out.append(Check(key, _severity(severity), f"{key}: {human}", fn, keys, absent))
    return tuple(out)


class InvariantChecker:
    """Evaluates compiled invariants; one instance per validator (stateless between resources)."""

    def check(self, node: Any, checks: tuple[Check, ...], path: Path, env: Env, issues: list[Issue]) -> None:
        """Evaluate ``checks`` (see :func:`checks_for`) on ``node``."""
        for key, severity, message, fn, keys, absent in checks:
            if keys is not None and keys.isdisjoint(node):
                result = absent
            else:
                try:
                    result = fn.test(node, env)
                except Exception as exc:  # an evaluation error is reported, never passed silently
                    problem = f"Invariant {key} could not be evaluated: {exc}"
                    issues.append(Issue("warning", "invariant", problem, render(path)))
                    continue
            # An empty result is "not violated" (https://hl7.org/fhirpath/N1/#singleton-evaluation-of-collections)
            if result is False:
                issues.append(Issue(severity, "invariant", message, render(path)))


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
