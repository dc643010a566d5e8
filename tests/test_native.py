"""Compiled modules (adapter/native.py, hatch_build.py, decision 0006).

The compiled structural walk must give exactly the issues of the plain Python one: both are run
in child processes (``SPFHIR_PURE_PYTHON=1`` for the plain one) over R4 examples and mutated
variants of them, and compared. The loader must use a compiled module only while its source is
the one it was built from.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapter.native import COMPILED, PURE_PYTHON, compiled_modules, prefer_compiled, source_digest
from adapter.validation.structure import MAX_DEPTH, StructuralValidator
from bench.corpus import example_files, official_examples

ROOT = Path(__file__).parent.parent
SAMPLE = sorted((ROOT / "tests" / "data" / "r4-examples").glob("*.json"))
_VALUES: list[Any] = [None, True, 0, -1, 2**40, "", " x ", "2020-13-01", [], {}, [None], {"id": "x"}, "bad ref", 1.5]


def _built() -> bool:
    """Whether this install should have compiled modules: the hook needs a C compiler."""
    return not os.environ.get(PURE_PYTHON) and (shutil.which("cc") or shutil.which("gcc")) is not None


def _mutants(doc: Any, rng: random.Random, count: int) -> list[Any]:
    """Variants of ``doc`` with wrong types, missing and unknown elements, nulls, arrays, _parts."""

    def nodes(value: Any, out: list[Any]) -> list[Any]:
        if isinstance(value, dict):
            out.append(value)
            for item in value.values():
                nodes(item, out)
        elif isinstance(value, list):
            for item in value:
                nodes(item, out)
        return out

    variants = []
    for _ in range(count):
        variant = copy.deepcopy(doc)
        for _ in range(rng.randint(1, 3)):
            node = rng.choice(nodes(variant, []))
            if not node:
                continue
            key = rng.choice(list(node))
            roll = rng.random()
            if roll < 0.4:
                node[key] = copy.deepcopy(rng.choice(_VALUES))
            elif roll < 0.55:
                del node[key]
            elif roll < 0.7:
                node["_" + key] = {"extension": [{"url": "http://e", "valueString": "v"}]}
            elif roll < 0.8:
                node[key + "x"] = 1
            elif roll < 0.9:
                node[key] = [node[key]] if not isinstance(node[key], list) else node[key][0] if node[key] else []
            else:
                node["extension"] = [{"url": "http://e", "valueCode": rng.choice(["a", " b"])}]
        variants.append(variant)
    return variants


def dump_issues(inputs: str, output: str) -> None:
    """Child process: the issues of each document of ``inputs`` (a JSON array) into ``output``."""
    from adapter.fhir.json_format import loads

    validator = StructuralValidator()
    results = []
    for doc in loads(Path(inputs).read_bytes()):
        issues, extended = validator.examine(doc)
        results.append([[i.severity, i.code, i.diagnostics, i.expression] for i in issues] + [extended])
    Path(output).write_text(json.dumps({"compiled": compiled_modules(), "results": results}))


def _run_child(inputs: Path, output: Path, pure: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != PURE_PYTHON}
    if pure:
        env[PURE_PYTHON] = "1"
    code = f"from tests.test_native import dump_issues; dump_issues({str(inputs)!r}, {str(output)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def _deep(depth: int) -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "http://e", "valueString": "v"}
    for _ in range(depth):
        extension = {"url": "http://e", "extension": [extension]}
    return {"resourceType": "Basic", "code": {"text": "x"}, "extension": [extension]}


def test_compiled_walk_gives_the_issues_of_the_plain_one(tmp_path: Path) -> None:
    from adapter.fhir.json_format import loads

    folder = official_examples()
    files = example_files(folder)[::6] if folder is not None else SAMPLE
    rng = random.Random(2)
    docs: list[Any] = []
    for path in files:
        doc = loads(path.read_bytes())
        docs += [doc, *_mutants(doc, rng, 2)]
    # nesting around the limit, and an xhtml with a '_' part (once a KeyError)
    docs += [_deep(MAX_DEPTH - 3), _deep(MAX_DEPTH + 5)]
    docs.append({"resourceType": "Basic", "code": {"text": "x"}, "text": {"status": "generated", "_div": {"id": 3}}})
    inputs = tmp_path / "docs.json"
    inputs.write_text(json.dumps(docs, default=str))
    compiled = _run_child(inputs, tmp_path / "compiled.json", pure=False)
    plain = _run_child(inputs, tmp_path / "plain.json", pure=True)
    assert plain["compiled"] == []
    if _built():  # the structural validator's compiled modules, the only ones the child imports
        walk = ["adapter.validation.paths", "adapter.validation.structure", "adapter.validation.xhtml"]
        assert compiled["compiled"] == walk
    assert len(compiled["results"]) == len(docs) > 300
    # each result is the issues, then whether an extension was met: the variants do have issues
    assert sum(len(r) - 1 for r in compiled["results"]) > len(docs)
    for doc, ours, theirs in zip(docs, compiled["results"], plain["results"], strict=True):
        assert ours == theirs, json.dumps(doc, default=str)[:300]


def test_compiled_modules_are_in_use_when_built() -> None:
    if not _built():
        pytest.skip(f"no C compiler, or {PURE_PYTHON} set: the modules run as plain Python")
    for module in COMPILED:
        importlib.import_module(module)
    assert compiled_modules() == list(COMPILED)


def test_nesting_beyond_the_limit_is_reported_not_a_crash() -> None:
    # Compiled, the walk's recursion does not count against Python's limit: 20,000 levels
    # overflowed the C stack (a segmentation fault) before MAX_DEPTH.
    validator = StructuralValidator()
    for depth in (MAX_DEPTH + 1, 20_000):
        issues = validator.validate(_deep(depth))
        assert [(i.code, i.diagnostics) for i in issues] == [
            ("too-costly", "The resource is nested too deeply to validate")
        ]
    issues = validator.validate(_deep(MAX_DEPTH - 3))  # resource, extension, then the nested ones
    assert not [i for i in issues if i.is_error]


_DEEPEST = """
import threading
from adapter.errors import InputTooLargeError
from adapter.fhir.json_format import loads
from adapter.search.index import index_values
from adapter.store._common import rewrite_references
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator

def text(depth):
    inner = '{"url":"http://e","valueString":"v"}'
    for _ in range(depth):
        inner = '{"url":"http://e","extension":[' + inner + ']}'
    return '{"resourceType":"Patient","extension":[' + inner + ']}'

depth = 100
while True:  # the deepest resource the JSON parser accepts
    try:
        loads(text(depth + 10).encode())
    except InputTooLargeError:
        break
    depth += 10
doc = loads(text(depth).encode())
found = []

def run():  # in a thread, as the store and the API run them
    found.append(len(index_values(doc).tokens))
    found.append(rewrite_references(doc, {}) == doc)
    issues = ProfileValidator(bundled_packages()).validate(doc, ["http://hl7.org/fhir/StructureDefinition/Patient"])
    found.append(sorted({i.code for i in issues if i.is_error}))

thread = threading.Thread(target=run)
thread.start()
thread.join()
print(depth, found)
"""


def test_the_deepest_json_the_parser_accepts_goes_through_the_compiled_modules() -> None:
    # The compiled modules recurse as C calls, which Python's recursion limit does not stop; what
    # they get comes from the parsers, whose nesting limits must come first (a crash would be a
    # signal, not an exception).
    out = subprocess.run([sys.executable, "-c", _DEEPEST], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    depth, found = out.stdout.split(" ", 1)
    assert int(depth) >= 300
    tokens, unchanged, codes = ast.literal_eval(found.strip())
    assert isinstance(tokens, int) and unchanged is True
    assert "too-costly" in codes  # the profile validator's structural step stops at MAX_DEPTH


def _package(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "src" / "pkg"
    source.mkdir(parents=True)
    (source / "mod.py").write_text("X = 1\n")
    native = tmp_path / "native"
    (native / "pkg.mod").mkdir(parents=True)
    (native / "pkg.mod" / "source.sha256").write_text(source_digest(source / "mod.py") + "\n")
    return source, native


def test_a_compiled_module_is_used_only_while_its_source_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PURE_PYTHON, raising=False)
    source, native = _package(tmp_path)

    def folders() -> list[str]:
        path = [str(source)]
        prefer_compiled("pkg", path, modules=("pkg.mod", "other.mod"), native=native)
        return path

    assert folders() == [str(native / "pkg.mod"), str(source)]
    (source / "mod.pxd").write_text("cdef int x\n")  # a .pxd changes what is compiled
    assert folders() == [str(source)]
    (source / "mod.pxd").unlink()
    assert folders() == [str(native / "pkg.mod"), str(source)]
    (source / "mod.py").write_text("X = 2\n")  # edited since the build
    assert folders() == [str(source)]


def test_plain_python_when_asked_or_never_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, native = _package(tmp_path)
    path = [str(source)]
    monkeypatch.setenv(PURE_PYTHON, "1")
    prefer_compiled("pkg", path, modules=("pkg.mod",), native=native)
    assert path == [str(source)]
    monkeypatch.delenv(PURE_PYTHON)
    shutil.rmtree(native)
    prefer_compiled("pkg", path, modules=("pkg.mod",), native=native)
    assert path == [str(source)]
