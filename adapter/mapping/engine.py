"""The mapping engine: one source record in, validated FHIR resources and a trace out.

:class:`Mapper` runs a spec (:mod:`adapter.mapping.spec`) on records: it checks and types the record
(:func:`adapter.mapping.sources.extract`), applies the rules (or the spec's ``build`` function),
gives every resource its deterministic id (:mod:`adapter.mapping.ids`) and profile, and validates
each resource against R4 and its profiles before it leaves. Values are built as Python structures,
never as JSON text (``../shared/style.md`` rule 5). Pure: no I/O.

Rule semantics (``mappings/README.md``): a rule puts one value at a FHIR path such as
``name[0].family``; ``[*]`` puts one element per value of a repeating field or per item of a group;
a dict value is merged into what is already there, so several rules can build one element.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapter.mapping.base import Mapped, MappedResource, MappingError
from adapter.mapping.helpers import HELPERS, ArgumentError
from adapter.mapping.ids import deterministic_id, identity
from adapter.mapping.sources import RawRecord, Record, extract
from adapter.mapping.spec import MappingSpec, ResourceSpec, RuleSpec, Step
from adapter.validation import Validator
from adapter.validation.profiles import ProfileValidator

__all__ = ["MappedRecord", "Mapper", "references_to_ids", "transaction_entry"]

_TEMPLATE = re.compile(r"{([A-Za-z_][A-Za-z0-9_.]*)}")
_MISSING = object()


@dataclass(slots=True)
class MappedRecord:
    """One record's result: its resources (validated) or why it was rejected, and its trace."""

    number: int
    resources: list[MappedResource] = field(default_factory=list)
    error: MappingError | None = None
    unused: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)


def _lookup_value(spec: MappingSpec, name: str, value: Any) -> Any:
    row = spec.lookups[name](str(value).lower() if isinstance(value, bool) else str(value))
    if row is None:
        return None
    return next(iter(row.values())) if len(spec.lookups[name].columns) == 1 else dict(row)


def _merge(target: dict[str, Any], name: str, value: Any) -> None:
    current = target.get(name)
    if isinstance(current, dict) and isinstance(value, dict):
        current.update(copy.deepcopy(value))
    else:
        target[name] = copy.deepcopy(value) if isinstance(value, dict | list) else value


def _put(node: dict[str, Any], path: Sequence[Step], value: Any) -> None:
    """Put ``value`` at ``path`` under ``node``; ``[*]`` steps take one value per element."""
    step, rest = path[0], path[1:]
    if step.index is None:
        if not rest:
            _merge(node, step.name, value)
            return
        child = node.setdefault(step.name, {})
        _put(child, rest, value)
        return
    items: list[Any] = node.setdefault(step.name, [])
    if step.index == -1:
        for index, item in enumerate(value):
            if item is None:
                continue
            while len(items) <= index:
                items.append({})
            if rest:
                _put(items[index], rest, item)
            elif isinstance(item, dict) and isinstance(items[index], dict):
                items[index].update(copy.deepcopy(item))
            else:
                items[index] = copy.deepcopy(item) if isinstance(item, list) else item
        return
    while len(items) <= step.index:
        items.append({})
    if not rest:
        if isinstance(value, dict) and isinstance(items[step.index], dict):
            items[step.index].update(copy.deepcopy(value))
        else:
            items[step.index] = copy.deepcopy(value) if isinstance(value, list) else value
        return
    _put(items[step.index], rest, value)


def _pruned(value: Any) -> Any:
    """``value`` without empty objects and lists (left by rules that found nothing), or _MISSING."""
    if isinstance(value, dict):
        kept = {key: item for key, item in ((k, _pruned(v)) for k, v in value.items()) if item is not _MISSING}
        return kept if kept else _MISSING
    if isinstance(value, list):
        items = [item for item in (_pruned(v) for v in value) if item is not _MISSING]
        return items if items else _MISSING
    return _MISSING if value is None or value == "" else value


