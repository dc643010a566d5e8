"""adapter.fhir.fhirpath_codegen: the generated ``Compiled.test`` gives what the closures give.

Each expression covers a construct the generator handles (or delegates); each is evaluated both
ways on nodes chosen for the cases where the two could part: empty and several items, primitives
with a ``_name`` part (Prim), choice types, nulls in arrays, an empty key, values of the wrong
type (errors must be the same, message included).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapter.fhir import fhirpath as fp
from adapter.fhir.fhirpath import Env, Prim
from adapter.fhir.fhirpath_codegen import generate, generated_test
from adapter.fhir.json_format import loads

SAMPLE = Path(__file__).parent / "data" / "r4-examples"
EXT = {"extension": [{"url": "http://e.org/x", "valueString": "v"}]}

#: Expressions, by construct.
EXPRESSIONS = [
    # member navigation, exists() and empty(), choice types, _name parts
    "a.exists()",
    "a.empty()",
    "value.exists()",
    "value.empty() and a.b.exists()",
    "a.b.c.exists()",
    "a.b.empty() or a.c.exists()",
    "a.extension.exists() or a.id.exists()",
    "a.hasValue()",
    "a.first().hasValue()",
    # logic: three-valued and, or, xor, implies, not()
    "b and c",
    "b or c or a.exists()",
    "b xor c",
    "b implies c",
    "(b and c).not()",
    "a.exists().not() implies b",
    "(a.exists() or b) and (c or a.empty())",
    # equality and comparison
    "a = 'x'",
    "a != 'x'",
    "a = 5",
    "a.b = 'x'",
    "$this = '*'",
    "a.exists() = b.exists()",
    "a.exists() != b",
    "%resource.c = 'x'",
    "min <= max.toInteger()",
    "empty() or ($this = '*') or (toInteger() >= 0)",
    "a > 1",
    "a.count() <= 1",
    "min.empty() or max.empty() or (max = '*') or iif(max != '*', min <= max.toInteger())",
    # functions
    "iif(a.exists(), b, c)",
    "a.iif(b.exists(), c.exists())",
    "a.all(b.exists())",
    "a.exists(b = 'x')",
    "a.where(b = 'x').count() = 1",
    "a.where(b.exists()).c.empty() and a.where(b.exists()).d.empty()",
    "a.select(b).isDistinct()",
    "a.select(b = 'x').exists()",
    "a.tail().all(b.exists())",
    "a.b.isDistinct()",
    "a.combine(b).isDistinct()",
    "a.union(b).count() = 2",
    "(a | b).count() > 1",
    "children().count() > id.count()",
    "children().a.empty()",
    "descendants().b.exists()",
    "children().count() > 1",
    "a.trace('t').exists()",
    "%rootResource.contained.id.exists()",
    "a.startsWith('x')",
    "a.endsWith('y')",
    "a.contains('.')",
    "a.matches('^x')",
    "a.b.matches('^[a-z]+$')",
    "a.startsWith(b)",
    "a.all(b.startsWith(%resource.c.first() & '.'))",
    "a.all(matches('^x') or matches('y$'))",
    "a.matches(b)",
    "$this.startsWith(%resource.c.first())",
    "(a & b) = 'xy'",
    "'abc'.exists() and true",
    "{}.empty()",
    "a = 1.5",
    "not() or a.not()",
    "count() = 1 and children().exists() and descendants().count() > 2",
    "children().where(a.exists()).count() > 0 or children().id.exists()",
    "a.children().b.exists() or a.descendants().c.exists()",
    "a.where($index > 0).exists()",
    "trace('t').exists()",
    "a.all(%resource.c.exists() and b.exists())",
    "a | b and c",
    "a.first() and b",
    "a.all(b.startsWith('x'))",
    # delegated to the closures
    "value is Quantity",
    "a.b in c",
    "a + 1 > 2",
    "a[0].b.exists()",
    "a.distinct().count() = 1",
    "a.ofType(string).exists()",
    "a ~ 'X'",
    "%context.a.exists()",
    "Patient.a.exists()",
    "a.allTrue()",
]

#: Nodes, by case.
NODES: list[Any] = [
    {},
    {"a": "x", "b": True, "c": False},
    {"a": "x", "b": "y", "min": 1, "max": "*"},
    {"a": ["x", "y"], "b": None, "c": True},
    {"a": [{"b": "x", "c": 1}, {"b": "y", "d": "z"}], "b": True},
    {"a": {"b": {"c": "x"}}, "min": 2, "max": "1"},
    {"a": "x", "_a": EXT},
    {"_a": {"id": "1", **EXT}},
    {"a": ["x", None], "_a": [None, EXT]},
    {"a": [None], "_a": [{"id": "1"}]},
    {"valueString": "v"},
    {"valueQuantity": {"value": 5, "unit": "mg"}},
    {"value": [], "valueString": "v"},
    {"_value": None, "valueCode": "c"},
    {"": "x", "valueString": "v"},
    {"a": [], "b": None},
    {"a": 5, "min": "x", "max": "1"},
    {"a": ["x", "x"], "b": [{"c": 1}]},
    {"a": [{"b": "x"}, {"b": "x"}], "c": "x"},
    {"a": [{"b": "x.y"}, {"b": 1}], "c": "x", "min": 0, "max": "12"},
    {"a": ".x", "b": ".", "c": [1, 2]},
    {"a": {"b": ["p", "q"]}, "b": [{"b": "x"}]},
    {"a": [1, 2, 3], "min": 1, "max": "2", "id": "i"},
    {"a": [{"b": "x.y"}], "c": {"first": "x"}},
    {"a": [[1], [1]], "b": [1.5]},
    "x",
    "*",
    "12",
    3,
    True,
    Prim("x", {"id": "1"}),
    Prim(None, EXT),
    [{"a": 1}, {"a": 2}],
    [],
    None,
]

RESOURCE = {"resourceType": "Patient", "c": ["x.y"], "contained": [{"resourceType": "Patient", "id": "p"}]}


def outcome(test: Callable[[Any, Env], Any], node: Any, env: Env | None = None) -> Any:
    """The result, or the error's class and message."""
    env = env if env is not None else Env(resource=RESOURCE)
    try:
        return ("ok", test(node, env))
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_generated_test_gives_the_closures_result(expression: str) -> None:
    compiled = fp.compile_expression(expression)
    generated = generated_test(compiled)
    for node in NODES:
        assert outcome(generated, node) == outcome(compiled.closure_test, node), (expression, node)


