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
from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple, TypeAlias

import orjson

from adapter.mapping.base import Mapped, MappedResource, MappingError
from adapter.mapping.helpers import HELPERS, ArgumentError
from adapter.mapping.ids import deterministic_id, identity
from adapter.mapping.sources import RawRecord, Record, extract
from adapter.mapping.spec import Lookup, MappingSpec, ResourceSpec, RuleSpec, Step
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
    #: (name, head, the literal after it) for each name: what :meth:`Mapper._render` loops over.
    parts: tuple[tuple[str, str, str], ...]

    @staticmethod
    def of(template: str) -> _Template:
        parts = _TEMPLATE.split(template)
        literals, names = tuple(parts[0::2]), tuple(parts[1::2])
        heads = tuple(name.partition(".")[0] for name in names)
        return _Template(literals, names, heads, tuple(zip(names, heads, literals[1:], strict=True)))


@dataclass(slots=True)
class MappedRecord:
    """One record's result: its resources (validated) or why it was rejected, and its trace."""

    number: int
    resources: list[MappedResource] = field(default_factory=list)
    error: MappingError | None = None
    unused: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)


def _looked_up(lookup: Lookup, value: Any) -> Any:
    """The FHIR value ``lookup`` gives for the source value ``value`` (a copy), or None."""
    row = lookup(str(value).lower() if isinstance(value, bool) else str(value))
    if row is None:
        return None
    return next(iter(row.values())) if len(lookup.columns) == 1 else dict(row)


# How a rule makes its value (:class:`_Rule`): a reference to another resource of the record, a
# template of constants only (its text), another template, a helper, a field's value, a field's
# value through a lookup, the spec's value (an object without objects or arrays in it, or another).
_REFERENCE, _TEXT, _FILL, _HELPER, _FIELD, _LOOKUP, _FLAT, _CONSTANT = range(8)


class _Rule(NamedTuple):
    """A rule as :meth:`Mapper._resource` runs it (see :meth:`Mapper._plan`)."""

    kind: int
    #: The field and value of the rule's ``when`` (:func:`_when`), or None.
    when: tuple[str, str] | None
    repeats: bool
    #: The path's steps but the last, and the last one's name and index (for :func:`_put_at`,
    #: when the path has no ``[*]``; the others go through :func:`_put`).
    init: tuple[tuple[str, int | None], ...]
    name: str
    position: int | None
    rule: RuleSpec
    #: By kind: the resource referred to, the text, the template, (field, sub-field), the value.
    source: Any
    #: Whether the value, whatever the record, is one that :func:`_prune` leaves as it is and finds
    #: no reference in (:func:`_clean`): for a text, the spec's values and a lookup's objects.
    clean: bool = False


def _when(when: str) -> tuple[str, str]:
    """A ``when`` (``field`` or ``field=value``) as (field, value; "" for any value)."""
    name, _, expected = when.partition("=")
    return name, expected


def _applies(when: tuple[str, str], values: dict[str, Any]) -> bool:
    name, expected = when
    value = values.get(name)
    if expected:
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return value is not None and shown == expected
    return value is not None and value != [] and value is not False


#: Values :func:`_prune` always keeps (beside non-empty strings).
_SCALARS = frozenset((int, float, bool, Decimal))


def _clean(value: Any) -> bool:
    """Whether :func:`_prune` leaves ``value`` as it is and finds no reference in it: non-empty
    strings, numbers and booleans, in non-empty objects (without a ``reference``) and arrays."""
    cls = value.__class__
    if cls is str:
        return bool(value)
    if cls is dict:
        return bool(value) and "reference" not in value and all(_clean(item) for item in value.values())
    if cls is list:
        return bool(value) and all(_clean(item) for item in value)
    return cls in _SCALARS


def _same_step(a: Step, b: Step) -> bool:
    """Whether two path steps may be the same element (``[*]`` and no index may be any item)."""
    if a.name != b.name:
        return False
    return a.index == b.index or None in (a.index, b.index) or -1 in (a.index, b.index)


def _tracked(rules: Sequence[RuleSpec]) -> bool:
    """Whether the references of a resource made by ``rules`` are the ones its reference rules put:
    no other rule puts a ``reference``, and none after a reference rule puts a value at its path,
    above it (which would replace it) or at its ``reference``."""
    for position, rule in enumerate(rules):
        if rule.reference is None:
            if rule.path[-1].name == "reference":
                return False
            continue
        path = rule.path
        for later in rules[position + 1 :]:
            steps = later.path
            above = len(steps) <= len(path) or (len(steps) == len(path) + 1 and steps[-1].name == "reference")
            if above and all(_same_step(a, b) for a, b in zip(steps, path, strict=False)):
                return False
    return True


