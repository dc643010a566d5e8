"""The generated invariant runner reports what the loop over the checks reports (#2)."""

from __future__ import annotations

from typing import Any

import pytest

from adapter.fhir.fhirpath import Env
from adapter.validation.base import Issue
from adapter.validation.invariants import _GENERATE_AFTER, Check, _check, _generate, runner_for


class _Fn:
    def __init__(self, result: Any) -> None:
        self.result = result

    def test(self, node: Any, env: Env) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


MANY = frozenset(f"value{n}" for n in range(12))
CHECKS = (
    Check("a-1", "error", "a-1: always runs, false", _Fn(False), None, None),
    Check("a-2", "warning", "a-2: keyed, false", _Fn(False), frozenset({"min", "_min"}), None),
    Check("a-3", "error", "a-3: keyed, false when absent", _Fn(True), frozenset({"max"}), False),
    Check("a-4", "error", "a-4: many keys, raises", _Fn(ValueError("boom")), MANY, None),
    Check("a-5", "error", "a-5: no keys, absent false", _Fn(True), frozenset(), False),
    Check("a-6", "error", "a-6: empty result", _Fn(None), None, None),
)
NODES = [{}, {"min": 1}, {"_min": {}}, {"max": "*"}, {"value3": 1}, {"min": 0, "max": "1", "value11": 2}, {"x": 1}]


@pytest.mark.parametrize("node", NODES, ids=[str(n) for n in NODES])
def test_generated_runner_matches_the_loop(node: dict[str, Any]) -> None:
    expected: list[Issue] = []
    _check(node, CHECKS, ("Patient", ".x"), Env(), expected)
    found: list[Issue] = []
    _generate(CHECKS)(node, ("Patient", ".x"), Env(), found)
    assert found == expected
    assert any(i.diagnostics.startswith("Invariant a-4 could not be evaluated: boom") for i in found) == (
        "value3" in node or "value11" in node
    )


def test_runner_switches_to_generated_code_and_is_shared() -> None:
    runner = runner_for(CHECKS)
    assert runner is not None and runner_for(CHECKS) is runner and runner_for(()) is None
    for _ in range(_GENERATE_AFTER + 1):
        issues: list[Issue] = []
        runner.run({"max": "*"}, "Patient", Env(), issues)
        assert [i.diagnostics[:3] for i in issues] == ["a-1", "a-5"]
    assert runner.run != runner._warming
