"""R4 invariants over the official examples: ``adapter.fhir.fhirpath`` against fhirpathpy.

Run from the repository root: ``python -m bench.fhirpath_invariants [--fhirpathpy-sample N] [--limit N]``.

Every invariant (``constraints`` in ``r4-types.json``) is evaluated on every node it applies to:
the walk follows each resource with :mod:`adapter.fhir.model` (choice ``[x]`` elements, datatypes,
backbone elements, content references, contained and Bundle entry resources, the extensions of
primitives); a node gets the constraints of its element and of its type's root element (per-1 on
every Period, wherever it is), de-duplicated by key and expression. Bundle entries resolve
references within their Bundle; contained resources have the container as %rootResource.

Both evaluators run on the same targets; fhirpathpy is given the R4 model (``fhirpathpy.models``),
each node as a typed ``ResourceNode`` (type name, or element path for backbone elements), and a
``hasValue()`` shim (fhirpathpy has none). fhirpathpy is slow (tens of microseconds per
evaluation), so by default it runs on every ``--fhirpathpy-sample``-th resource only; pass 1 for all.
Prints evaluations/s for each, the speed ratio on the common sample, the results that differ where
fhirpathpy succeeds, fhirpathpy's failures by reason, and the invariants that come out False.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapter.fhir import fhirpath, model
from adapter.fhir.json_format import loads
from bench.corpus import example_files, official_examples

RESOURCE_TYPES = ("Resource", "DomainResource")


@dataclass(slots=True)
class Target:
    """One invariant to evaluate on one node."""

    key: str
    expression: str
    node: Any
    path: str  # instance path, for reports
    type_path: str  # fhirpathpy type: type name, or element path for backbone elements
    env: fhirpath.Env


def _constraints(*elements: model.ElementDef | None) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for element in elements:
        if element is None:
            continue
        for c in element.raw.get("constraints", ()):
            seen.setdefault((c["key"], c["expression"]), None)
    return list(seen)


def _items(node: dict[str, Any], name: str) -> list[Any]:
    out: list[Any] = []
    fhirpath._merge(node.get(name), node.get("_" + name), out)
    return out


def _names(node: dict[str, Any]) -> list[str]:
    names: dict[str, None] = {}
    for key in node:
        if key != "resourceType":
            names.setdefault(key[1:] if key.startswith("_") else key, None)
    return list(names)


class Walker:
    """Yields a Target for every (invariant, node) pair of a resource."""

    def __init__(self) -> None:
        self.targets: list[Target] = []

    def resource(self, res: Any, path: str, root: Any = None, resolve: Callable[[str], Any] | None = None) -> None:
        rt = res.get("resourceType") if isinstance(res, dict) else None
        if not isinstance(rt, str) or not model.is_resource_type(rt):
            return
        if rt == "Bundle":
            resolve = fhirpath.bundle_resolver(res)
        env = fhirpath.Env(resource=res, root_resource=root if root is not None else res, resolve=resolve)
        ctx = model.context_for(rt)
        self.emit(res, _constraints(ctx.element), path, rt, env)
        self.complex(res, ctx, path, env)

    def emit(self, node: Any, constraints: list[tuple[str, str]], path: str, type_path: str, env: Any) -> None:
        for key, expression in constraints:
            self.targets.append(Target(key, expression, node, path, type_path, env))

    def complex(self, node: dict[str, Any], ctx: model.Context, path: str, env: fhirpath.Env) -> None:
        children = ctx.children
        for name in _names(node):
            child = children.get(name)
            if child is None:
                continue
            for i, item in enumerate(_items(node, name)):
                self.child(item, child, f"{path}.{name}[{i}]", env)

    def child(self, item: Any, child: model.Child, path: str, env: fhirpath.Env) -> None:
        code = child.type_code
        if code in RESOURCE_TYPES:
            contained = child.element.path.endswith(".contained")
            root = env.root_resource if contained else None
            self.resource(item, path, root, env.resolve)
            return
        if child.is_primitive:
            own = model.context_for(code).element if model.has_type(code) else None
            self.emit(item, _constraints(child.element, own), path, code, env)
            if isinstance(item, fhirpath.Prim) and item.ext is not None:
                ext_child = model.context_for(code).children.get("extension") if own else None
                for j, ext in enumerate(_items(item.ext, "extension")):
                    if ext_child is not None:
                        self.child(ext, ext_child, f"{path}.extension[{j}]", env)
            return
        if not isinstance(item, dict):
            return
        sub = child.context()
        self.emit(item, _constraints(child.element, sub.element), path, sub.path, env)
        self.complex(item, sub, path, env)


def targets_of(resource: Any, name: str = "") -> list[Target]:
    walker = Walker()
    walker.resource(resource, name or str(resource.get("resourceType")))
    return walker.targets


# ---------------------------------------------------------------------------------------------
# fhirpathpy
# ---------------------------------------------------------------------------------------------


def _fp_has_value(inputs: list[Any]) -> list[bool]:
    # fhirpathpy yields a primitive and its _name object as two nodes; ignore the latter.
    items = [i for i in inputs if not (isinstance(i, dict) and set(i) <= {"extension", "id"})] or inputs
    return [len(items) == 1 and not isinstance(items[0], dict)]


class FhirpathPy:
    """fhirpathpy with the R4 model, a hasValue() shim and trace() silenced."""

    def __init__(self) -> None:
        from fhirpathpy import compile as fp_compile
        from fhirpathpy.engine.nodes import ResourceNode
        from fhirpathpy.models import models

        self._compile: Any = fp_compile
        self._node: Any = ResourceNode.create_node
        self._model = models["r4"]
        self._options = {
            "userInvocationTable": {"hasValue": {"fn": _fp_has_value}},
            "traceFn": lambda *args: None,
        }
        self._cache: dict[str, Any] = {}

    def compiled(self, expression: str) -> Any:
        fn = self._cache.get(expression)
        if fn is None:
            fn = self._compile(expression, model=self._model, options=self._options)
            self._cache[expression] = fn
        return fn

    def node(self, target: Target) -> Any:
        data = target.node
        if isinstance(data, fhirpath.Prim):
            data = data.value if data.value is not None else data.ext
        return self._node(data, target.type_path)

    def context(self, env: fhirpath.Env) -> dict[str, Any]:
        res, root = env.resource, env.root_resource
        return {
            "resource": self._node(res, res.get("resourceType")),
            "rootResource": self._node(root, root.get("resourceType")),
        }

    def evaluate(self, target: Target, node: Any, context: dict[str, Any]) -> Any:
        """True/False/None, or an Exception instance when fhirpathpy fails."""
        try:
            result = self.compiled(target.expression)(node, context)
        except Exception as exc:
            return exc
        return to_bool3(result)


def to_bool3(result: list[Any]) -> Any:
    if not result:
        return None
    if len(result) == 1:
        value = getattr(result[0], "data", result[0])
        return value if isinstance(value, bool) else True
    return ValueError(f"{len(result)} items")


NATIVE = frozenset({"ele-1", "ext-1", "txt-1", "txt-2"})


def time_per_key(targets: list[Target]) -> dict[str, tuple[float, int]]:
    """Seconds and evaluations per invariant key (each key timed as one batch)."""
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        groups[t.key].append(t)
    out: dict[str, tuple[float, int]] = {}
    for key, group in groups.items():
        started = time.perf_counter()
        for t in group:
            ours(t)
        out[key] = (time.perf_counter() - started, len(group))
    return out


def ours(target: Target) -> Any:
    try:
        return fhirpath.evaluate_invariant(target.expression, target.node, target.env)
    except fhirpath.FHIRPathError as exc:
        return exc


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    evaluations: int = 0
    seconds: float = 0.0
    fp_evaluations: int = 0
    fp_seconds: float = 0.0
    ours_on_sample_seconds: float = 0.0
    compared: int = 0


@dataclass
class Comparison:
    """Result of running both evaluators on the same targets."""

    differ: list[tuple[Target, Any, Any]]  # (target, ours, fhirpathpy) where fhirpathpy succeeds
    failures: Counter[str]  # fhirpathpy failures by reason
    timing: dict[str, tuple[float, float, int]]  # key -> (ours s, fhirpathpy s, evaluations)

    def totals(self, keys: set[str] | None = None) -> tuple[float, float, int]:
        rows = [v for k, v in self.timing.items() if keys is None or k in keys]
        return sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows)


def compare(targets: list[Target], fp: FhirpathPy) -> Comparison:
    """Run both evaluators, each invariant key timed as one batch per evaluator."""
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        groups[t.key].append(t)
    result = Comparison([], Counter(), {})
    for key, group in groups.items():
        prepared = [(t, fp.node(t), fp.context(t.env)) for t in group]
        started = time.perf_counter()
        mine = [ours(t) for t in group]
        ours_time = time.perf_counter() - started
        started = time.perf_counter()
        theirs = [fp.evaluate(t, node, ctx) for t, node, ctx in prepared]
        result.timing[key] = (ours_time, time.perf_counter() - started, len(group))
        for t, a, b in zip(group, mine, theirs, strict=True):
            if isinstance(b, Exception):
                result.failures[f"{t.key}: {type(b).__name__}: {str(b)[:80]}"] += 1
            elif a != b or isinstance(a, Exception):
                result.differ.append((t, a, b))
    return result


def _rates(label: str, ours_s: float, fp_s: float, n: int) -> str:
    return (
        f"{label}: {n} evaluations; fhirpathpy {n / fp_s:,.0f}/s ({fp_s / n * 1e6:.1f} us each), "
        f"ours {n / ours_s:,.0f}/s ({ours_s / n * 1e6:.2f} us each), ratio {fp_s / ours_s:.1f}x"
    )


def load_corpus(limit: int | None = None) -> list[tuple[str, Any]]:
    folder = official_examples()
    if folder is None:
        sys.exit("official R4 examples not available (see bench/corpus.py)")
    files = example_files(folder)[:limit]
    return [(p.name, loads(p.read_bytes())) for p in files]


def compile_report() -> tuple[int, int, dict[str, str]]:
    """(distinct expressions, compiled, {key: reason} for the unsupported ones)."""
    expressions: dict[str, str] = {}
    for _, _, c in fhirpath.iter_constraints():
        expressions.setdefault(c["expression"], c["key"])
    failed: dict[str, str] = {}
    for text, key in expressions.items():
        try:
            fhirpath.compile_expression(text)
        except fhirpath.UnsupportedExpression as exc:
            failed[key] = str(exc)
    return len(expressions), len(expressions) - len(failed), failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fhirpathpy-sample", type=int, default=5, help="every Nth resource (1 = all)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N example files")
    args = parser.parse_args(argv)

    total, ok, failed = compile_report()
    print(f"invariant expressions: {total} distinct, {ok} compiled, {len(failed)} unsupported")
    for key, reason in sorted(failed.items()):
        print(f"  {key}: {reason}")

    corpus = load_corpus(args.limit)
    per_resource = [(name, targets_of(res, name)) for name, res in corpus]
    all_targets = [t for _, ts in per_resource for t in ts]
    print(f"\n{len(corpus)} resources, {len(all_targets)} invariant evaluations")

    started = time.perf_counter()
    results = [ours(t) for t in all_targets]
    elapsed = time.perf_counter() - started
    rate = len(all_targets) / elapsed
    print(
        f"adapter.fhir.fhirpath: {elapsed:.2f} s, {rate:,.0f} evaluations/s, "
        f"{elapsed / len(corpus) * 1e3:.3f} ms/resource"
    )

    per_key = time_per_key(all_targets)
    rest = [(seconds, count) for key, (seconds, count) in per_key.items() if key not in NATIVE]
    rest_seconds, rest_count = sum(s for s, _ in rest), sum(n for _, n in rest)
    print(
        f"  without {', '.join(sorted(NATIVE))} (evaluated natively by adapter.validation): "
        f"{rest_count} evaluations, {rest_seconds:.2f} s, {rest_count / rest_seconds:,.0f} evaluations/s, "
        f"{rest_seconds / len(corpus) * 1e3:.3f} ms/resource"
    )
    print("  slowest invariants (total s, count, us each):")
    for key, (seconds, count) in sorted(per_key.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"    {key:8s} {seconds:6.2f} s {count:9d} {seconds / count * 1e6:8.2f}")

    by_key: Counter[str] = Counter(t.key for t in all_targets)
    false: dict[str, list[str]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    for t, r in zip(all_targets, results, strict=True):
        if r is False:
            false[t.key].append(t.path)
        elif isinstance(r, Exception):
            errors[t.key].append(f"{t.path}: {r}")
    print("\nmost evaluated:", ", ".join(f"{k} {n}" for k, n in by_key.most_common(8)))
    print(f"\nFalse with adapter.fhir.fhirpath ({sum(map(len, false.values()))}):")
    for key in sorted(false):
        paths = false[key]
        print(f"  {key} x{len(paths)}: {', '.join(paths[:6])}{' ...' if len(paths) > 6 else ''}")
    print(f"errors with adapter.fhir.fhirpath ({sum(map(len, errors.values()))}):")
    for key in sorted(errors):
        print(f"  {key} x{len(errors[key])}: {errors[key][0]}")

    sample = [t for i, (_, ts) in enumerate(per_resource) if i % args.fhirpathpy_sample == 0 for t in ts]
    fp = FhirpathPy()
    with contextlib.redirect_stdout(sys.stderr):
        result = compare(sample, fp)
    failures, differ = result.failures, result.differ
    print(f"\nfhirpathpy on every {args.fhirpathpy_sample}th resource (each key timed as a batch):")
    print("  " + _rates("all", *result.totals()))
    failing = {reason.split(":")[0] for reason in failures}
    common = {key for key in result.timing if key not in failing}
    print("  " + _rates("invariants fhirpathpy can evaluate", *result.totals(common)))
    print("  most evaluated:")
    for key, (ours_s, fp_s, n) in sorted(result.timing.items(), key=lambda kv: -kv[1][2])[:10]:
        print("    " + _rates(f"{key:8s}", ours_s, fp_s, n))
    print(f"fhirpathpy failed on {sum(failures.values())} evaluations:")
    for reason, count in failures.most_common(25):
        print(f"  {count:6d}  {reason}")
    print(f"disagreements where fhirpathpy succeeds: {len(differ)}")
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for t, a, b in differ:
        grouped[(t.key, f"ours={a!r} fhirpathpy={b!r}")].append(t.path)
    for (key, what), paths in sorted(grouped.items()):
        print(f"  {key} {what} x{len(paths)}: {', '.join(paths[:4])}")


if __name__ == "__main__":
    main()