def _is_field(spec: MappingSpec, name: str) -> bool:
    try:
        spec.field(name)
    except KeyError:
        return False
    return True


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
    is the resource's own (see ``Mapper._resource``), so it is put without a copy."""
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


def _put_at(
    node: dict[str, Any], init: tuple[tuple[str, int | None], ...], name: str, index: int | None, value: Any
) -> bool:
    """:func:`_put` for a path without ``[*]``: its steps but the last as (name, index) pairs, and
    the last one's name and index (worked out once per rule, not per record). True when an index
    left a gap (an empty object before the item put, for :func:`_prune` to remove)."""
    gap = False
    for step, position in init:
        if position is None:
            node = node.setdefault(step, {})
            continue
        items = node.setdefault(step, [])
        if len(items) <= position:  # most rules put into an item an earlier rule made
            gap = _grow(items, position) or gap
        node = items[position]
    if index is None:
        _merge(node, name, value)
        return gap
    items = node.setdefault(name, [])
    if len(items) <= index:
        gap = _grow(items, index) or gap
    if isinstance(value, dict) and isinstance(items[index], dict):
        items[index].update(value)
    else:
        items[index] = value
    return gap


def _field_value(name: str, head: str, sub: str, values: dict[str, Any], used: set[str]) -> Any:
    """The record's value of the field ``name`` (``head``, and ``sub`` for a group's field): one
    value, or a group's values as a list; None when it has none. Marks ``head`` used."""
    if name in values:
        used.add(head)
        return values[name]
    if sub and isinstance(values.get(head), list):
        used.add(head)
        return [item.get(sub) for item in values[head]]
    return None


def _grow(items: list[Any], position: int) -> bool:
    """Empty objects appended to ``items`` until it has an item at ``position``; True when that
    left a gap (an empty object before ``position``)."""
    gap = len(items) < position
    while len(items) <= position:
        items.append({})
    return gap


def _prune(node: dict[str, Any], found: set[str]) -> bool:
    """Remove from ``node`` (in place) the empty objects, lists and strings and the nulls left by
    rules that found nothing; collect the ids of its ``urn:uuid:`` references into ``found`` on the
    way (as :func:`_references` would). False when nothing is left."""
    empty: list[str] | None = None
    for key, item in node.items():
        # Strings are tested here, not in a call: most of a resource's values are.
        if item.__class__ is str:
            if item:
                continue
            kept = False
        else:
            kept = _kept(item, found)
        if not kept:
            if empty is None:
                empty = []
            empty.append(key)
    if empty is not None:
        for key in empty:
            del node[key]
    reference = node.get("reference")
    if isinstance(reference, str) and reference.startswith("urn:uuid:"):
        found.add(reference[9:])
    return bool(node)


def _kept(item: Any, found: set[str]) -> bool:
    """Whether :func:`_prune` keeps ``item``, a value other than a plain string (an object or
    array pruned first, in place)."""
    if isinstance(item, dict):
        return _prune(item, found)
    if isinstance(item, list):
        return _prune_items(item, found)
    return item is not None and item != ""


def _prune_items(items: list[Any], found: set[str]) -> bool:
    """:func:`_prune` for a list: its empty items removed (in place)."""
    rest: list[Any] | None = None  # the items kept, once one is not
    for position, item in enumerate(items):
        kept = item != "" if item.__class__ is str else _kept(item, found)
        if rest is not None:
            if kept:
                rest.append(item)
        elif not kept:
            rest = items[:position]
    if rest is not None:
        items[:] = rest
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


#: What the validation of a resource depends on (:func:`_check_key`): its JSON, and for a resource
#: with references, the keys of the resources of the record it refers to (None: not in the record).
_CheckKey: TypeAlias = "bytes | tuple[bytes, tuple[_CheckKey | None, ...]]"


def _check_key(
    resource: dict[str, Any],
    refers: set[str] | None,
    targets: dict[str, dict[str, Any]],
    repeated: dict[str, _CheckKey],
) -> _CheckKey | None:
    """The key under which ``resource``'s validation is remembered, or None when it is not. A
    reference is checked against what it resolves to in the record (its type, its profile; a
    profile discriminator), so a resource with references is the same as an earlier one only when
    each of its targets is too (``repeated``: the targets found identical to earlier ones); one
    whose references are not known (``refers`` None) and has a ``urn:uuid:`` reference is not."""
    if refers:
        for id in refers:
            if id not in repeated and f"urn:uuid:{id}" in targets:
                return None  # a target not met before (the person's Patient): nor is this resource
    key = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS, default=str)
    if refers:
        # Each target's key, or None for a reference that resolves to nothing (in any record).
        return key, tuple(repeated.get(id) for id in sorted(refers))
    return None if b'"urn:uuid:' in key else key


