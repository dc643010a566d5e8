"""Reverse mappings: FHIR resources back to flat source records, for reporting.

The same spec drives both ways. Each resource of the spec's ``reverse.anchor`` (the referral, the
case, the assessment) gives one record; the record's other resources are found by following the
spec's ``reference`` rules from it, both ways (the Patient the referral points at, the Task that
points at the referral). The resources of a ``for_each`` spec belong to the record when one of its
resources lists them (``CarePlan.goal[*]``), else when they refer to the anchor (the case's
Encounters, not the person's others). Every rule that took a ``field`` gives that field back: lookups
are inverted (to the first source value of the FHIR value), dates written in the field's first
format, booleans as its first true/false word, repeating values joined with its separator, and
helpers through their inverse; extensions are found by their url; a template of a ``for_each``
resource gives back the group fields it names (``{case_id}/contact/{contacts.contact_id}``). For
every field a mapping covers, source -> FHIR -> source gives the same value
(``tests/mapping/test_engine.py``, ``test_sp_case.py``, ``test_sp_outcomes.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from adapter.mapping.helpers import INVERSES
from adapter.mapping.sources import _LONDON
from adapter.mapping.spec import FieldSpec, MappingSpec, ResourceSpec, RuleSpec, SpecError, Step

__all__ = ["Resolver", "unmap"]

_PLACEHOLDER = re.compile(r"{([A-Za-z_][A-Za-z0-9_.]*)}")
#: Field types whose source text is what a template writes (a date's is not: it has its format).
_AS_WRITTEN = ("string", "code", "ods-code", "nhs-number", "integer")


class Resolver:
    """The resources to unmap, found by ``urn:uuid:<id>``, ``Type/id`` or by type."""

    def __init__(self, resources: Iterable[dict[str, Any]]) -> None:
        self.by_reference: dict[str, dict[str, Any]] = {}
        self.by_type: dict[str, list[dict[str, Any]]] = {}
        for resource in resources:
            type, id = resource.get("resourceType"), resource.get("id")
            if not isinstance(type, str) or not isinstance(id, str):
                continue
            if f"{type}/{id}" in self.by_reference:
                continue
            self.by_reference[f"{type}/{id}"] = resource
            self.by_reference[f"urn:uuid:{id}"] = resource
            self.by_type.setdefault(type, []).append(resource)

    def resolve(self, reference: Any) -> dict[str, Any] | None:
        text = reference.get("reference") if isinstance(reference, dict) else None
        return self.by_reference.get(text) if isinstance(text, str) else None


def _extension_urls(resource: ResourceSpec) -> dict[tuple[Step, ...], str]:
    """The extensions the rules put, by path and url (``extension[1].url: <url>``). A reverse mapping
    finds an extension by its url, not its position: an extension left without a value is dropped
    and the next ones move up (https://hl7.org/fhir/R4/extensibility.html#Extension)."""
    return {
        rule.path[:-1]: rule.value
        for rule in resource.rules
        if isinstance(rule.value, str)
        and len(rule.path) >= 2
        and rule.path[-1].name == "url"
        and rule.path[-2].name in ("extension", "modifierExtension")
        and (rule.path[-2].index or 0) >= 0
    }


def _get(node: Any, path: tuple[Step, ...], urls: dict[tuple[Step, ...], str] | None = None) -> Any:
    """The value at ``path``; a list (one item per element) where the path has ``[*]``. ``urls``
    (:func:`_extension_urls`) picks extensions by url."""
    for position, step in enumerate(path):
        if not isinstance(node, dict):
            return None
        node = node.get(step.name)
        if step.index is None:
            continue
        if not isinstance(node, list):
            return None
        if step.index == -1:
            rest = path[position + 1 :]
            inner = {
                key[position + 1 :]: url
                for key, url in (urls or {}).items()
                if key[: position + 1] == path[: position + 1]
            }
            return [_get(item, rest, inner) if rest else item for item in node]
        url = (urls or {}).get(path[: position + 1])
        if url is not None:
            node = next((item for item in node if isinstance(item, dict) and item.get("url") == url), None)
        else:
            node = node[step.index] if step.index < len(node) else None
    return node


def _text(spec: MappingSpec, field: FieldSpec, value: Any) -> str | None:
    """A typed value as the source writes it."""
    if value is None:
        return None
    if isinstance(value, bool):
        return field.true_values[0] if value else field.false_values[0]
    if field.type == "date" and isinstance(value, str) and field.formats:
        return datetime.strptime(value[:10], "%Y-%m-%d").strftime(field.formats[0])
    if field.type == "datetime" and isinstance(value, str) and field.formats:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment.astimezone(_LONDON).strftime(field.formats[0])
    if isinstance(value, Decimal | int | float):
        return str(value)
    return str(value)


def _source(spec: MappingSpec, rule: RuleSpec, value: Any) -> Any:
    """The source value a rule's FHIR value came from (before formatting)."""
    if value is None:
        return None
    if rule.lookup is not None:
        lookup = spec.lookups[rule.lookup]
        target = value if isinstance(value, dict) else {lookup.columns[0]: value}
        return lookup.source_for({key: str(item) for key, item in target.items()})
    if rule.helper is not None:
        inverse = INVERSES.get(rule.helper)
        return inverse(value) if inverse is not None else None
    return value


def _linked(spec: MappingSpec, anchor: dict[str, Any], key: str, resolver: Resolver) -> dict[str, dict[str, Any]]:
    """The record's resources by spec key, found from the anchor along the reference rules: first
    the resources the record's resources refer to; then, for those none of them refers to, the
    resources that refer to one of the record's (the Task that points at the referral). A resource
    the record refers to is never looked for the other way: the person's other assessments point at
    the same Patient."""
    found = {key: anchor}
    edges = [
        (resource, rule)
        for resource in spec.resources
        if resource.for_each is None
        for rule in resource.rules
        if rule.reference is not None
    ]
    referred = {rule.reference for _, rule in edges}
    changed = True
    while changed:
        changed = False
        for resource, rule in edges:
            target = rule.reference
            assert target is not None
            if resource.key in found and target not in found:
                hit = resolver.resolve(_get(found[resource.key], rule.path))
                if hit is not None:
                    found[target] = hit
                    changed = True
        if changed:
            continue
        for resource, rule in edges:
            target = rule.reference
            assert target is not None
            if target in found and resource.key not in found and resource.key not in referred:
                wanted = {f"urn:uuid:{found[target]['id']}", f"{found[target]['resourceType']}/{found[target]['id']}"}
                for candidate in resolver.by_type.get(resource.type, ()):
                    reference = _get(candidate, rule.path)
                    if isinstance(reference, dict) and reference.get("reference") in wanted:
                        found[resource.key] = candidate
                        changed = True
                        break
            if changed:
                break
    return found


def _group_items(
    spec: MappingSpec, resource: ResourceSpec, found: dict[str, dict[str, Any]], resolver: Resolver, anchor: str
) -> list[dict[str, Any]]:
    """The resources of a ``for_each`` resource spec that belong to this record: those a resource of
    the record lists (``CarePlan.goal[*]``, in its order); else those that refer to the anchor (the
    Encounters of this case, not the person's others); else those that refer to any of the record."""
    items: list[dict[str, Any]] = []
    listings = [(owner.key, rule) for owner in spec.resources if owner.key in found for rule in owner.rules]
    listings = [(key, rule) for key, rule in listings if rule.reference == resource.key]
    for key, rule in listings:
        references = _get(found[key], rule.path)
        for reference in references if isinstance(references, list) else [references]:
            hit = resolver.resolve(reference)
            if hit is not None and all(hit is not item for item in items):
                items.append(hit)
    if listings:
        return items
    wanted = {f"urn:uuid:{item['id']}" for item in found.values()} | {
        f"{item['resourceType']}/{item['id']}" for item in found.values()
    }
    rules = [rule for rule in resource.rules if rule.reference is not None]
    rules = [rule for rule in rules if rule.reference == anchor] or rules
    for candidate in resolver.by_type.get(resource.type, ()):
        for rule in rules:
            if rule.reference is not None:
                reference = _get(candidate, rule.path)
                if isinstance(reference, dict) and reference.get("reference") in wanted:
                    items.append(candidate)
                    break
    return items


def unmap(spec: MappingSpec, resolver: Resolver) -> Iterator[dict[str, Any]]:
    """One flat record per anchor resource: field name -> source text (groups: lists of dicts)."""
    anchor_key = (spec.raw.get("reverse") or {}).get("anchor")
    anchors = [resource for resource in spec.resources if resource.key == anchor_key]
    if not anchors:
        raise SpecError(f"mapping {spec.name!r} has no reverse.anchor naming one of its resources")
    anchor_spec = anchors[0]
    for anchor in resolver.by_type.get(anchor_spec.type, ()):
        # Only resources of the anchor's profile are records of this mapping (a GP Connect
        # ServiceRequest in the same Bundle is not a social prescribing referral).
        declared = (anchor.get("meta") or {}).get("profile") or []
        if anchor_spec.profile and anchor_spec.profile not in declared:
            continue
        found = _linked(spec, anchor, anchor_spec.key, resolver)
        record: dict[str, Any] = {}
        for resource in spec.resources:
            urls = _extension_urls(resource)
            if resource.for_each is not None:
                group = spec.field(resource.for_each)
                items = []
                for instance in _group_items(spec, resource, found, resolver, anchor_spec.key):
                    item: dict[str, Any] = {}
                    for rule in resource.rules:
                        name = rule.field or (rule.args[0] if rule.helper and rule.args else None)
                        if name and name.startswith(f"{resource.for_each}."):
                            _fill(spec, rule, instance, item, name.split(".", 1)[1], group, urls)
                        elif rule.template is not None:
                            _fill_template(spec, rule, instance, record, item, group)
                    if item:
                        items.append(item)
                if items and resource.for_each not in record:
                    record[resource.for_each] = items
                continue
            single = found.get(resource.key)
            if single is None:
                continue
            for rule in resource.rules:
                name = rule.field or (rule.args[0] if rule.helper and rule.args else None)
                if name is None or name in record or name in spec.constants:
                    continue
                if "." in name:
                    _fill_group_list(spec, rule, single, record, name, urls)
                else:
                    _fill(spec, rule, single, record, name, None, urls)
        yield record


def _fill(
    spec: MappingSpec,
    rule: RuleSpec,
    instance: dict[str, Any],
    record: dict[str, Any],
    name: str,
    group: FieldSpec | None,
    urls: dict[tuple[Step, ...], str] | None = None,
) -> None:
    if name in record:
        return
    field = spec.field(f"{group.name}.{name}") if group is not None else spec.field(name)
    value = _get(instance, rule.path, urls)
    if isinstance(value, list) and rule.repeats:
        values = [_text(spec, field, _source(spec, rule, item)) for item in value]
        kept = [item for item in values if item is not None]
        if kept:
            record[name] = field.separator.join(kept) if field.repeats else kept[0]
        return
    text = _text(spec, field, _source(spec, rule, value))
    if text is not None:
        record[name] = text


def _fill_template(
    spec: MappingSpec,
    rule: RuleSpec,
    instance: dict[str, Any],
    record: dict[str, Any],
    item: dict[str, Any],
    group: FieldSpec,
) -> None:
    """The group's sub-fields a template rule names (``{case_id}/contact/{contacts.contact_id}``), read
    back from the value it wrote: constants and the record's fields are known, each other name matches."""
    text = _get(instance, rule.path)
    if rule.template is None or not isinstance(text, str):
        return
    names, pattern = [], ""
    for index, part in enumerate(_PLACEHOLDER.split(rule.template)):
        if index % 2 == 0:
            pattern += re.escape(part)
        elif part in spec.constants:
            pattern += re.escape(spec.constants[part])
        elif "." not in part and isinstance(record.get(part), str) and spec.field(part).type in _AS_WRITTEN:
            pattern += re.escape(record[part])
        else:
            pattern += "(.+?)"
            names.append(part)
    found = re.fullmatch(pattern, text, re.DOTALL)
    if found is None:
        return
    for name, value in zip(names, found.groups(), strict=True):
        head, _, sub = name.partition(".")
        if head == group.name and sub not in item and spec.field(name).type in _AS_WRITTEN:
            item[sub] = value


def _fill_group_list(
    spec: MappingSpec,
    rule: RuleSpec,
    instance: dict[str, Any],
    record: dict[str, Any],
    name: str,
    urls: dict[tuple[Step, ...], str] | None = None,
) -> None:
    """A group's sub-field placed with ``[*]`` in a single resource (the activities of a plan)."""
    group_name, sub = name.split(".", 1)
    field = spec.field(name)
    values = _get(instance, rule.path, urls)
    if not isinstance(values, list):
        return
    items: list[dict[str, Any]] = record.setdefault(group_name, [])
    for index, value in enumerate(values):
        while len(items) <= index:
            items.append({})
        text = _text(spec, field, _source(spec, rule, value))
        if text is not None and sub not in items[index]:
            items[index][sub] = text


def csv_cell(value: Any) -> str:
    """A record value as one CSV cell: groups as JSON."""
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return "" if value is None else str(value)
