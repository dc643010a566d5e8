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

Two more shortcuts, for the ElementDefinitions of the definition Bundles (#2: 272,000 ``eld-*``
evaluations in ``Bundle-dataelements.json`` alone), both decided on the syntax tree:

- Decisive absence: ``binding.empty() or ...`` is true on a node without ``binding``, whatever
  the rest says, because ``or`` is evaluated left to right and stops at the first true operand
  (https://hl7.org/fhirpath/N1/#boolean-logic; :func:`adapter.fhir.fhirpath._op_or` and the
  generated code do the same). So is ``sliceIsConstraining.exists() implies ...`` without its
  left-hand name. Only leading ``name.empty()`` operands count (an operand before the decisive
  one could raise otherwise), and absence is tested on every JSON property FHIRPath navigation
  reads for the name (``name``, ``_name`` and, for a choice, every ``name<Type>``).
- Memo: an expression that only navigates plain members of its node (no ``%`` variables, no
  type names or typed navigation, no ``resolve()``/``trace()``/clock functions) gives the same
  result for nodes with the same values under those members. When those values are all strings
  or integers (or absent), the result is kept per context, keyed by them: ``path.matches(...)``
  (eld-19, eld-20) meets 7,862 distinct paths in 47,553 ElementDefinitions, eld-2 11 distinct
  ``min``/``max`` pairs. Primitive nodes (eld-3 on ``max``) are keyed by the string itself.
  Only expressions that compare or convert values are memoised; a presence test costs less than
  building the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

from adapter.fhir import model
from adapter.fhir.fhirpath import AST, Env, UnsupportedExpression, compile_expression, parse_tree
from adapter.fhir.model import Context, ElementDef
from adapter.validation.base import Issue
from adapter.validation.paths import Path, render

