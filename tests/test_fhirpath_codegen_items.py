"""Generated navigation over several items, and property reads shared between tests (#2).

The generated code navigates a member of a collection that is not one JSON object
(``children().element``, ``snapshot.element.type.code``) in a loop of its own, and reads a
property of a JSON object once per block; these compare it with the closures on the shapes
navigation meets: lists of objects, objects, primitives with and without ``_name`` parts,
choice types, nulls, empty lists, primitives and :class:`Prim` items among the objects.
"""

from __future__ import annotations

from typing import Any

import pytest

from adapter.fhir import fhirpath as fp
from adapter.fhir.fhirpath import Env, Prim
from adapter.fhir.fhirpath_codegen import generated_test
from tests.test_fhirpath_codegen import EXT, delegations, outcome

EXPRESSIONS = [
    "a.b.exists()",
    "a.b.c.count() = 2",
    "a.value.exists()",
    "a.b.isDistinct()",
    "children().b.empty()",
    "children().a.b.count()",
    "(a | c).b.all($this = 'x')",
    "a.where(b.exists()).b.count() > 1",
    "a.b.all(matches('^[a-z]+$'))",
    "a.id.count() + a.extension.count() > 0",
    "a.b.extension.exists() or a.b.id.count() > 1",
    "children().b.extension.url.count() = 1",
    "min.exists() and max.exists() and (max = '*' or min <= max.toInteger())",
    "a.exists() and a.b.empty() and a = 'x'",
    "b.isDistinct() and c.isDistinct()",
]

ITEMS: list[Any] = [
    {"b": "x"},
    {"b": "y", "_b": EXT},
    {"_b": {"id": "1"}},
    {"b": [{"c": 1}, {"c": 2}]},
    {"b": {"c": 3}},
    {"b": ["x", None], "_b": [None, EXT]},
    {"b": [None], "_b": [{"id": "2"}]},
    {"b": []},
    {"b": None},
    {"valueString": "v"},
    {"valueQuantity": {"value": 1}},
    {"value": [], "valueCode": "c"},
    {},
    "s",
    5,
    Prim("p", {"id": "3", **EXT}),
    Prim("q", None),
]

NODES: list[Any] = [
    {"a": [ITEMS[i], ITEMS[j]], "c": ITEMS[k], "min": 1, "max": m}
    for i in range(len(ITEMS))
    for j in (0, 3, 5, 12, 15)
    for k in (0, 4, 13)
    for m in ("*", "2", "0")
]
NODES += [{"x": item, "y": [item, item]} for item in ITEMS if item.__class__ is dict]
NODES += [{"a": [], "b": ["x", "x"], "c": [1, 2]}, {"a": "x", "_a": EXT}, {"a": "x"}, {}]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_generated_navigation_over_items_gives_the_closures_result(expression: str) -> None:
    compiled = fp.compile_expression(expression)
    generated = generated_test(compiled)
    for node in NODES:
        assert outcome(generated, node, Env()) == outcome(compiled.closure_test, node, Env()), (expression, node)


def test_navigation_over_objects_runs_generated_code_only() -> None:
    elements = {"snapshot": {"element": [{"type": [{"code": "a"}, {"code": "b"}]}, {"type": {"code": "c"}}]}}
    assert delegations("snapshot.element.type.code.all(matches('^[a-z]+$'))", elements) == []
    assert delegations("children().element.where(type.exists()).type.count() = 3", elements) == []
