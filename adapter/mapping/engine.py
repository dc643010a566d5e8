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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
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


@dataclass(frozen=True, slots=True)
class _Template:
    """A template cut once into its text and its ``{name}`` parts: ``literals`` has one more item
    than ``names``; ``heads`` are the fields the names are of (``contacts`` for ``contacts.date``)."""

    literals: tuple[str, ...]
    names: tuple[str, ...]
    heads: tuple[str, ...]

    @staticmethod
    def of(template: str) -> _Template:
        parts = _TEMPLATE.split(template)
        names = tuple(parts[1::2])
        return _Template(tuple(parts[0::2]), names, tuple(name.partition(".")[0] for name in names))


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


@lru_cache(maxsize=4096)
def _identified(type: str, system: str, value: str) -> tuple[str, str]:
    """The id and the business identity of the ``type`` resource with this identifier. Cached
    (bounded): the same practices, practitioners and services come in record after record."""
    condition = identity(system, value)
    return deterministic_id(type, condition), condition


def _copied(value: Any) -> Any:
    """A copy of the JSON-like ``value`` (objects and arrays copied, the rest immutable): what is put
    in a resource must not be shared with a spec constant, a record's values or another resource,
    as later rules add to it. Much cheaper than copy.deepcopy."""
    if isinstance(value, dict):
        return {key: _copied(item) if isinstance(item, dict | list) else item for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) if isinstance(item, dict | list) else item for item in value]
    return value


def _merge(target: dict[str, Any], name: str, value: Any) -> None:
    current = target.get(name)
    if isinstance(current, dict) and isinstance(value, dict):
        current.update(value)
    else:
        target[name] = value


def _put(node: dict[str, Any], path: Sequence[Step], value: Any) -> None:
    """Put ``value`` at ``path`` under ``node``; ``[*]`` steps take one value per element. The value
    is the resource's own (``Mapper._value``), so it is put without a copy."""
    last = len(path) - 1
    for depth, step in enumerate(path):
        if step.index is None:
            if depth == last:
                _merge(node, step.name, value)
                return
            node = node.setdefault(step.name, {})
            continue
        items: list[Any] = node.setdefault(step.name, [])
        if step.index == -1:
            rest = path[depth + 1 :]
            for index, item in enumerate(value):
                if item is None:
                    continue
                while len(items) <= index:
                    items.append({})
                if rest:
                    _put(items[index], rest, item)
                elif isinstance(item, dict) and isinstance(items[index], dict):
                    items[index].update(item)
                else:
                    items[index] = item
            return
        while len(items) <= step.index:
            items.append({})
        if depth == last:
            if isinstance(value, dict) and isinstance(items[step.index], dict):
                items[step.index].update(value)
            else:
                items[step.index] = value
            return
        node = items[step.index]


def _prune(node: dict[str, Any], found: set[str]) -> bool:
    """Remove from ``node`` (in place) the empty objects, lists and strings and the nulls left by
    rules that found nothing; collect the ids of its ``urn:uuid:`` references into ``found`` on the
    way (as :func:`_references` would). False when nothing is left."""
    empty: list[str] = []
    for key, item in node.items():
        # Scalars are tested here, not in a call: most of a resource's values are.
        if isinstance(item, dict):
            kept = _prune(item, found)
        elif isinstance(item, list):
            kept = _prune_items(item, found)
        else:
            kept = item is not None and item != ""
        if not kept:
            empty.append(key)
    for key in empty:
        del node[key]
    reference = node.get("reference")
    if isinstance(reference, str) and reference.startswith("urn:uuid:"):
        found.add(reference[9:])
    return bool(node)


def _prune_items(items: list[Any], found: set[str]) -> bool:
    """:func:`_prune` for a list: its empty items removed (in place)."""
    kept = [
        item
        for item in items
        if (
            _prune(item, found)
            if isinstance(item, dict)
            else _prune_items(item, found)
            if isinstance(item, list)
            else item is not None and item != ""
        )
    ]
    if len(kept) < len(items):
        items[:] = kept
    return bool(items)


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