class Mapper:
    """Runs one spec on records. ``validator`` checks every resource (R4 and declared profiles)."""

    def __init__(self, spec: MappingSpec, validator: Validator) -> None:
        self.spec = spec
        self.validator = validator
        # Identical resources (the practice of every referral from one surgery, the link worker's
        # role in every case) are checked once: their problem (or None) by :func:`_check_key`.
        self._checked: dict[_CheckKey, str | None] = {}
        # The field a rule took its value from, by (resource key, path without indexes): a profile
        # issue at that path is reported against that field.
        self._rule_fields: dict[tuple[str | None, str], str | None] = {
            (resource.key, re.sub(r"\[[^]]*]", "", rule.text)): rule.field or (rule.args[0] if rule.args else None)
            for resource in spec.resources
            for rule in resource.rules
        }
        # Its templates (identities and rules) cut into parts once: they are filled for every record.
        self._templates: dict[str, _Template] = {
            template: _Template.of(template)
            for resource in spec.resources
            for template in (resource.identity, *(rule.template for rule in resource.rules))
            if template is not None
        }
        # Each resource's rules as :meth:`_resource` runs them: worked out once, not per record.
        self._rules: dict[str, tuple[_Rule, ...]] = {
            resource.key: tuple(self._plan(rule) for rule in resource.rules) for resource in spec.resources
        }
        # The resources whose references can be collected as their rules put them (see _resource).
        self._tracked: dict[str, bool] = {resource.key: _tracked(resource.rules) for resource in spec.resources}

    def _plan(self, rule: RuleSpec) -> _Rule:
        """``rule`` as :meth:`_resource` runs it: what kind of value it takes, from what, and where
        it puts it."""
        spec = self.spec
        when = None if rule.when is None else _when(rule.when)
        init = tuple((step.name, step.index) for step in rule.path[:-1])
        last = rule.path[-1]
        if rule.reference is not None:
            return _Rule(_REFERENCE, when, rule.repeats, init, last.name, last.index, rule, rule.reference)
        if rule.template is not None:
            template = self._templates[rule.template]
            if all(name in spec.constants and not _is_field(spec, name) for name in template.names):
                # Constants only (``{ods_system}``): no record can change the text.
                text = self._render(rule.template, {})
                return _Rule(_TEXT, when, rule.repeats, init, last.name, last.index, rule, text, _clean(text))
            return _Rule(_FILL, when, rule.repeats, init, last.name, last.index, rule, template)
        if rule.helper is not None:
            return _Rule(_HELPER, when, rule.repeats, init, last.name, last.index, rule, None)
        if rule.field is not None:
            head, _, sub = rule.field.partition(".")
            if rule.lookup is None:
                return _Rule(_FIELD, when, rule.repeats, init, last.name, last.index, rule, (head, sub))
            rows = spec.lookups[rule.lookup].rows.values()
            clean = all(_clean(row) for row in rows)
            return _Rule(_LOOKUP, when, rule.repeats, init, last.name, last.index, rule, (head, sub), clean)
        clean = _clean(rule.value)
        if rule.value.__class__ is dict and not any(isinstance(item, dict | list) for item in rule.value.values()):
            # A flat object (a Coding): a shallow copy is a whole one.
            return _Rule(_FLAT, when, rule.repeats, init, last.name, last.index, rule, rule.value, clean)
        return _Rule(_CONSTANT, when, rule.repeats, init, last.name, last.index, rule, rule.value, clean)

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
            repeated: dict[str, _CheckKey] = {}
            for item in _referenced_first(mapped.resources, references):
                found = references.get(item.resource["id"]) if references is not None else None
                self._validate(item, raw.number, targets, conformance, found, repeated)
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
        refers: set[str] | None,
        repeated: dict[str, _CheckKey],
    ) -> None:
        """Validate ``item``, or take the answer for an identical resource checked before.
        ``refers``: the ids of the resources it refers to (``urn:uuid:``), when known;
        ``repeated``: the keys of the record's resources found identical to earlier ones, by id
        (this one is added when it is)."""
        resource = item.resource
        key = _check_key(resource, refers, targets, repeated)
        if key is not None and key in self._checked:
            repeated[resource["id"]] = key
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
        return when is None or _applies(_when(when), values)

    def _render(self, template: str, values: dict[str, Any], used: set[str] | None = None) -> str | None:
        """``template`` with each ``{name}`` replaced by that field's value, else that constant; None
        when a name has neither."""
        return self._fill(self._templates[template], values, used)

    def _fill(self, parts: _Template, values: dict[str, Any], used: set[str] | None = None) -> str | None:
        """:meth:`_render` of a template cut into its parts."""
        constants = self.spec.constants
        text = [parts.literals[0]]
        missing = False
        for name, head, literal in parts.parts:
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
        """One resource, and the ids of the resources it refers to (``urn:uuid:``). Each rule's
        value is the resource's own, made for it or copied (a spec's value, a record's list or a
        helper's result may be shared), put at its path (:func:`_put`)."""
        body: dict[str, Any] = {"resourceType": resource.type, "id": own[1]}
        if resource.profile:
            body["meta"] = {"profile": [resource.profile]}
        value: Any
        # While every value put is clean (:func:`_clean`) and no index leaves a gap, the resource
        # needs no pruning and its references are the ones its reference rules put: pruning, a
        # walk of the whole resource, is only done when a value may have left something to prune.
        refs: list[str] | None = [] if self._tracked[resource.key] else None
        for kind, when, repeats, init, name, position, rule, source, clean in self._rules[resource.key]:
            if when is not None and not _applies(when, values):
                continue
            if kind in (_FIELD, _LOOKUP):
                head, sub = source
                value = _field_value(rule.field, head, sub, values, used)  # type: ignore[arg-type]
                if value is None:
                    continue  # no value: nothing to put
                if kind == _LOOKUP:
                    lookup = self.spec.lookups[rule.lookup]  # type: ignore[index]
                    if isinstance(value, list):
                        value = [None if item is None else _looked_up(lookup, item) for item in value]
                    else:
                        value = _looked_up(lookup, value)
                elif value.__class__ is not str:
                    value = _copied(value)
            elif kind == _TEXT:
                value = source
            elif kind == _FLAT:
                value = source.copy()
            elif kind == _CONSTANT:
                value = _copied(source)
            elif kind == _REFERENCE:
                if source in listed:
                    value = [None if id is None else {"reference": f"urn:uuid:{id}"} for id in listed[source]]
                else:
                    target = ids.get(source)
                    value = None if target is None else {"reference": f"urn:uuid:{target[1]}"}
            elif kind == _FILL:
                value = self._fill(source, values, used)
            else:
                value = self._helper(rule, values, used)
            if value is None or value == []:
                continue
            if refs is not None:
                cls = value.__class__
                if kind == _REFERENCE:
                    if cls is dict:
                        refs.append(value["reference"][9:])
                    else:
                        refs = None  # one per group item, None where an item gives none
                elif cls is str:
                    if not value:
                        refs = None
                elif cls in _SCALARS:
                    pass
                elif kind == _LOOKUP:
                    if cls is not dict or not clean:
                        refs = None  # a list (a group's values), or a table with empty rows
                elif kind not in (_FLAT, _CONSTANT) or not clean:
                    refs = None  # a record's objects and lists, a helper's: pruned
            if repeats:
                _put(body, rule.path, value if isinstance(value, list) else [value])
                refs = None
            elif init or position is not None:
                if _put_at(body, init, name, position, value):
                    refs = None
            else:  # one step (``status``), the commonest: _merge without the call
                current = body.get(name)
                if isinstance(current, dict) and isinstance(value, dict):
                    current.update(value)
                else:
                    body[name] = value
        if refs is not None:
            return MappedResource(body, own[2], resource.key), set(refs)
        found: set[str] = set()
        _prune(body, found)
        return MappedResource(body, own[2], resource.key), found

    def _helper(self, rule: RuleSpec, values: dict[str, Any], used: set[str]) -> Any:
        """What the rule's helper gives for the record's values of its arguments (a copy)."""
        spec = self.spec
        arguments = [
            spec.constants[name] if name in spec.constants else self._field(name, values, used) for name in rule.args
        ]
        try:
            return _copied(HELPERS[rule.helper](*arguments))  # type: ignore[index]
        except ArgumentError as exc:
            # The helper names its argument at fault by position; the record's field by name.
            raise MappingError(exc.message, field=rule.args[exc.argument]) from exc

    def _field(self, name: str, values: dict[str, Any], used: set[str]) -> Any:
        head, _, sub = name.partition(".")
        return _field_value(name, head, sub, values, used)
