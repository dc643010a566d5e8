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
from collections.abc import Callable
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
    "Runner",
    "checks_for",
    "elements_for",
    "elements_for_primitive",
    "runner_for",
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


def _check(node: Any, checks: tuple[Check, ...], path: Path, env: Env, issues: list[Issue]) -> None:
    for key, severity, message, fn, keys, absent in checks:
        if keys is not None and keys.isdisjoint(node):
            result = absent
        else:
            try:
                result = fn.test(node, env)
            except Exception as exc:  # an evaluation error is reported, never passed silently
                issues.append(_not_evaluated(key, exc, path))
                continue
        # An empty result is "not violated" (https://hl7.org/fhirpath/N1/#singleton-evaluation-of-collections)
        if result is False:
            issues.append(Issue(severity, "invariant", message, render(path)))


def _not_evaluated(key: str, exc: Exception, path: Path) -> Issue:
    return Issue("warning", "invariant", f"Invariant {key} could not be evaluated: {exc}", render(path))


RunFn = Callable[[Any, Path, Env, list[Issue]], None]


class Runner:
    """The invariants of one context as one call: ``runner.run(node, path, env, issues)`` does what
    evaluating the checks one by one in a loop (:func:`_check`) does, in the same order.

    The walk calls it on every node of the context (366,000 calls on the R4 examples, 4 checks
    each on average), so after a few calls through that loop the checks are unrolled
    into generated Python code: the absent-element test of a check becomes ``'min' in node or
    '_min' in node`` (``keys.isdisjoint(node)`` for many keys), a check whose result when absent
    is not False is skipped, and each evaluation has its own ``try``. ``node`` must be a JSON
    object when any check has ``keys`` (as for every node :func:`checks_for` gives names for).
    """

    __slots__ = ("_calls", "checks", "run")

    def __init__(self, checks: tuple[Check, ...]) -> None:
        self.checks = checks
        self._calls = 0
        self.run: RunFn = self._warming

    def _warming(self, node: Any, path: Path, env: Env, issues: list[Issue]) -> None:
        self._calls += 1
        if self._calls >= _GENERATE_AFTER:
            self.run = _generate(self.checks)
        _check(node, self.checks, path, env, issues)


#: Calls of a Runner through the loop before its code is generated (generating costs ~0.3 ms).
_GENERATE_AFTER = 32
#: Up to this many keys, the absent-element test is a chain of ``in`` tests.
_INLINE_KEYS = 8
_RUNNERS: dict[tuple[Check, ...], Runner] = {}


def runner_for(checks: tuple[Check, ...]) -> Runner | None:
    """The (shared) runner of ``checks``; None when there are none."""
    if not checks:
        return None
    found = _RUNNERS.get(checks)
    if found is None:
        found = _RUNNERS[checks] = Runner(checks)
    return found


def _generate(checks: tuple[Check, ...]) -> RunFn:
    names: dict[str, Any] = {"Issue": Issue, "render": render, "_not_evaluated": _not_evaluated}
    lines = ["def run(node, path, env, issues):"]
    for i, (key, severity, message, fn, keys, absent) in enumerate(checks):
        names.update({f"c{i}": fn, f"k{i}": keys, f"s{i}": severity, f"m{i}": message, f"n{i}": key})
        indent = "    "
        if keys is not None:
            if len(keys) <= _INLINE_KEYS:
                present = " or ".join(f"{k!r} in node" for k in sorted(keys)) or "False"
            else:
                present = f"not k{i}.isdisjoint(node)"
            lines.append(f"    if {present}:")
            indent = "        "
        lines += [
            f"{indent}try:",
            f"{indent}    r = c{i}.test(node, env)",
            f"{indent}except Exception as exc:",
            f"{indent}    issues.append(_not_evaluated(n{i}, exc, path))",
            f"{indent}else:",
            f"{indent}    if r is False:",
            f'{indent}        issues.append(Issue(s{i}, "invariant", m{i}, render(path)))',
        ]
        if keys is not None and absent is False:
            lines += ["    else:", f'        issues.append(Issue(s{i}, "invariant", m{i}, render(path)))']
    exec(compile("\n".join(lines) + "\n", "<invariants>", "exec"), names)
    run: RunFn = names["run"]
    return run


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