def _referenced_first(
    resources: list[MappedResource], known: dict[str, set[str]] | None = None
) -> list[MappedResource]:
    """The resources ordered so that each comes after the ones it refers to (cycles broken in input
    order): a reference is then checked against a target already known to be valid. ``known``: the
    references of resources by id, where the engine collected them while building."""
    by_id = {item.resource["id"]: item for item in resources}
    ordered: list[MappedResource] = []
    state: dict[str, int] = {}

    def visit(item: MappedResource) -> None:
        id = item.resource["id"]
        if state.get(id):
            return
        state[id] = 1
        found = known.get(id) if known is not None else None
        for target in sorted(found if found is not None else _references(item.resource, set())):
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
        # Each resource's rules, with whether they repeat ([*]): worked out once, not per record.
        self._rules: dict[str, tuple[tuple[RuleSpec, bool], ...]] = {
            resource.key: tuple((rule, rule.repeats) for rule in resource.rules) for resource in spec.resources
        }
        # Its templates (identities and rules) cut into parts once: they are filled for every record.
        self._templates: dict[str, _Template] = {
            template: _Template.of(template)
            for resource in spec.resources
            for template in (resource.identity, *(rule.template for rule in resource.rules))
            if template is not None
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
                references = None
            else:
                record = extract(self.spec, raw)
                result.unused, result.defaults = record.unused, record.defaults
                mapped, references = self._build(record)
                result.unused += mapped.unused
            targets = {f"urn:uuid:{item.resource.get('id')}": item.resource for item in mapped.resources}
            conformance: dict[tuple[int, str], bool] = {}
            for item in _referenced_first(mapped.resources, references):
                found = references.get(item.resource["id"]) if references is not None else None
                self._validate(item, raw.number, targets, conformance, refers=bool(found))
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
        refers: bool = False,
    ) -> None:
        resource = item.resource
        # What a reference must resolve to (a profile discriminator) may differ between records,
        # so only resources without references are checked once for all, by their JSON as key
        # (None: not shared; ``refers``: the resource is known to have a reference).
        key = None if refers else orjson.dumps(resource, option=orjson.OPT_SORT_KEYS, default=str)
        if key is not None and b'"urn:uuid:' in key:
            key = None
        if key is not None and key in self._checked:
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
            if key is not None:
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
        return self._build(record)[0]

    def _build(self, record: Record) -> tuple[Mapped, dict[str, set[str]]]:
        """:meth:`build`, and the ``urn:uuid:`` references of each resource by id (found while
        pruning it: no second walk of the resource)."""
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
        built: list[tuple[MappedResource, set[str]]] = []
        for resource in spec.resources:
            if resource.for_each is not None:
                for entry in each[resource.key]:
                    if entry is not None:
                        built.append(self._resource(resource, entry[0], entry[1], ids, used, listed))
            elif resource.key in ids:
                built.append(self._resource(resource, values, ids[resource.key], ids, used, listed))
        mapped = Mapped(resources=_merged([item for item, _ in built]))
        references: dict[str, set[str]] = {}
        merged: set[str] = set()
        for item, found in built:
            id = item.resource["id"]
            if id in references:
                merged.add(id)
            references[id] = found
        for id in merged:
            # Filled from another resource of the same id (_merged): its references are looked for again.
            del references[id]
        for name, value in values.items():
            if name not in used and value not in (None, [], ""):
                mapped.unused.append(name)
        return mapped, references

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
        """``template`` with each ``{name}`` replaced by that field's value, else that constant; None
        when a name has neither."""
        parts = self._templates[template]
        constants = self.spec.constants
        text = [parts.literals[0]]
        missing = False
        for name, head, literal in zip(parts.names, parts.heads, parts.literals[1:], strict=True):
            value = values.get(name)
            if value is not None:
                if used is not None:
                    used.add(head)
                text.append(str(value).lower() if isinstance(value, bool) else str(value))
            elif name in constants:
                text.append(constants[name])
            else:
                missing = True
            text.append(literal)
        return None if missing else "".join(text)

    def _identify(self, resource: ResourceSpec, values: dict[str, Any], number: int) -> tuple[str, str, str | None]:
        if resource.identity is None:
            raise MappingError(f"resource {resource.key!r} has no identity in the spec", record=number)
        text = self._render(resource.identity, values)
        system, _, value = (text or "").partition("|")
        if not value:
            raise MappingError(f"cannot identify the {resource.type}: {resource.identity} has no value", record=number)
        return (resource.type, *_identified(resource.type, system, value))

    def _resource(
        self,
        resource: ResourceSpec,
        values: dict[str, Any],
        own: tuple[str, str, str | None],
        ids: dict[str, tuple[str, str, str | None]],
        used: set[str],
        listed: dict[str, list[str | None]],
    ) -> tuple[MappedResource, set[str]]:
        """One resource, and the ids of the resources it refers to (``urn:uuid:``)."""
        body: dict[str, Any] = {"resourceType": resource.type, "id": own[1]}
        if resource.profile:
            body["meta"] = {"profile": [resource.profile]}
        for rule, repeats in self._rules[resource.key]:
            if rule.when is not None and not self._applies(rule.when, values):
                continue
            value = self._value(rule, values, ids, used, listed)
            if value is None or value == []:
                continue
            if repeats and not isinstance(value, list):
                value = [value]
            _put(body, rule.path, value)
        found: set[str] = set()
        _prune(body, found)
        return MappedResource(body, own[2], resource.key), found

    def _value(
        self,
        rule: RuleSpec,
        values: dict[str, Any],
        ids: dict[str, tuple[str, str, str | None]],
        used: set[str],
        listed: dict[str, list[str | None]],
    ) -> Any:
        """The value ``rule`` puts for this record: the resource's own, made for it or copied (a
        spec's value, a record's list or a helper's result may be shared)."""
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
                return _copied(HELPERS[rule.helper](*arguments))
            except ArgumentError as exc:
                # The helper names its argument at fault by position; the record's field by name.
                raise MappingError(exc.message, field=rule.args[exc.argument]) from exc
        if rule.field is not None:
            value = self._field(rule.field, values, used)
            if value is None or rule.lookup is None:
                return _copied(value)
            if isinstance(value, list):
                return [None if item is None else _lookup_value(spec, rule.lookup, item) for item in value]
            return _lookup_value(spec, rule.lookup, value)
        return _copied(rule.value)

    def _field(self, name: str, values: dict[str, Any], used: set[str]) -> Any:
        if name in values:
            used.add(name.partition(".")[0])
            return values[name]
        group, _, sub = name.partition(".")
        if sub and isinstance(values.get(group), list):
            used.add(group)
            return [item.get(sub) for item in values[group]]
        return None
