"""Compile the official FHIR R4 definitions into the compact model the adapter ships.

Input: the ``hl7.fhir.r4.core`` 4.0.1 NPM package (a ``.tgz`` or an unpacked folder).
Output (``adapter/fhir/definitions/``):

- ``r4-types/<Type>.json``: one file per resource and datatype (StructureDefinitions with
  ``derivation = specialization``, plus the Quantity profiles used as types), so that a
  process loads only the types it meets: the elements in snapshot order with path, min/max,
  types (target profiles), fixed/pattern values, bindings (strength + ValueSet URL),
  invariants (key, severity, FHIRPath), XML representation, content references; and for
  primitives the JSON kind and regex.
- ``r4-index.json``: every type's kind, base, abstract flag and JSON kind, and the table of
  choice element names (``value`` -> ``Quantity``, ``String``, ...) over all types.
- ``r4-valuesets.json``: the codes of every ValueSet that a *required* binding in those
  types points to, where the expansion can be computed from the package alone.
- ``r4-fhirpath.json``: the parsed syntax tree (fhirpathpy's grammar) of every invariant's
  FHIRPath, so that validating needs no ANTLR parse at start-up; ``r4-search-fhirpath.json`` the
  same for the SearchParameter expressions (a separate file: validation does not load it).
- ``r4-searchparams.json``: the R4 SearchParameters (code, base, type, expression, targets,
  modifiers, comparators, chains).

Structural facts only: definitions, comments, mappings and narrative are dropped.
Each file starts with a ``_header`` naming the source package and version and this generator,
and the output is deterministic so that ``tests/test_generate.py`` can prove a regeneration gives
no diff. Run: ``python -m adapter.fhir._generate PATH/TO/hl7.fhir.r4.core-4.0.1.tgz``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).parent / "definitions"
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
# Profiles of datatypes that R4 resources name in ``type.profile`` (e.g. Dosage.doseQuantity).
DATATYPE_PROFILES = ("SimpleQuantity", "MoneyQuantity")
# JSON representation of primitive values: https://hl7.org/fhir/R4/json.html#primitive
JSON_KIND = {
    "boolean": "boolean",
    "integer": "integer",
    "positiveInt": "integer",
    "unsignedInt": "integer",
    "decimal": "decimal",
}


def read_package(source: Path) -> Iterator[dict[str, Any]]:
    """Yield every JSON resource of an NPM package given as ``.tgz`` or folder."""
    if source.is_dir():
        root = source / "package" if (source / "package").is_dir() else source
        for path in sorted(root.glob("*.json")):
            if path.name != "package.json" and not path.name.startswith("."):
                yield json.loads(path.read_bytes())
        return
    # Read members in archive order: seeking back in a gzip stream is quadratic.
    found: list[tuple[str, bytes]] = []
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not name.endswith(".json") or member.name.count("/") != 1:
                continue
            if name == "package.json" or name.startswith("."):
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                found.append((member.name, handle.read()))
    for _, content in sorted(found):
        yield json.loads(content)


def package_version(source: Path) -> tuple[str, str]:
    if source.is_dir():
        root = source / "package" if (source / "package").is_dir() else source
        meta = json.loads((root / "package.json").read_bytes())
    else:
        with tarfile.open(source, "r:gz") as tar:
            handle = tar.extractfile("package/package.json")
            assert handle is not None
            meta = json.loads(handle.read())
    return str(meta["name"]), str(meta["version"])


def _type_code(type_: dict[str, Any], base_path: str) -> str:
    code = str(type_["code"])
    if code.startswith("http://hl7.org/fhirpath/System."):
        # Primitive ``value`` and the few system-typed elements (Element.id, Extension.url,
        # Resource.id) carry their FHIR type in an extension.
        for ext in type_.get("extension", []):
            if ext["url"] == FHIR_TYPE_EXT:
                code = ext["valueUrl"]
        # xhtml.id alone has no such extension; it is an Element.id, a string
        # (https://hl7.org/fhir/R4/element.html). Left as System.String, a walk of "_div": {"id": ...}
        # looked for a model of that type and raised KeyError (#2).
        if code == "http://hl7.org/fhirpath/System.String" and base_path.endswith(".id"):
            code = "string"
        # Resource.id is of type id (https://hl7.org/fhir/R4/resource.html#id); the snapshot
        # says "string" through the extension, which would let "a b" pass.
        if base_path == "Resource.id":
            code = "id"
    return code


def compile_element(element: dict[str, Any], type_kind: str) -> dict[str, Any]:
    path = element["path"]
    out: dict[str, Any] = {"path": path, "min": element.get("min", 0), "max": element.get("max", "*")}
    types = []
    for type_ in element.get("type", []):
        item: dict[str, Any] = {"code": _type_code(type_, element.get("base", {}).get("path", path))}
        if type_.get("targetProfile"):
            item["targetProfile"] = list(type_["targetProfile"])
        if type_.get("profile"):
            item["profile"] = list(type_["profile"])
        types.append(item)
    if types:
        out["types"] = types
    if "contentReference" in element:
        out["contentReference"] = element["contentReference"].lstrip("#")
    for key, value in element.items():
        if key.startswith(("fixed", "pattern")):
            out[key] = value
    binding = element.get("binding")
    if binding and binding.get("valueSet"):
        out["binding"] = {"strength": binding["strength"], "valueSet": binding["valueSet"].split("|")[0]}
    constraints = [
        {
            "key": c["key"],
            "severity": c["severity"],
            "human": c.get("human", ""),
            "expression": c.get("expression", ""),
        }
        for c in element.get("constraint", [])
        if c.get("expression")
    ]
    if constraints:
        out["constraints"] = constraints
    if element.get("representation"):
        out["representation"] = element["representation"]
    if element.get("isModifier"):
        out["modifier"] = True
    if element.get("isSummary"):
        out["summary"] = True
    if element.get("maxLength"):
        out["maxLength"] = element["maxLength"]
    return out


def compile_type(sd: dict[str, Any]) -> dict[str, Any]:
    kind = sd["kind"]
    out: dict[str, Any] = {"kind": kind, "url": sd["url"]}
    if sd.get("baseDefinition"):
        out["base"] = sd["baseDefinition"].removeprefix(SD_PREFIX)
    if sd.get("abstract"):
        out["abstract"] = True
    if kind == "primitive-type":
        out["json"] = JSON_KIND.get(sd["id"], "string")
        for element in sd["snapshot"]["element"]:
            if element["path"].endswith(".value"):
                for type_ in element.get("type", []):
                    for ext in type_.get("extension", []):
                        if ext["url"] == REGEX_EXT:
                            out["regex"] = ext["valueString"]
    out["elements"] = [compile_element(e, kind) for e in sd["snapshot"]["element"]]
    return out


def _codes(concepts: list[dict[str, Any]]) -> Iterator[str]:
    for concept in concepts:
        yield concept["code"]
        yield from _codes(concept.get("concept", []))


def expand(
    url: str,
    value_sets: dict[str, dict[str, Any]],
    code_systems: dict[str, dict[str, Any]],
    seen: frozenset[str] = frozenset(),
) -> dict[str, list[str]] | str:
    """Expand a ValueSet from the package alone; return the reason when it cannot be done."""
    vs = value_sets.get(url)
    if vs is None:
        return f"ValueSet {url} is not in the package"
    if url in seen:
        return f"ValueSet {url} includes itself"
    compose = vs.get("compose")
    if not compose:
        return "no compose"
    result: dict[str, set[str]] = {}
    for include in compose.get("include", []):
        if include.get("filter"):
            return "uses a filter"
        for imported in include.get("valueSet", []):
            sub = expand(imported.split("|")[0], value_sets, code_systems, seen | {url})
            if isinstance(sub, str):
                return sub
            for system, codes in sub.items():
                result.setdefault(system, set()).update(codes)
        system = include.get("system")
        if not system:
            continue
        if include.get("concept"):
            result.setdefault(system, set()).update(c["code"] for c in include["concept"])
            continue
        cs = code_systems.get(system)
        if cs is None:
            return f"code system {system} is not in the package"
        if cs.get("content") != "complete":
            return f"code system {system} is not complete in the package ({cs.get('content')})"
        result.setdefault(system, set()).update(_codes(cs.get("concept", [])))
    for exclude in compose.get("exclude", []):
        if exclude.get("filter") or exclude.get("valueSet"):
            return "uses a filtered exclude"
        system = exclude.get("system")
        if system and system in result:
            if not exclude.get("concept"):
                del result[system]
            else:
                result[system] -= {c["code"] for c in exclude["concept"]}
    return {system: sorted(codes) for system, codes in sorted(result.items())}


def compile_search_param(sp: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "url": sp["url"],
        "code": sp["code"],
        "base": sorted(sp.get("base", [])),
        "type": sp["type"],
    }
    for key in ("expression", "target", "modifier", "comparator", "chain", "multipleOr", "multipleAnd"):
        if key in sp:
            out[key] = sorted(sp[key]) if isinstance(sp[key], list) else sp[key]
    return out


def generate(source: Path) -> dict[str, bytes]:
    """Return the generated files (name -> content) for the package at ``source``."""
    name, version = package_version(source)
    structure_definitions: dict[str, dict[str, Any]] = {}
    value_sets: dict[str, dict[str, Any]] = {}
    code_systems: dict[str, dict[str, Any]] = {}
    search_params: list[dict[str, Any]] = []
    for resource in read_package(source):
        rtype = resource.get("resourceType")
        if rtype == "StructureDefinition":
            structure_definitions[resource["id"]] = resource
        elif rtype == "ValueSet":
            value_sets[resource["url"]] = resource
        elif rtype == "CodeSystem":
            code_systems[resource["url"]] = resource
        elif rtype == "SearchParameter":
            search_params.append(resource)

    types: dict[str, dict[str, Any]] = {}
    for sd_id, sd in sorted(structure_definitions.items()):
        if sd["kind"] == "logical":
            continue
        if sd.get("derivation", "specialization") == "specialization" or sd_id in DATATYPE_PROFILES:
            types[sd_id] = compile_type(sd)

    required: set[str] = set()
    for type_ in types.values():
        for element in type_["elements"]:
            binding = element.get("binding")
            if binding and binding["strength"] == "required":
                required.add(binding["valueSet"])
    expansions: dict[str, Any] = {}
    not_expanded: dict[str, str] = {}
    for url in sorted(required):
        result = expand(url, value_sets, code_systems)
        if isinstance(result, str):
            not_expanded[url] = result
        else:
            expansions[url] = result

    header = {
        "source": f"{name}#{version}",
        "generator": "adapter/fhir/_generate.py",
        "note": "Generated file: do not edit. Structural facts only.",
    }
    index: dict[str, Any] = {}
    choices: dict[str, dict[str, str]] = {}
    for type_name, type_ in types.items():
        index[type_name] = {k: v for k, v in type_.items() if k in ("kind", "base", "abstract", "json")}
        for element in type_["elements"]:
            if element["path"].endswith("[x]"):
                suffixes = choices.setdefault(element["path"].rsplit(".", 1)[-1][:-3], {})
                for item in element.get("types", []):
                    suffixes[item["code"][0].upper() + item["code"][1:]] = item["code"]
    files = {
        f"r4-types/{type_name}.json": _dump_lines(
            {**header, "type": type_name},
            "elements",
            type_["elements"],
            extra={k: v for k, v in type_.items() if k != "elements"},
        )
        for type_name, type_ in types.items()
    }
    from adapter.fhir.fhirpath import UnsupportedExpression, parse_fhirpath

    def parsed(expressions: set[str]) -> dict[str, Any]:
        trees: dict[str, Any] = {}
        for expression in sorted(expressions):
            try:
                trees[expression] = parse_fhirpath(expression)
            except UnsupportedExpression:
                continue  # compiled (and reported) at run time instead
        return trees

    # Two files: validation loads the invariants' trees, the search index the SearchParameters'.
    invariants = {c["expression"] for t in types.values() for e in t["elements"] for c in e.get("constraints", [])}
    trees = parsed(invariants)
    search_trees = parsed({sp["expression"] for sp in search_params if sp.get("expression")} - invariants)
    return {
        **files,
        "r4-fhirpath.json": _dump_lines(header, "expressions", trees),
        "r4-search-fhirpath.json": _dump_lines(header, "expressions", search_trees),
        "r4-index.json": _dump_lines(
            {**header, "choices": {k: dict(sorted(v.items())) for k, v in sorted(choices.items())}},
            "types",
            index,
        ),
        "r4-valuesets.json": _dump_lines({**header, "notExpanded": not_expanded}, "valueSets", expansions),
        "r4-searchparams.json": _dump_lines(
            header,
            "searchParameters",
            {sp["url"]: compile_search_param(sp) for sp in sorted(search_params, key=lambda s: s["url"])},
        ),
    }


def _dump_lines(
    header: dict[str, Any], key: str, items: dict[str, Any] | list[Any], extra: dict[str, Any] | None = None
) -> bytes:
    """JSON with one entry per line, so that a regeneration diff reads per type or element."""
    dump = json.dumps
    lines = ["{", f'"_header": {dump(header, sort_keys=True, ensure_ascii=False)},']
    for name, value in (extra or {}).items():
        lines.append(f"{dump(name)}: {dump(value, ensure_ascii=False, separators=(',', ':'))},")
    compact = {"ensure_ascii": False, "separators": (",", ":")}
    if isinstance(items, list):
        lines.append(f'"{key}": [')
        lines.append(",\n".join(dump(v, **compact) for v in items))  # type: ignore[arg-type]
        lines.append("]}")
    else:
        lines.append(f'"{key}": {{')
        lines.append(",\n".join(f"{dump(k)}: {dump(v, **compact)}" for k, v in items.items()))  # type: ignore[arg-type]
        lines.append("}}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("source", type=Path, help="hl7.fhir.r4.core 4.0.1 package (.tgz or folder)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    generated = generate(args.source)
    (args.out / "r4-types").mkdir(parents=True, exist_ok=True)
    for stale in (args.out / "r4-types").glob("*.json"):
        if f"r4-types/{stale.name}" not in generated:
            stale.unlink()
    for filename, content in generated.items():
        (args.out / filename).write_bytes(content)
    print(f"wrote {len(generated)} files to {args.out} ({sum(len(c) for c in generated.values()):,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
