"""Mapping specs: the declarative files in ``mappings/<name>/mapping.yaml``, read and checked.

A spec says what a source record holds (``fields``: type, required, formats, allowed values, header
aliases, lookups), and how its values go into FHIR resources (``resources``: one entry per resource
with its type, profile, business identity and ``rules``). Lookups are CSV tables next to the spec
(``lookups/<name>.csv``, a ``source`` column and the FHIR columns). What a rule cannot say is a named
helper (:mod:`adapter.mapping.helpers`). Mappings whose source is itself structured (a GP Connect
STU3 Bundle, a stored case) name a ``build`` function instead of ``resources``.

The spec language is described in ``mappings/README.md``. A mistake in a spec is a
:class:`SpecError` naming the file and the key, raised when the spec is loaded, never half-way
through a run.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from adapter.errors import AdapterError, InputError
from adapter.mapping.base import Mapped

__all__ = [
    "FieldSpec",
    "Lookup",
    "MappingSpec",
    "ResourceSpec",
    "RuleSpec",
    "SpecError",
    "Step",
    "available",
    "load",
    "mappings_root",
]

FieldType = Literal[
    "string", "code", "integer", "decimal", "date", "datetime", "boolean", "nhs-number", "ods-code", "group"
]
_TYPES = set(FieldType.__args__)  # type: ignore[attr-defined]
SourceFormat = Literal["csv", "json", "ndjson", "xml"]
_FORMATS = set(SourceFormat.__args__)  # type: ignore[attr-defined]
_TEMPLATE_NAME = re.compile(r"{([A-Za-z_][A-Za-z0-9_.]*)}")
_TRUE = ("true", "yes", "y", "1")
_FALSE = ("false", "no", "n", "0")
_STEP = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[(\d+|\*)\])?")


class SpecError(AdapterError):
    """A mapping spec that cannot be used: names the file and the key."""

    issue_code = "invalid"
    status = 500


@dataclass(frozen=True, slots=True)
class Lookup:
    """A CSV table from source values to FHIR values; ``source`` values match case-insensitively.

    Several source values may give the same FHIR value (aliases); the first row of a FHIR value is
    its canonical source value, the one a reverse mapping writes.
    """

    name: str
    columns: tuple[str, ...]
    rows: dict[str, dict[str, str]]
    reverse: dict[tuple[str, ...], str]
    #: :meth:`canonical` of each source value as ``rows`` holds it, worked out once: the records'
    #: values are checked against it one by one.
    canonicals: dict[str, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        canonicals = {key: self.source_for(target) for key, target in self.rows.items()}
        object.__setattr__(self, "canonicals", canonicals)

    def __call__(self, value: str) -> dict[str, str] | None:
        return self.rows.get(value.strip().lower())

    def canonical(self, value: str) -> str | None:
        """The first source value of the FHIR value ``value`` stands for (``F`` -> ``Female``)."""
        return self.canonicals.get(value.strip().lower())

    def source_for(self, target: dict[str, str]) -> str | None:
        return self.reverse.get(tuple(target.get(column, "") for column in self.columns))

    @property
    def canonical_sources(self) -> list[str]:
        return list(self.reverse.values())


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of the source record, as the schema check sees it."""

    name: str
    type: FieldType
    required: bool = False
    repeats: bool = False
    separator: str = ";"
    aliases: tuple[str, ...] = ()
    #: strptime formats for date and datetime fields, tried in order; the first is written back.
    formats: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    lookup: str | None = None
    pattern: re.Pattern[str] | None = None
    default: str | None = None
    minimum: Decimal | None = None
    maximum: Decimal | None = None
    true_values: tuple[str, ...] = _TRUE
    false_values: tuple[str, ...] = _FALSE
    #: ``upper``/``lower``: case applied after trimming (postcodes, ODS codes).
    case: str | None = None
    #: Where the value is in a JSON object (dotted keys) or an XML record (XPath); default: the name.
    path: str | None = None
    #: Sub-fields of a ``group`` (repeating objects such as the contacts of a case).
    fields: tuple[FieldSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a rule's FHIR path: an element, and an index (``None``: not a list; ``-1``: one
    element per value of the rule's repeating field or group)."""

    name: str
    index: int | None


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule: put a value at a path of the resource."""

    path: tuple[Step, ...]
    text: str
    value: Any = None
    field: str | None = None
    template: str | None = None
    reference: str | None = None
    helper: str | None = None
    #: The helper's arguments: field names, or names of ``constants``.
    args: tuple[str, ...] = ()
    lookup: str | None = None
    #: The rule applies only when this field has a value (``field=value``: has that value).
    when: str | None = None

    @property
    def repeats(self) -> bool:
        return any(step.index == -1 for step in self.path)


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """One resource a record gives: its type, profile, business identity and rules."""

    key: str
    type: str
    profile: str | None
    #: ``system|{field}``: the identifier that is the resource's business identity.
    identity: str | None
    rules: tuple[RuleSpec, ...]
    when: str | None = None
    #: A group field: one resource per item of the group.
    for_each: str | None = None


@dataclass(frozen=True, slots=True)
class MappingSpec:
    name: str
    title: str
    path: Path
    format: SourceFormat
    fields: tuple[FieldSpec, ...] = ()
    resources: tuple[ResourceSpec, ...] = ()
    lookups: dict[str, Lookup] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)
    delimiter: str = ","
    encoding: str = "auto"
    #: XPath of each record in an XML source, or the key of the record list in a JSON document.
    record: str | None = None
    #: ``module:function`` taking one parsed record and returning :class:`~adapter.mapping.base.Mapped`.
    build: Callable[[dict[str, Any]], Mapped] | None = None
    #: ``transaction`` (resources to store) or ``document`` (one document Bundle, written as is).
    output: Literal["transaction", "document"] = "transaction"
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    #: The keys of a JSON record that its fields read (the first key of each path or name, and the
    #: aliases): the record's other keys are its unused fields. Worked out once, not per record.
    json_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = frozenset(
            part
            for spec_field in self.fields
            for part in ((spec_field.path or spec_field.name).split(".")[0], *spec_field.aliases)
        )
        object.__setattr__(self, "json_keys", keys)

    def field(self, name: str) -> FieldSpec:
        head, _, rest = name.partition(".")
        for spec in self.fields:
            if spec.name == head:
                if not rest:
                    return spec
                for sub in spec.fields:
                    if sub.name == rest:
                        return sub
        raise KeyError(name)


def mappings_root() -> Path:
    """``mappings/`` of the source tree, or the copy inside the installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "mappings", here / "_data" / "mappings"):
        if candidate.is_dir():
            return candidate
    raise SpecError("no mappings/ folder next to the adapter package")