def _references(value: Any, found: set[str]) -> set[str]:
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str) and reference.startswith("urn:uuid:"):
            found.add(reference[9:])
        for item in value.values():
            if isinstance(item, dict | list):
                _references(item, found)
    elif isinstance(value, list):
        for item in value:
            _references(item, found)
    return found


def _referenced_first(resources: list[MappedResource]) -> list[MappedResource]:
    """The resources ordered so that each comes after the ones it refers to (cycles broken in input
    order): a reference is then checked against a target already known to be valid."""
    by_id = {item.resource["id"]: item for item in resources}
    ordered: list[MappedResource] = []
    state: dict[str, int] = {}

    def visit(item: MappedResource) -> None:
        id = item.resource["id"]
        if state.get(id):
            return
        state[id] = 1
        for target in sorted(_references(item.resource, set())):
            if target in by_id:
                visit(by_id[target])
        state[id] = 2
        ordered.append(item)

    for item in resources:
        visit(item)
    return ordered


def _fill(target: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if key not in target:
            target[key] = value
        elif isinstance(target[key], dict) and isinstance(value, dict):
            _fill(target[key], value)


def _merged(resources: list[MappedResource]) -> list[MappedResource]:
    """One resource per id: two resources of a record with the same identity (the GP practice that
    is also the referrer's organisation) become one, the first's values winning."""
    by_id: dict[str, MappedResource] = {}
    for item in resources:
        first = by_id.get(item.resource["id"])
        if first is None:
            by_id[item.resource["id"]] = item
        else:
            _fill(first.resource, item.resource)
    return list(by_id.values())


def references_to_ids(value: Any, types: dict[str, str]) -> Any:
    """``value`` with ``urn:uuid:`` references to resources of ``types`` (id -> type) made ``Type/id``:
    with deterministic ids, a resource stands on its own outside its Bundle (NDJSON output)."""
    if isinstance(value, dict):
        result = {key: references_to_ids(item, types) for key, item in value.items()}
        reference = result.get("reference")
        if isinstance(reference, str) and reference.startswith("urn:uuid:") and reference[9:] in types:
            result["reference"] = f"{types[reference[9:]]}/{reference[9:]}"
        return result
    if isinstance(value, list):
        return [references_to_ids(item, types) for item in value]
    return value


def transaction_entry(mapped: MappedResource) -> dict[str, Any]:
    """The Bundle entry that writes ``mapped``: a conditional create on its business identity
    (https://hl7.org/fhir/R4/http.html#ccreate), or an update by its deterministic id."""
    resource = mapped.resource
    type, id = resource["resourceType"], resource["id"]
    request: dict[str, Any]
    if mapped.if_none_exist:
        request = {"method": "POST", "url": type, "ifNoneExist": mapped.if_none_exist}
    else:
        request = {"method": "PUT", "url": f"{type}/{id}"}
    return {"fullUrl": f"urn:uuid:{id}", "resource": resource, "request": request}


class Mapper:
    """Runs one spec on records. ``validator`` checks every resource (R4 and declared profiles)."""

    def __init__(self, spec: MappingSpec, validator: Validator) -> None:
        self.spec = spec
        self.validator = validator
        # Identical resources (the practice of every referral from one surgery) are checked once.
        self._checked: dict[bytes, str | None] = {}
        # The field a rule took its value from, by (resource key, path without indexes): a profile
        # issue at that path is reported against that field.
        self._rule_fields: dict[tuple[str | None, str], str | None] = {
            (resource.key, re.sub(r"\[[^]]*]", "", rule.text)): rule.field or (rule.args[0] if rule.args else None)
            for resource in spec.resources
            for rule in resource.rules
        }

    # -- one record ------------------------------------------------------------------------

    def map(self, raw: RawRecord) -> MappedRecord:
        """Check, map and validate one raw record; a fault rejects the record and says why."""
        result = MappedRecord(raw.number)
        try:
            if self.spec.build is not None:
                if not isinstance(raw.data, dict):
                    raise MappingError("the record is not a JSON object", record=raw.number)
                mapped = self.spec.build(raw.data)
                result.unused, result.defaults = list(mapped.unused), list(mapped.defaults)
            else:
                record = extract(self.spec, raw)
                result.unused, result.defaults = record.unused, record.defaults
                mapped = self.build(record)
                result.unused += mapped.unused
            targets = {f"urn:uuid:{item.resource.get('id')}": item.resource for item in mapped.resources}
            conformance: dict[tuple[int, str], bool] = {}
            for item in _referenced_first(mapped.resources):
                self._validate(item, raw.number, targets, conformance)
            result.resources = mapped.resources
        except MappingError as exc:
            if exc.record is None:
                exc = MappingError(exc.message, record=raw.number, field=exc.field)
            result.error = exc
        return result

    def _validate(
        self,
        item: MappedResource,
        number: int,
        targets: dict[str, dict[str, Any]],
        conformance: dict[tuple[int, str], bool],
    ) -> None:
        resource = item.resource
        key = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS, default=str)
        # What a reference must resolve to (a profile discriminator) may differ between records,
        # so only resources without references are checked once for all.
        shared = b'"urn:uuid:' not in key
        if shared and key in self._checked:
            problem = self._checked[key]
            if problem is None and isinstance(self.validator, ProfileValidator):
                # Valid, as an identical resource of an earlier record was: the references to it
                # from this record's other resources need not check it again.
                self.validator.remember_valid(resource, (), conformance)
        else:
            if isinstance(self.validator, ProfileValidator):
                issues = self.validator.validate(resource, resolve=targets.get, conformance=conformance)
            else:
                issues = self.validator.validate(resource)
            problem = next(
                (
                    f"{issue.expression or resource['resourceType']}: {issue.diagnostics}"
                    for issue in issues
                    if issue.is_error
                ),
                None,
            )
            if shared:
                if len(self._checked) >= 10_000:  # bounded memory on long runs
                    self._checked.clear()
                self._checked[key] = problem
        if problem is not None:
            path = problem.split(":", 1)[0]
            steps = re.sub(r"\[[^]]*]", "", path).split(".", 1)
            field = self._rule_fields.get((item.key, steps[1])) if len(steps) == 2 else None
            raise MappingError(
                f"the mapped {resource['resourceType']} is not valid: {problem}", record=number, field=field
            )

    # -- rules -----------------------------------------------------------------------------

    def build(self, record: Record) -> Mapped:
        """The resources the spec's rules make of ``record`` (not yet validated)."""
        spec = self.spec
        values = record.values
        ids: dict[str, tuple[str, str, str | None]] = {}  # key -> (type, id, identity)
        # for_each key -> per group item: its values in scope and its (type, id, identity), or None
        each: dict[str, list[tuple[dict[str, Any], tuple[str, str, str | None]] | None]] = {}
        for resource in spec.resources:
            if resource.for_each is None:
                if self._applies(resource.when, values):
                    ids[resource.key] = self._identify(resource, values, record.number)
                continue
            each[resource.key] = []
            subfields = [sub.name for sub in spec.field(resource.for_each).fields]
            for item in values.get(resource.for_each) or ():
                # Every sub-field is in scope, blank ones as None: a blank one is the item's, not
                # the whole group's values.
                scope = dict(values)
                scope.update({f"{resource.for_each}.{name}": item.get(name) for name in subfields})
                applies = self._applies(resource.when, scope)
                each[resource.key].append((scope, self._identify(resource, scope, record.number)) if applies else None)
        # References to a for_each resource: one per group item, None where the item gives none.
        listed = {key: [None if item is None else item[1][1] for item in items] for key, items in each.items()}
        used: set[str] = set()
        mapped = Mapped()
        for resource in spec.resources:
            if resource.for_each is not None:
                for entry in each[resource.key]:
                    if entry is not None:
                        mapped.resources.append(self._resource(resource, entry[0], entry[1], ids, used, listed))
            elif resource.key in ids:
                mapped.resources.append(self._resource(resource, values, ids[resource.key], ids, used, listed))
        mapped.resources = _merged(mapped.resources)
        for name, value in values.items():
            if name not in used and value not in (None, [], ""):
                mapped.unused.append(name)
        return mapped

    def _applies(self, when: str | None, values: dict[str, Any]) -> bool:
        if when is None:
            return True
        name, _, expected = when.partition("=")
        value = values.get(name)
        if expected:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            return value is not None and shown == expected
        return value is not None and value != [] and value is not False

    def _render(self, template: str, values: dict[str, Any], used: set[str] | None = None) -> str | None:
        missing = False

        def one(match: re.Match[str]) -> str:
            nonlocal missing
            name = match.group(1)
            if name in values and values[name] is not None:
                if used is not None:
                    used.add(name.split(".")[0])
                value = values[name]
                return str(value).lower() if isinstance(value, bool) else str(value)
            if name in self.spec.constants:
                return self.spec.constants[name]
            missing = True
            return ""

        text = _TEMPLATE.sub(one, template)
        return None if missing else text

    def _identify(self, resource: ResourceSpec, values: dict[str, Any], number: int) -> tuple[str, str, str | None]:
        if resource.identity is None:
            raise MappingError(f"resource {resource.key!r} has no identity in the spec", record=number)
        text = self._render(resource.identity, values)
        if text is None or "|" not in text or not text.split("|", 1)[1]:
            raise MappingError(f"cannot identify the {resource.type}: {resource.identity} has no value", record=number)
        system, value = text.split("|", 1)
        condition = identity(system, value)
        return resource.type, deterministic_id(resource.type, condition), condition

    def _resource(
        self,
        resource: ResourceSpec,
        values: dict[str, Any],
        own: tuple[str, str, str | None],
        ids: dict[str, tuple[str, str, str | None]],
        used: set[str],
        listed: dict[str, list[str | None]],
    ) -> MappedResource:
        body: dict[str, Any] = {"resourceType": resource.type, "id": own[1]}
        if resource.profile:
            body["meta"] = {"profile": [resource.profile]}
        for rule in resource.rules:
            if not self._applies(rule.when, values):
                continue
            value = self._value(rule, values, ids, used, listed)
            if value is None or value == []:
                continue
            if rule.repeats and not isinstance(value, list):
                value = [value]
            _put(body, rule.path, value)
        cleaned = _pruned(body)
        return MappedResource(cleaned, own[2], resource.key)

    def _value(
        self,
        rule: RuleSpec,
        values: dict[str, Any],
        ids: dict[str, tuple[str, str, str | None]],
        used: set[str],
        listed: dict[str, list[str | None]],
    ) -> Any:
        spec = self.spec
        if rule.reference is not None:
            if rule.reference in listed:
                return [None if id is None else {"reference": f"urn:uuid:{id}"} for id in listed[rule.reference]]
            target = ids.get(rule.reference)
            return None if target is None else {"reference": f"urn:uuid:{target[1]}"}
        if rule.template is not None:
            return self._render(rule.template, values, used)
        if rule.helper is not None:
            arguments = [
                spec.constants[name] if name in spec.constants else self._field(name, values, used)
                for name in rule.args
            ]
            try:
                return HELPERS[rule.helper](*arguments)
            except ArgumentError as exc:
                # The helper names its argument at fault by position; the record's field by name.
                raise MappingError(exc.message, field=rule.args[exc.argument]) from exc
        if rule.field is not None:
            value = self._field(rule.field, values, used)
            if value is None or rule.lookup is None:
                return value
            if isinstance(value, list):
                return [None if item is None else _lookup_value(spec, rule.lookup, item) for item in value]
            return _lookup_value(spec, rule.lookup, value)
        return rule.value

    def _field(self, name: str, values: dict[str, Any], used: set[str]) -> Any:
        if name in values:
            used.add(name.split(".")[0])
            return values[name]
        group, _, sub = name.partition(".")
        if sub and isinstance(values.get(group), list):
            used.add(group)
            return [item.get(sub) for item in values[group]]
        return None