__all__ = [
    "NATIVE",
    "NOT_EVALUATED",
    "Check",
    "Runner",
    "checks_for",
    "clear_memos",
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

# Functions whose result depends on more than the values of the node (the Env, the clock, a side
# effect): an expression that calls one is never memoised.
_IMPURE = ("resolve", "trace", "now", "today", "timeOfDay", "memberOf", "conformsTo", "subsumes", "subsumedBy")
# An expression with none of these only tests presence, which costs less than a memo lookup.
_COSTLY = ("matches(", "toInteger(", "iif(", "'")
#: Most JSON properties a memo key is built from (two names and their ``_name`` parts, and more).
_MEMO_KEYS = 6
#: Most results kept per check (a bound on memory, not an eviction policy).
_MEMO_SIZE = 4096
#: Every memo of the generated runners, emptied after each resource (see :func:`clear_memos`).
_MEMOS: list[dict[Any, Any]] = []


class _Facts(NamedTuple):
    """What the syntax tree of an invariant says about its evaluation on a node."""

    key: str
    severity: str
    human: str
    fn: Any
    #: Names the expression may navigate from its node (see :func:`_names`); None: unknown.
    names: frozenset[str] | None
    #: Its result on a node where none of ``names`` is present.
    absent: Any
    #: Names whose absence alone makes the result true (decisive absence, see the module docstring).
    decisive: tuple[str, ...]
    #: The member names the result depends on, when it may be memoised; None: never memoised.
    memo: frozenset[str] | None
    #: Whether the result on a primitive node depends on its value alone (memoised per string).
    pure: bool


Compiled = tuple[_Facts, ...]


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


# Functions that give an empty collection for an empty input without evaluating their arguments:
# where/select/repeat evaluate them per item, trace() only when the Env has a trace callback
# (the walk's has none: _Walk.resource in adapter.validation.structure).
_EMPTY_TO_EMPTY = frozenset(
    {"where", "select", "repeat", "trace", "first", "last", "tail", "distinct", "ofType", "children", "descendants"}
)


def _chain_root(node: AST) -> str | None:
    """``name`` when ``node`` is a path from a plain member of the node (``contained.where(...).
    trace(...)``) that is empty whenever that member is, else None."""
    while node["type"] == "InvocationExpression":
        left, step = node["children"]
        if step["type"] == "FunctionInvocation":
            if step["children"][0]["children"][0]["text"] not in _EMPTY_TO_EMPTY:
                return None
        elif step["type"] != "MemberInvocation":
            return None
        node = left
    if node["type"] != "TermExpression" or node["children"][0]["type"] != "InvocationTerm":
        return None
    member = node["children"][0]["children"][0]
    if member["type"] != "MemberInvocation":
        return None
    name: str = member["children"][0]["text"]
    # A plain lower-case identifier: an upper-case one may be a type name standing for the node.
    return name if _IDENTIFIER.fullmatch(name) and name[0].islower() else None


def _member_call(node: AST, function: str) -> str | None:
    """``name`` when ``node`` is ``<path from name>.function()`` (see :func:`_chain_root`)."""
    if node["type"] != "InvocationExpression":
        return None
    chain, call = node["children"]
    if call["type"] != "FunctionInvocation":
        return None
    functn = call["children"][0]
    # One child: the function's name, no parameter list.
    if len(functn["children"]) != 1 or functn["children"][0]["text"] != function:
        return None
    return _chain_root(chain)


def _or_operands(node: AST) -> list[AST]:
    """``a or b or c`` (left-nested) as [a, b, c]."""
    if node["type"] == "OrExpression" and node["terminalNodeText"] == ["or"]:
        left, right = node["children"]
        return [*_or_operands(left), right]
    return [node]


def _decisive(tree: AST) -> tuple[str, ...]:
    """Names whose absence makes the expression true: ``name`` in ``<path from name>.exists()
    implies ...``, or the leading ``<path from name>.empty()`` operands of a top-level ``or``.
    After the first, an operand counts only when those before it are plain ``name.empty()``,
    which cannot raise: a path such as ``contained.where(...)`` can, when ``contained`` is
    present, and the evaluation would report that."""
    if tree["type"] == "ImpliesExpression":
        name = _member_call(tree["children"][0], "exists")
        return (name,) if name is not None else ()
    found: list[str] = []
    for operand in _or_operands(tree):
        name = _member_call(operand, "empty")
        if name is None:
            break
        found.append(name)
        if operand["children"][0]["type"] != "TermExpression":
            break  # a path: the next operands may never be evaluated
    return tuple(found)


def _named(tree: AST, kind: str) -> set[str]:
    """The names of every node of ``kind`` in the tree: ``MemberInvocation`` for the members it
    navigates (from its node or from anything else), ``Functn`` for the functions it calls."""
    found = set()
    if tree["type"] == kind:
        found.add(tree["children"][0]["text"])
    for child in tree.get("children", ()):
        found |= _named(child, kind)
    return found


def _pure(expression: str, fn: Any, tree: AST) -> bool:
    """Whether the result is a function of the JSON values the expression reads, worth a memo."""
    text = _STRING.sub("''", expression)
    return (
        "%" not in text
        and not fn.typed
        and not _named(tree, "Functn") & set(_IMPURE)
        and any(mark in expression for mark in _COSTLY)
    )


def _memo_names(names: frozenset[str] | None, pure: bool, tree: AST) -> frozenset[str] | None:
    """The member names the result depends on, when it may be memoised on their values (``pure``:
    see :func:`_pure`)."""
    if names is None or not pure:
        return None
    members = _named(tree, "MemberInvocation")
    if not all(_IDENTIFIER.fullmatch(m) and m[0].islower() for m in members):
        return None  # a delimited identifier, or a type name that stands for the node
    return frozenset(members)


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
        expression = constraint["expression"]
        names = _names(expression)
        absent: Any = None
        if names is not None:
            try:
                absent = fn.test({}, Env())
            except Exception:
                names = None
        tree = parse_tree(expression)
        decisive = _decisive(tree)
        pure = _pure(expression, fn, tree)
        memo = _memo_names(names, pure, tree)
        out.append(_Facts(key, constraint["severity"], constraint["human"], fn, names, absent, decisive, memo, pure))
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
    #: Key sets such that a node with none of the keys of one of them makes the result true.
    decisive: tuple[frozenset[str], ...] = ()
    #: The JSON properties whose values (when all are strings, integers or absent) key a memo of
    #: the result; the empty tuple keys it by the (string) node itself; None: no memo.
    memo: tuple[str, ...] | None = None


def _keys_of(name: str, names: dict[str, str]) -> frozenset[str]:
    """Every JSON property that FHIRPath navigation of ``name`` reads (``_navigate`` in
    :mod:`adapter.fhir.fhirpath`: the name, its ``_name`` part, any ``name<Type>`` of a choice
    over all R4 types), and those that map to it by ``names``."""
    suffixes = model.choice_suffixes().get(name, {})
    choice = {k for suffix in suffixes for k in (name + suffix, "_" + name + suffix)}
    return frozenset({name, "_" + name} | choice | {k for k, n in names.items() if n == name})


def checks_for(
    elements: tuple[ElementDef, ...], names: dict[str, str] | None, *, primitive: bool = False
) -> tuple[Check, ...]:
    """The invariants of ``elements`` for nodes whose JSON properties map to element names by
    ``names`` (``valueQuantity`` -> ``value``; other properties are their own name); with None,
    every expression is evaluated (no absent-element shortcut). ``primitive``: the nodes are
    primitive JSON values (eld-3 on ``max``), whose results may be memoised by value.

    A node has none of the names an expression mentions exactly when it has none of ``keys``:
    the properties that map to one of the names, and the names no property maps from."""
    out = []
    for element in elements:
        for facts in _compiled(element):
            mentioned = facts.names
            keys = None
            decisive: tuple[frozenset[str], ...] = ()
            memo: tuple[str, ...] | None = () if primitive and facts.pure else None
            if names is not None:
                decisive = tuple(_keys_of(name, names) for name in facts.decisive)
            if names is not None and mentioned is not None:
                keys = frozenset(
                    {k for k, name in names.items() if name in mentioned} | {m for m in mentioned if m not in names}
                )
                if facts.memo is not None:
                    memo_keys = set().union(*(_keys_of(name, names) for name in facts.memo))
                    memo = tuple(sorted(memo_keys)) if len(memo_keys) <= _MEMO_KEYS else None
            message = f"{facts.key}: {facts.human}"
            out.append(
                Check(facts.key, _severity(facts.severity), message, facts.fn, keys, facts.absent, decisive, memo)
            )
    return tuple(out)


def _check(node: Any, checks: tuple[Check, ...], path: Path, env: Env, issues: list[Issue]) -> None:
    """Every check evaluated (the decisive and memo shortcuts only save work, see :func:`_generate`)."""
    for key, severity, message, fn, keys, absent, _decisive, _memo in checks:
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

    ``runner.run_plain`` does the same for a node without ``_name`` properties (primitive
    extensions, which few nodes have; the walk knows, having looked at every key): its tests
    leave those properties out, half of the ``in`` tests of the generated code.
    """

    __slots__ = ("_calls", "checks", "run", "run_plain")

    def __init__(self, checks: tuple[Check, ...]) -> None:
        self.checks = checks
        self._calls = 0
        self.run: RunFn = self._warming
        self.run_plain: RunFn = self._warming

    def _warming(self, node: Any, path: Path, env: Env, issues: list[Issue]) -> None:
        self._calls += 1
        if self._calls >= _GENERATE_AFTER:
            self.run = _generate(self.checks)
            self.run_plain = _generate(tuple(_without_extensions(check) for check in self.checks))
        _check(node, self.checks, path, env, issues)


def _without_extensions(check: Check) -> Check:
    """``check`` for nodes without ``_name`` properties: its key sets without them."""

    def plain(keys: frozenset[str]) -> frozenset[str]:
        return frozenset(k for k in keys if k[:1] != "_")

    memo = check.memo
    if memo:  # () keys the memo by a primitive node itself: no properties to leave out
        memo = tuple(k for k in memo if k[:1] != "_") or None
    return check._replace(
        keys=plain(check.keys) if check.keys is not None else None,
        decisive=tuple(plain(keys) for keys in check.decisive),
        memo=memo,
    )


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


def clear_memos() -> None:
    """Empty the memos, after validating a resource: a memo key holds strings of the resource
    it came from, and a few such strings kept alive keep the allocator's 1 MB arenas of that
    whole resource from being released (peak RSS over the R4 examples +22 MB, even at 16 keys
    per memo). Within one resource, the memos of the definition Bundles do their work."""
    for memo in _MEMOS:
        if memo:
            memo.clear()


class _Absent:
    """A memo key's stand-in for an absent property (None would also stand for a JSON null)."""

    __slots__ = ()


_ABSENT = _Absent()
# Values a memo key is made of. Not bool: True == 1 would share a key with an integer.
_KEY_CLASSES = frozenset({str, int, _Absent})


def _present(keys: frozenset[str], name: str) -> str:
    """Source of the test that ``node`` has one of ``keys`` (the frozenset is bound as ``name``)."""
    if len(keys) <= _INLINE_KEYS:
        return " or ".join(f"{k!r} in node" for k in sorted(keys)) or "False"
    return f"not {name}.isdisjoint(node)"


def _memo_lookup(i: int, memo: tuple[str, ...]) -> list[str]:
    """Source that sets ``mk`` to the memo key of check ``i`` (None: the node has no key) and
    ``r`` to the memoised result, or to ``_ABSENT`` when there is none."""
    if not memo:  # a primitive node: its own value
        return [
            "if node.__class__ is str:",
            "    mk = node",
            f"    r = memo{i}.get(mk, _ABSENT)",
            "else:",
            "    mk = None",
            "    r = _ABSENT",
        ]
    values = [f"v{j}" for j in range(len(memo))]
    lines = [f"{v} = node.get({k!r}, _ABSENT)" for v, k in zip(values, memo, strict=True)]
    usable = " and ".join(f"{v}.__class__ in _KEY_CLASSES" for v in values)
    key = values[0] if len(values) == 1 else "(" + ", ".join(values) + ")"
    return [
        *lines,
        f"if {usable}:",
        f"    mk = {key}",
        f"    r = memo{i}.get(mk, _ABSENT)",
        "else:",
        "    mk = None",
        "    r = _ABSENT",
    ]


def _evaluation(i: int, memo: tuple[str, ...] | None) -> list[str]:
    """Source that evaluates check ``i`` on ``node`` and reports it (through its memo, if any)."""
    report = f'issues.append(Issue(s{i}, "invariant", m{i}, render(path)))'
    if memo is None:
        return [
            "try:",
            f"    r = c{i}.test(node, env)",
            "except Exception as exc:",
            f"    issues.append(_not_evaluated(n{i}, exc, path))",
            "else:",
            "    if r is False:",
            f"        {report}",
        ]
    return [
        *_memo_lookup(i, memo),
        "if r is _ABSENT:",
        "    try:",
        f"        r = c{i}.test(node, env)",
        "    except Exception as exc:",  # reported each time: never memoised
        f"        issues.append(_not_evaluated(n{i}, exc, path))",
        "        r = None",
        "    else:",
        f"        if mk is not None and len(memo{i}) < _MEMO_SIZE:",
        f"            memo{i}[mk] = r",
        "if r is False:",
        f"    {report}",
    ]


def _generate(checks: tuple[Check, ...]) -> RunFn:
    names: dict[str, Any] = {
        "Issue": Issue,
        "render": render,
        "_not_evaluated": _not_evaluated,
        "_ABSENT": _ABSENT,
        "_KEY_CLASSES": _KEY_CLASSES,
        "_MEMO_SIZE": _MEMO_SIZE,
    }
    lines = ["def run(node, path, env, issues):"]
    for i, (key, severity, message, fn, keys, absent, decisive, memo) in enumerate(checks):
        names.update({f"c{i}": fn, f"k{i}": keys, f"s{i}": severity, f"m{i}": message, f"n{i}": key})
        if memo is not None:
            memo_of_check: dict[Any, Any] = {}  # per runner: a memo key holds values, not the context
            names[f"memo{i}"] = memo_of_check
            _MEMOS.append(memo_of_check)
        tests = []
        for j, found in enumerate(decisive):  # evaluated only when every decisive name is present
            names[f"d{i}_{j}"] = found
            tests.append(f"({_present(found, f'd{i}_{j}')})")
        body = _evaluation(i, memo)
        if keys is not None and absent is False:
            if tests:
                body = [f"if {' and '.join(tests)}:", *("    " + line for line in body)]
            body = [f"if {_present(keys, f'k{i}')}:", *("    " + line for line in body)]
            body += ["else:", f'    issues.append(Issue(s{i}, "invariant", m{i}, render(path)))']
        elif tests or keys is not None:
            # The decisive names first: mostly absent (eld-5, eld-6, ...), one test decides.
            if keys is not None:
                tests.append(f"({_present(keys, f'k{i}')})")
            body = [f"if {' and '.join(tests)}:", *("    " + line for line in body)]
        lines += ["    " + line for line in body]
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