def available() -> list[tuple[str, str]]:
    """(name, title) of every mapping in ``mappings/``."""
    found = []
    for path in sorted(mappings_root().glob("*/mapping.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        found.append((str(raw.get("name", path.parent.name)), str(raw.get("title", ""))))
    return found


@cache
def load(name: str) -> MappingSpec:
    """The spec ``mappings/<name>/mapping.yaml``, checked; :class:`SpecError` when it is wrong."""
    path = mappings_root() / name / "mapping.yaml"
    if not re.fullmatch(r"[a-z0-9-]+", name) or not path.is_file():
        known = ", ".join(found for found, _ in available())
        raise InputError(f"no mapping {name!r} (known: {known})", expression="mapping")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return _Reader(path, raw).spec()


class _Reader:
    """Reads one spec file, naming the key of every mistake."""

    def __init__(self, path: Path, raw: Any) -> None:
        self.path = path
        self.raw = raw if isinstance(raw, dict) else {}
        if not isinstance(raw, dict):
            self.fail("", "the spec must be a mapping of keys")

    def fail(self, where: str, message: str) -> None:
        raise SpecError(f"{self.path}: {where + ': ' if where else ''}{message}")

    def spec(self) -> MappingSpec:
        raw = self.raw
        source = raw.get("source") or {}
        fmt = source.get("format", "csv")
        if fmt not in _FORMATS:
            self.fail("source.format", f"{fmt!r} is not one of {sorted(_FORMATS)}")
        lookups = {name: self.lookup(name, file) for name, file in (raw.get("lookups") or {}).items()}
        constants = {str(key): str(value) for key, value in (raw.get("constants") or {}).items()}
        fields = tuple(self.field(f"fields.{name}", name, body) for name, body in (raw.get("fields") or {}).items())
        build = self.build(raw["build"]) if raw.get("build") else None
        spec = MappingSpec(
            name=str(raw.get("name") or self.path.parent.name),
            title=str(raw.get("title", "")),
            path=self.path,
            format=fmt,
            fields=fields,
            lookups=lookups,
            constants=constants,
            delimiter=str(source.get("delimiter", ",")),
            encoding=str(source.get("encoding", "auto")),
            record=source.get("record"),
            build=build,
            output=raw.get("output", "transaction"),
            description=str(raw.get("description", "")),
            raw=raw,
        )
        for name in constants:
            if any(name == spec_field.name for spec_field in fields):
                self.fail(f"constants.{name}", "is also a field name; a template could not tell them apart")
        if raw.get("output", "transaction") not in ("transaction", "document"):
            self.fail("output", f"{raw.get('output')!r} is not transaction or document")
        resources = tuple(self.resource(spec, key, body) for key, body in (raw.get("resources") or {}).items())
        if build is None and not resources:
            self.fail("", "a spec needs resources (rules) or a build function")
        spec = dataclasses.replace(spec, resources=resources)
        self.check_references(spec)
        return spec

    def lookup(self, name: str, file: str) -> Lookup:
        path = self.path.parent / file
        if not path.is_file():
            self.fail(f"lookups.{name}", f"no file {file}")
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = tuple(column for column in reader.fieldnames or () if column != "source")
            if "source" not in (reader.fieldnames or ()) or not columns:
                self.fail(f"lookups.{name}", f"{file} needs a 'source' column and at least one FHIR column")
            rows: dict[str, dict[str, str]] = {}
            reverse: dict[tuple[str, ...], str] = {}
            for row in reader:
                target = {column: row[column] for column in columns if row.get(column)}
                rows[row["source"].strip().lower()] = target
                reverse.setdefault(tuple(target.get(column, "") for column in columns), row["source"])
        return Lookup(name, columns, rows, reverse)

    def field(self, where: str, name: str, body: Any) -> FieldSpec:
        if not isinstance(body, dict):
            self.fail(where, "a field is a mapping with at least a type")
        kind = body.get("type", "string")
        if kind not in _TYPES:
            self.fail(f"{where}.type", f"{kind!r} is not one of {sorted(_TYPES)}")
        known = set(FieldSpec.__dataclass_fields__) | {"true", "false", "note"}
        for key in body:
            if key not in known:
                self.fail(f"{where}.{key}", "unknown key")
        lookup = body.get("lookup")
        if lookup is not None and lookup not in (self.raw.get("lookups") or {}):
            self.fail(f"{where}.lookup", f"no lookup {lookup!r} in lookups")
        if kind in ("date", "datetime") and not body.get("formats"):
            self.fail(f"{where}.formats", "date and datetime fields need formats (strptime, e.g. '%d/%m/%Y')")
        sub = tuple(
            self.field(f"{where}.fields.{key}", key, value) for key, value in (body.get("fields") or {}).items()
        )
        if body.get("case") not in (None, "upper", "lower"):
            self.fail(f"{where}.case", f"{body.get('case')!r} is not upper or lower")
        if kind == "group" and not sub:
            self.fail(f"{where}.fields", "a group needs fields")
        default = body.get("default")
        return FieldSpec(
            name=name,
            type=kind,
            required=bool(body.get("required", False)),
            repeats=bool(body.get("repeats", kind == "group")),
            separator=str(body.get("separator", ";")),
            aliases=tuple(str(alias) for alias in body.get("aliases") or ()),
            formats=tuple(body.get("formats") or ()),
            allowed=tuple(str(value) for value in body.get("allowed") or ()),
            lookup=lookup,
            pattern=re.compile(body["pattern"]) if body.get("pattern") else None,
            default=None if default is None else str(default),
            minimum=None if body.get("minimum") is None else Decimal(str(body["minimum"])),
            maximum=None if body.get("maximum") is None else Decimal(str(body["maximum"])),
            true_values=tuple(str(v).lower() for v in body.get("true") or _TRUE),
            false_values=tuple(str(v).lower() for v in body.get("false") or _FALSE),
            case=body.get("case"),
            path=body.get("path"),
            fields=sub,
        )

    def build(self, target: str) -> Callable[[dict[str, Any]], Mapped]:
        module, _, function = str(target).partition(":")
        try:
            found: Callable[[dict[str, Any]], Mapped] = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise SpecError(f"{self.path}: build: cannot import {target!r}: {exc}") from exc
        return found

    def resource(self, spec: MappingSpec, key: str, body: Any) -> ResourceSpec:
        where = f"resources.{key}"
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            self.fail(where, "a resource needs a type")
        for extra in set(body) - {"type", "profile", "identity", "rules", "when", "for_each", "note"}:
            self.fail(f"{where}.{extra}", "unknown key")
        for_each = body.get("for_each")
        if for_each is not None:
            try:
                group = spec.field(for_each)
            except KeyError:
                group = None
            if group is None or group.type != "group":
                self.fail(f"{where}.for_each", f"{for_each!r} is not a group field")
        rules = tuple(self.rule(spec, f"{where}.rules[{i}]", rule) for i, rule in enumerate(body.get("rules") or ()))
        identity = body.get("identity")
        if identity is None:
            self.fail(f"{where}.identity", "a resource needs an identity (system|{field}): its id and If-None-Exist")
        self.check_template(spec, f"{where}.identity", identity)
        self.check_when(spec, f"{where}.when", body.get("when"))
        for index, rule in enumerate(rules):
            self.check_when(spec, f"{where}.rules[{index}].when", rule.when)
        return ResourceSpec(key, body["type"], body.get("profile"), identity, rules, body.get("when"), for_each)

    def rule(self, spec: MappingSpec, where: str, body: Any) -> RuleSpec:
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            self.fail(where, "a rule needs a path")
        sources = [name for name in ("value", "field", "template", "reference", "helper") if name in body]
        if len(sources) != 1:
            self.fail(where, "a rule needs exactly one of value, field, template, reference, helper")
        for extra in set(body) - {
            "path",
            "value",
            "field",
            "template",
            "reference",
            "helper",
            "args",
            "lookup",
            "when",
        }:
            self.fail(f"{where}.{extra}", "unknown key")
        steps = []
        for part in body["path"].split("."):
            match = _STEP.fullmatch(part)
            if match is None:
                self.fail(f"{where}.path", f"{part!r} is not an element name with an optional [n] or [*]")
                raise AssertionError  # unreachable: fail raises
            index = match.group(2)
            steps.append(Step(match.group(1), None if index is None else -1 if index == "*" else int(index)))
        rule = RuleSpec(
            path=tuple(steps),
            text=body["path"],
            value=body.get("value"),
            field=body.get("field"),
            template=body.get("template"),
            reference=body.get("reference"),
            helper=body.get("helper"),
            args=tuple(body.get("args") or ()),
            lookup=body.get("lookup"),
            when=body.get("when"),
        )
        # A helper's arguments are fields, or constants (a scale's ranges: data, not code).
        for name in ([rule.field] if rule.field else []) + [arg for arg in rule.args if arg not in spec.constants]:
            try:
                spec.field(name)
            except KeyError:
                self.fail(where, f"no field {name!r}")
        if rule.template is not None:
            self.check_template(spec, f"{where}.template", rule.template)
        if rule.lookup is not None and rule.lookup not in spec.lookups:
            self.fail(f"{where}.lookup", f"no lookup {rule.lookup!r}")
        if sum(step.index == -1 for step in rule.path) > 1:
            self.fail(f"{where}.path", "only one [*] per path")
        if rule.helper is not None:
            from adapter.mapping.helpers import HELPERS

            if rule.helper not in HELPERS:
                self.fail(f"{where}.helper", f"no helper {rule.helper!r} (known: {', '.join(sorted(HELPERS))})")
        return rule

    def check_when(self, spec: MappingSpec, where: str, when: str | None) -> None:
        """``when`` names a field (``field`` or ``field=value``): a typo would silently never apply."""
        if when is None:
            return
        try:
            spec.field(when.partition("=")[0])
        except KeyError:
            self.fail(where, f"{when.partition('=')[0]!r} is not a field")

    def check_template(self, spec: MappingSpec, where: str, template: str) -> None:
        for name in _TEMPLATE_NAME.findall(template):
            if name not in spec.constants:
                try:
                    spec.field(name)
                except KeyError:
                    self.fail(where, f"{{{name}}} is neither a field nor a constant")

    def check_references(self, spec: MappingSpec) -> None:
        keys = {resource.key for resource in spec.resources}
        each = {resource.key for resource in spec.resources if resource.for_each is not None}
        for resource in spec.resources:
            for index, rule in enumerate(resource.rules):
                if rule.reference is not None and rule.reference not in keys:
                    self.fail(f"resources.{resource.key}.rules[{index}].reference", f"no resource {rule.reference!r}")
                if rule.reference in each and not rule.repeats:
                    # One reference per item of the group: CarePlan.goal[*] -> the Goal of each goal.
                    self.fail(
                        f"resources.{resource.key}.rules[{index}].path",
                        f"{rule.reference!r} is one resource per item: use [*]",
                    )