def delegations(expression: str, node: Any) -> list[str]:
    """The closures the generated code for a JSON object calls while it evaluates ``node``."""
    compiled = fp.compile_expression(expression)
    generated = generate(expression, compiled._ast, compiled.typed, compiled.context, "dict")
    called: list[str] = []

    def recorder(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            called.append(name)
            return fn(*args)

        return call

    namespace = dict(generated.names, _slow=compiled.closure_test, _other=compiled.closure_test)
    for name in generated.delegated:
        namespace[name] = recorder(name, namespace[name])
    exec(compile(generated.source, expression, "exec"), namespace)
    assert namespace["test"](node, Env(resource=RESOURCE)) == compiled.closure_test(node, Env(resource=RESOURCE))
    return called


def test_common_cases_run_generated_code_only() -> None:
    element = {"path": "A.b", "min": 0, "max": "1", "type": [{"code": "string"}, {"code": "code"}]}
    for expression, node in [
        ("min.empty() or max.empty() or (max = '*') or iif(max != '*', min <= max.toInteger())", element),
        ("type.select(code).isDistinct()", element),
        ("path.matches('^[A-Z]') and path.contains('.')", element),
        ("a.where(b.exists()).c.empty() and a.where(b.exists()).d.empty()", {"a": [{"b": 1, "c": 2}, {"d": 3}]}),
        ("a.all(b = 'x') implies (c | d).count() > 1", {"a": [{"b": "x"}], "c": "y"}),
        ("children().a.empty() and descendants().b.exists()", {"x": {"a": 1}, "y": [{"b": 2}]}),
        ("value.exists() xor a.hasValue()", {"valueString": "v", "a": "x", "_a": EXT}),
    ]:
        assert delegations(expression, node) == [], expression


def test_unsupported_constructs_fall_back_to_the_closures() -> None:
    assert delegations("a + 1 > 2", {"a": 5}) != []
    assert delegations("value is Quantity", {"valueQuantity": {"value": 1}}) != []
    # The rare cases of an inlined fast path call the closure too (a primitive array with nulls).
    assert delegations("a.exists()", {"a": [None], "_a": [{"id": "1"}]}) != []


def test_too_deep_a_nesting_for_python_keeps_the_closures() -> None:
    expression = " or ".join(f"a{i}.exists()" for i in range(120))  # an else: block per operand
    compiled = fp.compile_expression(expression)
    assert generated_test(compiled) == compiled.closure_test
    assert compiled.closure_test({"a119": 1}, Env()) is True


def test_test_is_generated_after_a_few_evaluations() -> None:
    tree = fp.parse_fhirpath("b or c")
    compiler = fp._Compiler(False)
    compiled = fp.Compiled("b or c", tree, compiler.compile(tree), compiler.compile_bool(tree), False, False)
    for _ in range(fp._GENERATE_AFTER - 1):
        assert compiled.test({"b": True}, Env()) is True
    assert getattr(compiled.test, "__self__", None) is compiled  # still the closures
    assert compiled.test({"c": False}, Env()) is None
    assert getattr(compiled.test, "__self__", None) is None  # generated
    assert compiled.test({"c": False}, Env()) is None
    assert compiled.test({"b": False, "c": True}, Env()) is True


def test_sample_invariants_give_the_closures_results() -> None:
    from bench.fhirpath_invariants import targets_of

    generated: dict[str, Callable[[Any, Env], Any]] = {}
    compared = 0
    for path in sorted(SAMPLE.glob("*.json")):
        resource = loads(path.read_bytes())
        # Each side with its own Envs (their caches), on the same nodes.
        for new, old in zip(targets_of(resource), targets_of(resource), strict=True):
            compiled = fp.compile_expression(new.expression)
            test = generated.get(new.expression)
            if test is None:
                test = generated[new.expression] = generated_test(compiled)
            got = outcome(test, new.node, new.env)
            assert got == outcome(compiled.closure_test, old.node, old.env), (path.name, new.key, new.path)
            compared += 1
    assert compared > 10_000
