"""The invariant shortcuts of issue #2 report what evaluating every invariant reports.

Decisive absence (``binding.empty() or ...`` on a node without ``binding``), the memo of results
by the values an expression reads, and the runner for nodes without ``_name`` properties: each
is compared with the loop over the checks (:func:`adapter.validation.invariants._check`), which
evaluates every expression.
"""

from __future__ import annotations

from typing import Any

import pytest

from adapter.fhir import model
from adapter.fhir.fhirpath import Env, parse_tree
from adapter.validation.base import Issue
from adapter.validation.invariants import (
    Check,
    _check,
    _decisive,
    _generate,
    _without_extensions,
    checks_for,
    elements_for,
)
from adapter.validation.structure import StructuralValidator, _table


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        ("binding.empty() or type.code.empty() or type.select(code = 'code').exists()", ("binding", "type")),
        ("min.empty() or max.empty() or (max = '*')", ("min", "max")),
        ("contained.where(id.exists()).trace('x', id).empty()", ("contained",)),
        # After a path that may raise when present, later operands may never be evaluated.
        ("contained.where(id = 1).empty() or b.empty()", ("contained",)),
        ("sliceIsConstraining.exists() implies sliceName.exists()", ("sliceIsConstraining",)),
        # Not decisive: a type name may stand for the node; count() is not empty for an empty input.
        ("Patient.empty() or a.exists()", ()),
        ("a.count().empty() or b.empty()", ()),
        ("(a.exists() and a) implies b.exists()", ()),
        ("a.exists() or b.empty()", ()),
    ],
)
def test_decisive_names(expression: str, names: tuple[str, ...]) -> None:
    assert _decisive(parse_tree(expression)) == names


def _element_definition_checks() -> tuple[Check, ...]:
    ctx = model.context_for("ElementDefinition")
    return checks_for(elements_for(ctx, None), _table(ctx).names)


ELEMENTS: list[dict[str, Any]] = [
    {"path": "Patient.name", "min": 0, "max": "*"},
    {"path": "Patient.name", "min": 2, "max": "1"},  # eld-2
    {"path": "Patient.name", "min": 2, "max": "1"},  # the same, from the memo
    {"path": "...", "min": 0},  # eld-19, eld-20 (matches() finds a match anywhere)
    {"path": "...", "min": 0},
    {"path": "X.y", "fixedUri": "http://x.org", "type": [{"code": "uri"}, {"code": "url"}]},  # eld-6
    {"path": "X.y", "type": [{"code": "uri"}, {"code": "url"}]},  # fixed absent: eld-6 holds
    {"path": "X.y", "binding": {"strength": "required"}, "type": [{"code": "Period"}]},  # eld-11 evaluated
    {"path": "X.y", "type": [{"code": "Period"}]},
    {"path": "X.y", "min": "0", "max": 1},  # strings and integers swapped: other memo keys
    {"path": "X.y", "min": True, "max": "1"},  # a Boolean: never a memo key (True == 1)
    {"path": "X.y", "min": 1, "max": "1"},
    {"path": "X.y", "min": {"x": 1}, "max": "1"},
    {"path": ["X.y"], "min": 0},
    {"path": "X.y", "_path": {"extension": [{"url": "http://x.org", "valueString": "a"}]}},
    {"_path": {"id": "p"}, "min": 1, "max": "0"},
    {"path": "X.y", "sliceName": "a b"},  # eld-16
    {"path": "X.y", "contentReference": "#a", "type": [{"code": "string"}]},  # eld-5
]


def _issues(run: Any, node: Any) -> list[Issue]:
    found: list[Issue] = []
    run(node, ("ElementDefinition", ".x"), Env(), found)
    return found


def test_generated_runners_report_what_the_loop_reports() -> None:
    checks = _element_definition_checks()
    assert any(check.decisive for check in checks) and any(check.memo for check in checks)
    run = _generate(checks)
    plain = _generate(tuple(_without_extensions(check) for check in checks))
    for _ in range(2):  # the second time round, the memo answers
        for node in ELEMENTS:
            expected: list[Issue] = []
            _check(node, checks, ("ElementDefinition", ".x"), Env(), expected)
            assert _issues(run, node) == expected, node
            if not any(key.startswith("_") for key in node):
                assert _issues(plain, node) == expected, node
    keys = {issue.diagnostics[:6] for node in ELEMENTS for issue in _issues(run, node)}
    assert {"eld-2:", "eld-5:", "eld-6:", "eld-16", "eld-19", "eld-20", "Invari"} <= keys


class _Raises:
    """A compiled expression stand-in that raises on some values and counts its evaluations."""

    def __init__(self) -> None:
        self.calls = 0

    def test(self, node: Any, env: Env) -> Any:
        self.calls += 1
        if node.get("min") == 0:
            raise ValueError("boom")
        return node.get("min") == 1


def test_the_memo_keeps_results_but_never_errors() -> None:
    fn = _Raises()
    check = Check("x-1", "error", "x-1: test", fn, frozenset({"min", "_min"}), None, (), ("_min", "min"))
    run = _generate((check,))
    found = [_issues(run, node) for node in ({"min": 0}, {"min": 0}, {"min": 2}, {"min": 2}, {"min": 1})]
    assert [[i.diagnostics for i in issues] for issues in found] == [
        ["Invariant x-1 could not be evaluated: boom"],
        ["Invariant x-1 could not be evaluated: boom"],
        ["x-1: test"],
        ["x-1: test"],
        [],
    ]
    assert fn.calls == 4  # the second {"min": 2} came from the memo; errors are evaluated again


def _profile(elements: list[dict[str, Any]]) -> dict[str, Any]:
    """A StructureDefinition of Patient whose snapshot has ``elements`` after the root."""
    return {
        "resourceType": "StructureDefinition",
        "url": "http://x.org/StructureDefinition/p",
        "name": "P",
        "status": "draft",
        "kind": "resource",
        "abstract": False,
        "type": "Patient",
        "snapshot": {"element": [{"path": "Patient", "min": 0, "max": "*"}, *elements]},
    }


def test_primitive_invariants_memoised_by_value_are_still_reported() -> None:
    """eld-3 on ``max`` (``empty() or ($this = '*') or (toInteger() >= 0)``) is memoised per
    string: a bad value is reported on every element that has it, before and after the runner
    is generated."""
    elements = [{"path": f"Patient.x{i}", "min": 0, "max": "*" if i % 2 else "-1"} for i in range(80)]
    issues = StructuralValidator().validate(_profile(elements))
    eld3 = [i.expression for i in issues if i.diagnostics.startswith("eld-3")]
    assert eld3 == [f"StructureDefinition.snapshot.element[{i + 1}].max" for i in range(0, 80, 2)]


def test_memos_are_emptied_after_each_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memo key holds strings of the resource it came from: kept after the resource, a few of
    them kept the allocator's arenas of a whole Bundle alive (peak RSS +22 MB on the R4 examples)."""
    import adapter.validation.structure as structure
    from adapter.validation import invariants

    profile = _profile([{"path": f"Patient.x{i}", "min": 0, "max": "1"} for i in range(80)])
    held: list[int] = []

    def count_then_clear() -> None:
        held.append(sum(len(memo) for memo in invariants._MEMOS))
        invariants.clear_memos()

    monkeypatch.setattr(structure, "clear_memos", count_then_clear)
    StructuralValidator().validate(profile)
    assert held and held[-1] > 0  # the memos worked during the walk
    assert all(not memo for memo in invariants._MEMOS)
