"""Profile validation: check resources against StructureDefinitions that constrain R4 (our profiles,
UK Core, any package), on top of the structural R4 validation.

Profiles with or without snapshots (architecture decision 2). A profile is compiled once into a
:class:`CompiledProfile`: the constraints of every element it (or a profile it derives from)
constrains, merged along the ``baseDefinition`` chain down to R4 core, keyed by element id
(``Patient.identifier:nhsNumber.system``). Without a snapshot the differentials are merged, most
derived last; with a snapshot its elements are used, minus what R4 core already says (R4 core is
checked by :class:`~adapter.validation.structure.StructuralValidator`). For validation the chain is
a conjunction of constraints, so merging differentials in order is enough; no full snapshot is built.

The walk visits only the parts of a resource that some element of the profile constrains, and checks
(https://hl7.org/fhir/R4/profiling.html, https://hl7.org/fhir/R4/elementdefinition.html):
cardinality, types (choice restrictions), ``fixed[x]`` and ``pattern[x]``, bindings (required: error,
extensible: warning; a ValueSet that cannot be expanded here gives an information issue "not
checked"), invariants (FHIRPath), min/max values and maxLength, ``type.profile`` (extensions are
checked against their definitions) and ``targetProfile`` (a reference that resolves inside the Bundle
or to a contained resource is checked against the target profile; otherwise its type is), and
slicing: discriminators ``value``, ``pattern``, ``exists``, ``type`` and ``profile``; open, closed and
openAtEnd rules; ordered slicing; per-slice cardinality; slices inside slices. Extensions are sliced
by ``url`` whether or not a profile says so (as in R4 core). Extensions no profile mentions are
checked against their definition when one is loaded; an unknown URL gets a warning (an error on a
modifierExtension) with a "did you mean" hint when a known URL is close.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any, TypeAlias

from adapter.fhir import fhirpath, model
from adapter.validation.base import Issue
from adapter.validation.packages import PackageSet
from adapter.validation.structure import StructuralValidator
from adapter.validation.terminology import LocalTerminology, Terminology

__all__ = ["CompiledProfile", "ProfileValidator", "Rule"]

CORE_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
_UNSET: Any = object()
_EXTENSIONS = ("extension", "modifierExtension")
_URL_SLICING: dict[str, Any] = {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}
_TYPE_SLICING: dict[str, Any] = {"discriminator": [{"type": "type", "path": "$this"}], "rules": "open"}


def _number(value: Any) -> Any:
    """Numbers compared as Decimal whatever parsed them (profiles are read with float, resources with Decimal)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return value
    return Decimal(str(value))


# _equal and _contains run for every slice discriminator and pattern: plain loops rather than
# all()/any() over generators, and strings compared directly (what _number leaves them as).


def _equal(a: Any, b: Any) -> bool:
    if a.__class__ is str and b.__class__ is str:
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return False
        for k in a:  # noqa: SIM110
            if not _equal(a[k], b[k]):
                return False
        return True
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b, strict=True):  # noqa: SIM110
            if not _equal(x, y):
                return False
        return True
    return bool(_number(a) == _number(b))


def _contains(value: Any, pattern: Any) -> bool:
    """``pattern[x]`` semantics: every element of the pattern is in the value; array items each match
    some item (https://hl7.org/fhir/R4/elementdefinition-definitions.html#ElementDefinition.pattern_x_)."""
    if pattern.__class__ is str and value.__class__ is str:
        return value == pattern
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        for k, v in pattern.items():  # noqa: SIM110
            if k not in value or not _contains(value[k], v):
                return False
        return True
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        for p in pattern:
            for item in items:
                if _contains(item, p):
                    break
            else:
                return False
        return True
    return bool(_number(value) == _number(pattern))


@dataclass(slots=True)
class Rule:
    """The merged constraints of one element id of a profile."""

    id: str
    min: int | None = None
    max: str | None = None
    types: list[dict[str, Any]] | None = None
    fixed: Any = _UNSET
    pattern: Any = _UNSET
    binding: dict[str, Any] | None = None
    constraints: dict[str, dict[str, Any]] = field(default_factory=dict)
    slicing: dict[str, Any] | None = None
    slice_name: str | None = None
    must_support: bool = False
    min_value: Any = _UNSET
    max_value: Any = _UNSET
    max_length: int | None = None

    # Derived from ``types`` once the profile is compiled (rules are not changed afterwards).
    _codes: frozenset[str] | None = None
    _profiles: tuple[str, ...] | None = None
    _targets: tuple[str, ...] | None = None
    _checks_items: bool | None = None
    _checks_values: bool | None = None

    def type_codes(self) -> frozenset[str]:
        if self._codes is None:
            self._codes = frozenset(t["code"] for t in self.types or () if isinstance(t.get("code"), str))
        return self._codes

    def profiles(self) -> tuple[str, ...]:
        if self._profiles is None:
            self._profiles = tuple(p for t in self.types or () for p in t.get("profile") or ())
        return self._profiles

    def target_profiles(self) -> tuple[str, ...]:
        if self._targets is None:
            self._targets = tuple(p for t in self.types or () for p in t.get("targetProfile") or ())
        return self._targets

    def live(self, must_support: bool) -> bool:
        """Whether the rule can raise an issue at all; may say True when it cannot (a type list
        is not looked into here, so a malformed profile fails where it did: when it is used)."""
        return (
            (self.min is not None and self.min != 0)
            or self.max not in (None, "*")
            or (must_support and self.must_support)
            or bool(self.types)
            or self._constrains_values()
        )

    def checks_items(self) -> bool:
        """Whether the rule says anything about each value (beyond how many there are)."""
        if self._checks_items is None:
            self._checks_items = bool(
                self.type_codes() or self._constrains_values() or self.profiles() or self.target_profiles()
            )
        return self._checks_items

    def checks_values(self) -> bool:
        """Whether the rule has a fixed or pattern value, a binding, a length or a range to check."""
        if self._checks_values is None:
            self._checks_values = (
                self.fixed is not _UNSET
                or self.pattern is not _UNSET
                or self.binding is not None
                or self.max_length is not None
                or self.min_value is not _UNSET
                or self.max_value is not _UNSET
            )
        return self._checks_values

    def _constrains_values(self) -> bool:
        """Whether the rule constrains the values themselves: fixed, pattern, binding, length, range, invariants."""
        return self.checks_values() or bool(self.constraints)


@dataclass(slots=True)
class _Group:
    """The children called ``name`` of one element: the element's own rule, and its slices."""

    name: str
    id: str
    slices: dict[str, str] = field(default_factory=dict)
    # The rest depends on the profile's rules only, so it is worked out once they are complete
    # (:func:`_prepare`), not for every resource.
    rule: Rule | None = None
    #: Whether an absent element still needs checking: its rule or one of its slices has a minimum.
    required: bool = False
    #: Whether its rule or one of its slices is mustSupport (reported when absent, on request).
    must_support: bool = False
    #: Whether an absent element has nothing to check, without and with mustSupport reporting
    #: (not required, not a choice element, and for the second not mustSupport).
    optional: bool = False
    optional_ms: bool = False
    #: Whether the element's own rule can raise an issue, without and with mustSupport reporting.
    rule_live: bool = True
    rule_live_ms: bool = True
    #: Whether anything at or below the element can raise an issue (without and with mustSupport
    #: reporting): a group that cannot is not walked at all.
    live: bool = True
    live_ms: bool = True
    #: The live groups of the element's children (without and with mustSupport reporting).
    below: tuple[_Group, ...] = ()
    below_ms: tuple[_Group, ...] = ()
    #: ``.name`` (``.value`` for ``value[x]``), the step of issue paths; ``_name``; choice or not.
    step: str = ""
    underscore: str = ""
    choice: bool = False
    #: For a choice element: its property suffixes and their types (``Quantity``: ``Quantity``).
    suffixes: dict[str, str] = field(default_factory=dict)
    #: The slicing in force, worked out on first use (see :meth:`_Run.slicing`).
    slicing: _Slicing | None = None


@dataclass(slots=True)
class _Slice:
    """One slice of a group, as :meth:`_Run.slices` checks the items it gets."""

    name: str
    id: str
    #: Its rule when that can raise an issue (``rule_ms``: when mustSupport is reported), else None.
    rule: Rule | None
    rule_ms: Rule | None
    #: What its issues are labelled with after the profile's label.
    label: str
    #: The live groups of its children (without and with mustSupport reporting).
    below: tuple[_Group, ...]
    below_ms: tuple[_Group, ...]


@dataclass(slots=True)
class _Slicing:
    """How one group is sliced: what :meth:`_Run.slices` needs, the same for every resource."""

    discriminators: list[dict[str, Any]]
    described: str
    names: list[str]
    closed: bool
    ordered: bool
    open_at_end: bool
    slices: list[_Slice]


@dataclass(slots=True)
class CompiledProfile:
    url: str
    name: str
    type: str
    rules: dict[str, Rule]
    groups: dict[str, dict[str, _Group]]
    context: list[dict[str, Any]] = field(default_factory=list)
    #: This profile and the profiles it derives from: what a resource meeting it meets too.
    ancestors: tuple[str, ...] = ()
    #: The root element's rule when it can raise an issue (without and with mustSupport reporting),
    #: and the live groups of its children.
    root: Rule | None = None
    root_ms: Rule | None = None
    top: tuple[_Group, ...] = ()
    top_ms: tuple[_Group, ...] = ()
    #: :meth:`_Run.expected` by (slice id, discriminator path): it depends on the profile only.
    expected: dict[tuple[str, str], tuple[Any, str]] = field(default_factory=dict)


@cache
def _choices() -> dict[str, dict[str, str]]:
    return model.choice_suffixes()


def _segments(element_id: str) -> list[str]:
    """``Patient.identifier:nhsNumber.system`` -> ``["Patient", "identifier:nhsNumber", "system"]``
    (slice names may contain dots only in ``url``-style names, which R4 ids do not use)."""
    return element_id.split(".")


def _normalise_id(element_id: str) -> str:
    """Write a choice element named by its type (``Observation.valueQuantity``) as the type slice
    ``Observation.value[x]:valueQuantity`` (https://hl7.org/fhir/R4/profiling.html#slicing)."""
    choices = _choices()
    parts = _segments(element_id)
    for i, part in enumerate(parts[1:], 1):
        name = part.split(":", 1)[0]
        if name.endswith("[x]"):
            continue
        for base, suffixes in choices.items():
            if name.startswith(base) and name[len(base) :] in suffixes and name != base:
                slice_part = part.split(":", 1)[1] if ":" in part else name
                parts[i] = f"{base}[x]:{slice_part}"
                break
    return ".".join(parts)


def _merge(rules: dict[str, Rule], element: dict[str, Any], core: bool) -> None:
    element_id = element.get("id") or element.get("path")
    if not isinstance(element_id, str):
        return
    element_id = _normalise_id(element_id)
    rule = rules.get(element_id)
    if rule is None:
        rule = rules[element_id] = Rule(element_id)
    if "sliceName" in element:
        rule.slice_name = element["sliceName"]
    if not core:
        if "min" in element:
            rule.min = element["min"]
        if "max" in element:
            rule.max = element["max"]
        if "type" in element:
            rule.types = element["type"]
        if "binding" in element and isinstance(element["binding"].get("valueSet"), str):
            rule.binding = element["binding"]
        if "slicing" in element:
            rule.slicing = element["slicing"]
    for key, value in element.items():
        if key.startswith("fixed"):
            rule.fixed = value
        elif key.startswith("pattern"):
            rule.pattern = value
        elif key.startswith("minValue"):
            rule.min_value = value
        elif key.startswith("maxValue"):
            rule.max_value = value
    if "maxLength" in element:
        rule.max_length = element["maxLength"]
    if element.get("mustSupport"):
        rule.must_support = True
    for constraint in element.get("constraint") or ():
        source_url = constraint.get("source", "")
        if isinstance(constraint.get("expression"), str) and not (core and source_url.startswith(CORE_PREFIX)):
            rule.constraints[constraint["key"]] = constraint


def _core_element(path: str) -> model.ElementDef | None:
    type_name, _, rest = path.partition(".")
    try:
        return model.type_model(type_name).elements.get(path) if rest else None
    except KeyError:
        return None


def _snapshot_elements(sd: dict[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    """The snapshot's elements, each with whether it only repeats R4 core (then only its non-core
    facts count: fixed/pattern values, slices, invariants of its own)."""
    out: list[tuple[dict[str, Any], bool]] = []
    for element in sd["snapshot"]["element"]:
        core = _core_element(element.get("path", ""))
        same = (
            core is not None
            and ":" not in element.get("id", "")
            and str(element.get("min")) == str(core.raw.get("min"))
            and str(element.get("max")) == str(core.raw.get("max"))
            and "slicing" not in element
            and "binding" not in element
        )
        out.append((element, same))
    return out


class ProfileError(Exception):
    """A profile that cannot be compiled: its base is missing or it is not a StructureDefinition."""


def compile_profile(url: str, packages: PackageSet) -> CompiledProfile:
    chain: list[dict[str, Any]] = []
    current = packages.resource(url)
    if current is None or current.get("resourceType") != "StructureDefinition":
        raise ProfileError(f"profile {url} is not in the loaded packages")
    while current is not None and current.get("derivation") == "constraint":
        chain.append(current)
        base = current.get("baseDefinition")
        if not isinstance(base, str) or (base.startswith(CORE_PREFIX) and packages.resource(base) is None):
            current = None
            break
        current = packages.resource(base)
        if current is None:
            raise ProfileError(f"profile {chain[-1]['url']} derives from {base}, which is not in the loaded packages")
    rules: dict[str, Rule] = {}
    for sd in reversed(chain):
        if sd.get("snapshot", {}).get("element"):
            for element, core in _snapshot_elements(sd):
                _merge(rules, element, core)
        for element in sd.get("differential", {}).get("element") or ():
            _merge(rules, element, False)
    profile = chain[0]
    root = profile["type"]
    groups: dict[str, dict[str, _Group]] = {}
    for element_id in list(rules):
        parts = _segments(element_id)
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            name, _, slice_name = parts[depth].partition(":")
            group_id = f"{parent}.{name}"
            group = groups.setdefault(parent, {}).setdefault(name, _Group(name, group_id))
            if slice_name:
                group.slices.setdefault(slice_name, f"{group_id}:{slice_name}")
            # A slice's own children hang under the slice's id, not the group's.
            parts_id = ".".join(parts[: depth + 1])
            rules.setdefault(parts_id, Rule(parts_id))
    name = profile.get("name") or profile.get("id") or url
    ancestors = (*(sd["url"] for sd in chain), f"{CORE_PREFIX}{root}")
    compiled = CompiledProfile(url, name, root, rules, groups, list(profile.get("context") or ()), ancestors)
    _prepare(compiled)
    return compiled


def _prepare(profile: CompiledProfile) -> None:
    """Work out what the walk needs of each group, once its rules are complete."""
    rules, groups = profile.rules, profile.groups
    for element_groups in groups.values():
        for group in element_groups.values():
            group.rule = rules.get(group.id)
            found = [r for r in (group.rule, *(rules.get(i) for i in group.slices.values())) if r is not None]
            group.required = any(bool(r.min) for r in found)
            group.must_support = any(r.must_support for r in found)
            group.rule_live = group.rule is not None and group.rule.live(False)
            group.rule_live_ms = group.rule is not None and group.rule.live(True)
            group.step = "." + group.name.removesuffix("[x]")
            group.underscore = "_" + group.name
            group.choice = group.name.endswith("[x]")
            if group.choice:
                group.suffixes = _choices().get(group.name[:-3], {})
            group.optional = not group.required and not group.choice
            group.optional_ms = group.optional and not group.must_support

    def live(group: _Group, must_support: bool) -> bool:
        # Slices always count: matching them marks extensions as checked, and slicing has rules.
        own = group.rule_live_ms if must_support else group.rule_live
        below = groups.get(group.id, {}).values()
        return own or bool(group.slices) or any(live(child, must_support) for child in below)

    for element_groups in groups.values():
        for group in element_groups.values():
            group.live = live(group, False)
            group.live_ms = live(group, True)
    for element_groups in groups.values():
        for group in element_groups.values():
            group.below = tuple(g for g in groups.get(group.id, {}).values() if g.live)
            group.below_ms = tuple(g for g in groups.get(group.id, {}).values() if g.live_ms)
    root = rules.get(profile.type)
    profile.root = root if root is not None and root.live(False) else None
    profile.root_ms = root if root is not None and root.live(True) else None
    profile.top = tuple(g for g in groups.get(profile.type, {}).values() if g.live)
    profile.top_ms = tuple(g for g in groups.get(profile.type, {}).values() if g.live_ms)


@dataclass(slots=True)
class _Item:
    value: Any
    ext: Any
    type: str | None
    where: str

    @property
    def node(self) -> dict[str, Any]:
        """The object whose properties are this item's children (a primitive's ``_name`` part)."""
        if isinstance(self.value, dict):
            return self.value
        return self.ext if isinstance(self.ext, dict) else {}

    @property
    def fhirpath_value(self) -> Any:
        if isinstance(self.value, dict) or self.ext is None:
            return self.value
        return fhirpath.Prim(self.value, self.ext)


def _items(node: dict[str, Any], group: _Group, where: str) -> list[_Item]:
    """The values of the group's property (``value[x]``: any ``value<Type>``) with their FHIRPath."""
    name = group.name
    if group.choice:
        base = name[:-3]
        suffixes = group.suffixes
        out: list[_Item] = []
        for key in node:
            if key.startswith(base) and key[len(base) :] in suffixes:
                code = suffixes[key[len(base) :]]
                out.append(_Item(node[key], node.get("_" + key), code, f"{where}.{base}.ofType({code})"))
        return out
    value, ext = node.get(name), node.get(group.underscore)
    if ext is None:
        if value is None:
            return []
        if isinstance(value, list):  # the usual repeating element: no _name part
            return [_Item(item, None, None, f"{where}.{name}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, list) or isinstance(ext, list):
        values = value if isinstance(value, list) else []
        exts = ext if isinstance(ext, list) else []
        count = max(len(values), len(exts))
        return [
            _Item(
                values[i] if i < len(values) else None,
                exts[i] if i < len(exts) else None,
                None,
                f"{where}.{name}[{i}]",
            )
            for i in range(count)
        ]
    return [_Item(value, ext, None, f"{where}.{name}")]


def _navigate(values: list[Any], path: str) -> list[Any]:
    """A simple discriminator path (``system``, ``coding.code``, ``url``) over JSON values."""
    for part in path.split("."):
        if part == "$this":
            continue
        found: list[Any] = []
        for value in values:
            if isinstance(value, dict):
                child = value.get(part)
                if isinstance(child, list):
                    found.extend(child)
                elif child is not None:
                    found.append(child)
        values = found
    return values


def _codes(value: Any) -> list[tuple[str | None, str]]:
    """(system, code) pairs of a coded value: code, Coding, CodeableConcept, Quantity, string, uri."""
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, dict):
        if "coding" in value:
            # Codings of the wrong shape (not an array, an item not an object, a code not a string,
            # an array or object for system) are the structural walk's to report; here they match
            # no code. (A number or boolean system stays: it is in no value set, code-invalid.)
            codings = value.get("coding")
            if not isinstance(codings, list):
                return []
            return [(c.get("system"), c["code"]) for c in codings if isinstance(c, dict) and _coded(c)]
        if _coded(value):
            return [(value.get("system"), value["code"])]
    return []


def _coded(value: dict[str, Any]) -> bool:
    """Whether ``value`` has a string ``code`` and a ``system`` a value set lookup can take (not an
    array or object, which cannot be hashed)."""
    return isinstance(value.get("code"), str) and not isinstance(value.get("system"), dict | list)


class ProfileValidator:
    """The ``Validator`` seam with profiles: structural R4 validation, then each profile that applies.

    Profiles come from ``profiles`` (``--profile``), else ``meta.profile``, else ``defaults`` (by
    resource type); Bundle entries and contained resources are checked against their own.
    ``must_support`` reports absent mustSupport elements as information issues.
    """

    def __init__(
        self,
        packages: PackageSet,
        *,
        terminology: Terminology | None = None,
        defaults: dict[str, list[str]] | None = None,
        must_support: bool = False,
        structural: StructuralValidator | None = None,
    ) -> None:
        self.packages = packages
        self.terminology = terminology or LocalTerminology(packages.resource)
        self.defaults = defaults or {}
        self.must_support = must_support
        self.structural = structural or StructuralValidator()
        self._compiled: dict[str, CompiledProfile | ProfileError] = {}
        self._extension_urls: list[str] | None = None
        #: :meth:`_Run.context_of` by (root resource type, element path).
        self.contexts: dict[tuple[str, str], tuple[str | None, str | None, str | None]] = {}

    def profile(self, url: str) -> CompiledProfile:
        found = self._compiled.get(url)
        if found is None:
            try:
                found = compile_profile(url, self.packages)
            except ProfileError as exc:
                found = exc
            self._compiled[url] = found
        if isinstance(found, ProfileError):
            raise found
        return found

    def known_extensions(self) -> list[str]:
        if self._extension_urls is None:
            self._extension_urls = sorted(
                sd["url"] for sd in self.packages.structure_definitions() if sd.get("type") == "Extension"
            )
        return self._extension_urls

    def validate(
        self,
        resource: Any,
        profiles: Sequence[str] = (),
        *,
        resolve: Callable[[str], dict[str, Any] | None] | None = None,
        conformance: dict[tuple[int, str], bool] | None = None,
    ) -> list[Issue]:
        """Issues of ``resource`` against R4 and its profiles. ``resolve`` finds the targets of
        references (``urn:uuid:...``) when the resource is checked outside its Bundle, as the
        mapping engine does; inside a Bundle the Bundle's entries are used. ``conformance``
        remembers which of those targets meet which profile, across the calls that share it
        (the targets must not change meanwhile)."""
        issues, extended = self.structural.examine(resource)
        if isinstance(resource, dict):
            # Without an extension anywhere there is nothing for the sweep to find.
            run = _Run(self, resource, resolve, conformance, sweep=extended)
            run.resource(resource, resource.get("resourceType", "Resource"), list(profiles), None)
            issues += run.issues
            if conformance is not None and not any(issue.is_error for issue in issues):
                self.remember_valid(resource, profiles, conformance)
        # Most resources have one issue (dom-6, no narrative): nothing to drop twice.
        return issues if len(issues) < 2 else list(dict.fromkeys(issues))

    def remember_valid(
        self, resource: dict[str, Any], profiles: Sequence[str], conformance: dict[tuple[int, str], bool]
    ) -> None:
        """Record in ``conformance`` that ``resource``, found valid, meets the profiles it declares
        and ``profiles``, and so the profiles they derive from: a reference to it checked later
        needs no second look."""
        meta = resource.get("meta")
        declared = meta.get("profile") if isinstance(meta, dict) else None
        for url in [*(declared if isinstance(declared, list) else ()), *profiles]:
            try:
                for ancestor in self.profile(url).ancestors:
                    conformance[(id(resource), ancestor)] = True
            except ProfileError:
                continue


class _Run:
    """One validation of one (top-level) resource: its issues, and what it has seen."""

    def __init__(
        self,
        validator: ProfileValidator,
        root: dict[str, Any],
        resolve: Callable[[str], dict[str, Any] | None] | None = None,
        conformance: dict[tuple[int, str], bool] | None = None,
        *,
        sweep: bool = True,
    ) -> None:
        self.v = validator
        # Whether a reference target meets a profile, by (id(target), profile): a target referred
        # to from several places (the Patient of every resource of a Bundle) is checked once.
        self.conformance: dict[tuple[int, str], bool] = {} if conformance is None else conformance
        self.root = root
        self.issues: list[Issue] = []
        self.checked_extensions: set[int] = set()
        self.sweep = sweep  # whether to look for extensions no profile mentions
        self.checked_profiles: set[tuple[int, str]] = set()
        self.probing = 0
        self.not_checked: set[str] = set()
        # Whether each reference target tried against a profile is free of R4 errors, by id().
        self.valid_targets: dict[int, tuple[dict[str, Any], bool]] = {}
        # The FHIRPath environment of each resource whose invariants are checked, by id() (:meth:`env`).
        self.envs: dict[int, tuple[Any, fhirpath.Env]] = {}
        if root.get("resourceType") == "Bundle":
            resolve = fhirpath.bundle_resolver(root)
        self.resolve: Callable[[str], dict[str, Any] | None] | None = resolve

    # -- issues ----------------------------------------------------------------------------------

    def add(self, severity: str, code: str, message: str, where: str, label: str) -> None:
        self.issues.append(Issue(severity, code, f"{label}{message}", where))

    # -- resources -------------------------------------------------------------------------------

    def resource(self, resource: dict[str, Any], where: str, explicit: list[str], label: str | None) -> None:
        type = resource.get("resourceType")
        if not isinstance(type, str):
            return
        meta: dict[str, Any] = resource["meta"] if isinstance(resource.get("meta"), dict) else {}
        declared = [p for p in meta.get("profile") or () if isinstance(p, str)]
        urls = explicit or declared or self.v.defaults.get(type, [])
        prefix = label or ""
        for url in dict.fromkeys(urls):
            try:
                profile = self.v.profile(url)
            except ProfileError as exc:
                severity = "error" if url in explicit else "warning"
                self.add(severity, "not-found", f"{exc} (not checked)", where, prefix)
                continue
            if profile.type != type:
                self.add("error", "invalid", f"profile {url} is for {profile.type}, not {type}", where, prefix)
                continue
            self.check(profile, resource, where, f"{prefix}{profile.name}: ")
        if self.sweep:
            self.sweep_extensions(resource, where, prefix)
        for i, contained in enumerate(resource.get("contained") or ()):
            if isinstance(contained, dict):
                self.resource(contained, f"{where}.contained[{i}]", [], prefix)
        if type == "Bundle":
            for i, entry in enumerate(resource.get("entry") or ()):
                inner = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(inner, dict):
                    name = (
                        f"{inner.get('resourceType')}/{inner.get('id')}"
                        if inner.get("id")
                        else inner.get("resourceType")
                    )
                    full_url = entry.get("fullUrl")
                    entry_label = f"entry {i} ({full_url}, {name}) " if full_url else f"entry {i} ({name}) "
                    self.resource(inner, f"{where}.entry[{i}].resource", [], entry_label)

    def conforms(self, value: Any, url: str, where: str) -> bool:
        """Whether ``value`` (a resource or datatype) meets profile ``url``, without reporting."""
        if isinstance(value, dict) and "resourceType" in value:
            key = (id(value), url)
            known = self.conformance.get(key)
            if known is None:
                known = self.conformance[key] = self._conforms(value, url, where)
            return known
        return self._conforms(value, url, where)

    def _conforms(self, value: Any, url: str, where: str) -> bool:
        try:
            profile = self.v.profile(url)
        except ProfileError:
            return False
        saved, self.issues = self.issues, []
        self.probing += 1
        try:
            if isinstance(value, dict) and "resourceType" in value:
                if value.get("resourceType") != profile.type:
                    return False
                if not self.structurally_valid(value):
                    return False
            self.check(profile, value, where, "")
            return not any(issue.is_error for issue in self.issues)
        finally:
            self.issues = saved
            self.probing -= 1

    def structurally_valid(self, resource: dict[str, Any]) -> bool:
        """Whether a reference target has no R4 errors; asked once per target in a run, however
        many profiles it is tried against."""
        known = self.valid_targets.get(id(resource))
        if known is None:
            errors = [i for i in self.v.structural.validate(resource) if i.is_error]
            # The resource is kept with its answer: its id() cannot be reused by another object
            # (a resolver may make a new one per call) while the run lasts.
            known = self.valid_targets[id(resource)] = (resource, not errors)
        return known[1]

    # -- one profile -----------------------------------------------------------------------------

    def check(self, profile: CompiledProfile, node: Any, where: str, label: str) -> None:
        if not self.probing:
            # A Bundle entry is checked against the profile its slice names and against its own
            # meta.profile: once is enough when they are the same profile.
            key = (id(node), profile.url)
            if key in self.checked_profiles:
                return
            self.checked_profiles.add(key)
        must_support = self.v.must_support
        root_rule = profile.root_ms if must_support else profile.root
        item = _Item(node, None, profile.type, where)
        if root_rule is not None:
            self.rule(profile, root_rule, [item], where, label, node)
        self.children(profile, profile.top_ms if must_support else profile.top, item.node, where, label, node)

    def children(
        self,
        profile: CompiledProfile,
        groups: tuple[_Group, ...],
        node: dict[str, Any],
        where: str,
        label: str,
        resource: Any,
    ) -> None:
        """Check the children of ``node`` that ``groups`` (the live ones only) constrain."""
        must_support = self.v.must_support
        for group in groups:
            if (
                (group.optional_ms if must_support else group.optional)
                and group.name not in node
                and group.underscore not in node
            ):
                continue  # absent, and nothing asks for it: nothing to check
            items = _items(node, group, where)
            rule = group.rule
            if rule is not None and (group.rule_live_ms if must_support else group.rule_live):
                self.rule(profile, rule, items, where + group.step, label, resource)
            if group.slices:
                self.slices(profile, group, items, where, label, resource)
            below = group.below_ms if must_support else group.below
            if below:
                for item in items:
                    self.children(profile, below, item.node, item.where, label, resource)

    def slicing(self, profile: CompiledProfile, group: _Group) -> _Slicing:
        """How ``group`` is sliced, worked out the first time a resource has it (the slicing element
        is only looked into where a resource needs it, as before it was worked out once)."""
        rule = group.rule
        slicing: dict[str, Any] | None = (rule.slicing if rule else None) or (
            _URL_SLICING if group.name in _EXTENSIONS else None
        )
        if slicing is None:
            # Type slices of a choice element (value[x]:valueQuantity) need no slicing element.
            slicing = _TYPE_SLICING
        discriminators: list[dict[str, Any]] = slicing.get("discriminator") or []
        described = ", ".join(f"{d.get('type')}:{d.get('path')}" for d in discriminators)
        slices = []
        for slice_name, slice_id in group.slices.items():
            slice_rule = profile.rules.get(slice_id)
            below = tuple(profile.groups.get(slice_id, {}).values())
            slices.append(
                _Slice(
                    slice_name,
                    slice_id,
                    slice_rule if slice_rule is not None and slice_rule.live(False) else None,
                    slice_rule if slice_rule is not None and slice_rule.live(True) else None,
                    f"slice {slice_name} ({described}): ",
                    tuple(g for g in below if g.live),
                    tuple(g for g in below if g.live_ms),
                )
            )
        group.slicing = _Slicing(
            discriminators,
            described,
            list(group.slices),
            slicing.get("rules") == "closed",
            bool(slicing.get("ordered")),
            slicing.get("rules") == "openAtEnd",
            slices,
        )
        return group.slicing

    def slices(
        self,
        profile: CompiledProfile,
        group: _Group,
        items: list[_Item],
        where: str,
        label: str,
        resource: Any,
    ) -> None:
        sliced = group.slicing or self.slicing(profile, group)
        discriminators = sliced.discriminators
        described = sliced.described
        names = sliced.names
        extensions = group.name in _EXTENSIONS
        assigned: list[list[_Item]] = [[] for _ in names]
        order: list[int] = []
        unmatched = len(names)
        for item in items:
            found = unmatched
            for index, slice_ in enumerate(sliced.slices):
                if self.matches(profile, slice_.id, item, discriminators, resource):
                    found = index
                    break
            order.append(found)
            if found == unmatched:
                if sliced.closed:
                    self.add(
                        "error",
                        "structure",
                        f"{group.id}: this item matches none of the slices {names} (closed slicing, {described})",
                        item.where,
                        label,
                    )
                continue
            assigned[found].append(item)
            if extensions and isinstance(item.value, dict):
                self.checked_extensions.add(id(item.value))
        element = where + group.step
        if sliced.ordered:
            matched = [o for o in order if o < unmatched]  # unmatched items may sit anywhere in open slicing
            if matched != sorted(matched):
                self.add("error", "structure", f"{group.id}: the slices are out of order ({described})", element, label)
        if sliced.open_at_end and unmatched in order:
            first_unmatched = order.index(unmatched)
            if any(o != unmatched for o in order[first_unmatched:]):
                self.add(
                    "error", "structure", f"{group.id}: unmatched items must come last (openAtEnd)", element, label
                )
        must_support = self.v.must_support
        for slice_, slice_items in zip(sliced.slices, assigned, strict=True):
            slice_rule = slice_.rule_ms if must_support else slice_.rule
            if slice_rule is not None:
                self.rule(profile, slice_rule, slice_items, element, label + slice_.label, resource)
            below = slice_.below_ms if must_support else slice_.below
            if below:
                for item in slice_items:
                    self.children(profile, below, item.node, item.where, label, resource)

    def matches(
        self, profile: CompiledProfile, slice_id: str, item: _Item, discriminators: list[dict[str, Any]], resource: Any
    ) -> bool:
        if not discriminators:
            return False
        for discriminator in discriminators:
            kind, path = discriminator.get("type"), discriminator.get("path", "$this")
            if kind in ("value", "pattern"):
                expected, how = self.expected(profile, slice_id, path)
                if expected is _UNSET:
                    return False
                actual = [item.value] if path == "$this" else _navigate([item.node], path)
                test = _equal if how == "fixed" else _contains
                for value in actual:
                    if test(value, expected):
                        break
                else:
                    return False
            elif kind == "exists":
                rule = profile.rules.get(f"{slice_id}.{path}")
                present = bool(_navigate([item.node], path))
                if rule is not None and (rule.min or 0) > 0 and not present:
                    return False
                if rule is not None and rule.max == "0" and present:
                    return False
            elif kind == "type":
                rule = profile.rules.get(slice_id if path == "$this" else f"{slice_id}.{path}")
                codes = rule.type_codes() if rule else set()
                if path == "$this":
                    actual_type = item.type or ""
                else:
                    values = _navigate([item.node], path)
                    actual_type = values[0].get("resourceType", "") if values and isinstance(values[0], dict) else ""
                if not codes or actual_type not in codes:
                    return False
            elif kind == "profile":
                target_path = path.replace("resolve()", "").strip(".")
                rule = profile.rules.get(slice_id if not target_path else f"{slice_id}.{target_path}")
                urls = (rule.profiles() or rule.target_profiles()) if rule else []
                candidates = self.targets(item, path)
                if not urls or not any(self.conforms(c, url, item.where) for c in candidates for url in urls):
                    return False
            else:
                return False
        return True

    def targets(self, item: _Item, path: str) -> list[Any]:
        values: list[Any] = [item.value]
        for part in path.split("."):
            if part in ("$this", ""):
                continue
            if part == "resolve()":
                values = [self.lookup(v) for v in values]
                values = [v for v in values if v is not None]
            else:
                values = _navigate(values, part)
        return values

    def lookup(self, reference: Any) -> dict[str, Any] | None:
        text = reference.get("reference") if isinstance(reference, dict) else reference
        if not isinstance(text, str):
            return None
        if text.startswith("#"):
            for contained in self.root.get("contained") or ():
                if isinstance(contained, dict) and contained.get("id") == text[1:]:
                    return contained
            return None
        return self.resolve(text) if self.resolve is not None else None

    def expected(self, profile: CompiledProfile, slice_id: str, path: str) -> tuple[Any, str]:
        """The fixed or pattern value a slice requires at ``path``: from the element at that path, or
        from a fixed/pattern value higher up, or (for ``url`` on extensions) the extension's profile.
        Remembered in the profile: it depends on nothing else."""
        if not isinstance(path, str):
            return self._expected(profile, slice_id, path)
        found = profile.expected.get((slice_id, path))
        if found is None:
            found = profile.expected[(slice_id, path)] = self._expected(profile, slice_id, path)
        return found

    def _expected(self, profile: CompiledProfile, slice_id: str, path: str) -> tuple[Any, str]:
        parts = [] if path == "$this" else path.split(".")
        for depth in range(len(parts), -1, -1):
            rule = profile.rules.get(".".join([slice_id, *parts[:depth]]))
            if rule is None:
                continue
            for value, how in ((rule.fixed, "fixed"), (rule.pattern, "pattern")):
                if value is not _UNSET:
                    below = _navigate([value], ".".join(parts[depth:])) if parts[depth:] else [value]
                    if below:
                        return below[0], how
        if parts == ["url"]:
            rule = profile.rules.get(slice_id)
            urls = rule.profiles() if rule else []
            if urls:
                return urls[0], "fixed"
        return _UNSET, ""

    # -- one element -----------------------------------------------------------------------------

    def rule(
        self, profile: CompiledProfile, rule: Rule, items: list[_Item], where: str, label: str, resource: Any
    ) -> None:
        element = rule.id
        if rule.min is not None and len(items) < rule.min:
            self.add("error", "required", f"{element}: at least {rule.min} required, found {len(items)}", where, label)
        if rule.max not in (None, "*") and len(items) > int(rule.max or 0):
            self.add("error", "structure", f"{element}: at most {rule.max} allowed, found {len(items)}", where, label)
        if self.v.must_support and rule.must_support and not items:
            self.add("information", "informational", f"{element}: mustSupport element is absent", where, label)
        if not items or not rule.checks_items():
            return
        codes = rule.type_codes()
        # What the rule checks of each value, looked up once for all the items.
        checks_values = rule.checks_values()
        constraints = rule.constraints
        profiles = rule.profiles()
        targets = rule.target_profiles()
        for item in items:
            value = item.value
            if codes and item.type is not None and item.type not in codes and element != profile.type:
                self.add(
                    "error",
                    "structure",
                    f"{element}: type {item.type} is not allowed here ({sorted(codes)})",
                    item.where,
                    label,
                )
            if checks_values:
                self.values(rule, value, item.where, label)
            if constraints:
                for constraint in constraints.values():
                    self.invariant(constraint, item, resource, label, element)
            if (profiles or targets) and isinstance(value, dict):
                for url in profiles:
                    if element == profile.type:
                        continue
                    self.datatype_profile(url, item, label)
                if targets and "reference" in value:
                    self.reference(targets, value, item.where, label, element)

    def values(self, rule: Rule, value: Any, where: str, label: str) -> None:
        """The checks of one value against the rule's fixed and pattern values, binding, length and range."""
        element = rule.id
        if rule.fixed is not _UNSET and not _equal(value, rule.fixed):
            self.add("error", "value", f"{element}: must be exactly {_show(rule.fixed)}", where, label)
        if rule.pattern is not _UNSET and not _contains(value, rule.pattern):
            self.add("error", "value", f"{element}: must match the pattern {_show(rule.pattern)}", where, label)
        if rule.binding is not None and value is not None:
            self.binding(rule, value, where, label)
        if rule.max_length is not None and isinstance(value, str) and len(value) > rule.max_length:
            self.add("error", "too-long", f"{element}: longer than {rule.max_length} characters", where, label)
        if rule.min_value is not _UNSET and _below(value, rule.min_value):
            self.add("error", "value", f"{element}: below the minimum {rule.min_value}", where, label)
        if rule.max_value is not _UNSET and _below(rule.max_value, value):
            self.add("error", "value", f"{element}: above the maximum {rule.max_value}", where, label)

    def binding(self, rule: Rule, value: Any, where: str, label: str) -> None:
        binding = rule.binding or {}
        strength = binding.get("strength")
        value_set = binding["valueSet"]
        if strength not in ("required", "extensible"):
            return
        codes = _codes(value)
        if not codes:
            return
        answers = [self.v.terminology.contains(value_set, system, code) for system, code in codes]
        if any(answer is True for answer in answers):
            return
        if any(answer is None for answer in answers):
            if value_set not in self.not_checked:
                self.not_checked.add(value_set)
                self.add(
                    "information",
                    "informational",
                    f"{rule.id}: not checked: {value_set} (cannot be expanded here)",
                    where,
                    label,
                )
            return
        shown = ", ".join(f"{s}|{c}" if s else c for s, c in codes)
        severity = "error" if strength == "required" else "warning"
        self.add(
            severity, "code-invalid", f"{rule.id}: {shown} is not in {value_set} ({strength} binding)", where, label
        )

    def env(self, resource: Any) -> fhirpath.Env:
        """The FHIRPath environment of the invariants checked on ``resource`` (%resource) in this
        run: one per resource, as :class:`fhirpath.Env` asks (it caches per-resource work)."""
        known = self.envs.get(id(resource))
        if known is None:
            env = fhirpath.Env(resource=resource, root_resource=self.root, resolve=self.resolve)
            # The resource is kept with its Env: its id() cannot be reused while the run lasts.
            known = self.envs[id(resource)] = (resource, env)
        return known[1]

    def invariant(self, constraint: dict[str, Any], item: _Item, resource: Any, label: str, element: str) -> None:
        try:
            compiled = fhirpath.compile_expression(constraint["expression"])
            result = compiled.test(item.fhirpath_value, self.env(resource))
        except fhirpath.FHIRPathError as exc:
            self.add(
                "warning",
                "informational",
                f"{element}: invariant {constraint.get('key')} not checked: {exc}",
                item.where,
                label,
            )
            return
        if result is False:
            severity = "error" if constraint.get("severity") == "error" else "warning"
            self.add(
                severity, "invariant", f"{constraint.get('key')}: {constraint.get('human', '')}", item.where, label
            )

    def datatype_profile(self, url: str, item: _Item, label: str) -> None:
        value = item.value
        if isinstance(value, dict) and "resourceType" in value and not self.probing:
            meta: dict[str, Any] = value["meta"] if isinstance(value.get("meta"), dict) else {}
            if url in (meta.get("profile") or ()):
                return  # checked as the entry's own meta.profile, with the entry named in its issues
        try:
            profile = self.v.profile(url)
        except ProfileError as exc:
            self.add("information", "informational", f"{exc} (not checked)", item.where, label)
            return
        if profile.type == "Extension":
            self.checked_extensions.add(id(item.value))
            self.extension_context(profile, item.where, label)
        self.check(profile, item.value, item.where, f"{label}{profile.name}: ")

    def extension_context(self, profile: CompiledProfile, where: str, label: str) -> None:
        """An extension may only be used where its ``context`` says
        (https://hl7.org/fhir/R4/defining-extensions.html#context)."""
        if not profile.context or self.probing:
            return
        host = _EXTENSION_STEP.sub("", where)
        path, type, datatype_path = self.context_of(host)
        if path is None:
            return
        allowed = [c.get("expression") for c in profile.context if c.get("type") in ("element", None)]
        allowed_urls = [c.get("expression") for c in profile.context if c.get("type") == "extension"]
        if any(c.get("type") == "fhirpath" for c in profile.context):
            return  # a FHIRPath context: not checked here
        candidates = {path, type, datatype_path, "Element", "Base"}
        if "." not in path:
            candidates |= {"Resource", "DomainResource"}
        if type == "Extension":
            parent = _node_at(self.root, host)
            if isinstance(parent, dict) and parent.get("url") in allowed_urls:
                return
        if not candidates.intersection(allowed):
            contexts = ", ".join(str(c.get("expression")) for c in profile.context)
            self.add(
                "error",
                "extension",
                f"extension {profile.url} is not allowed on {path} (its context: {contexts})",
                where,
                label,
            )

    def context_of(self, host: str) -> tuple[str | None, str | None, str | None]:
        """:func:`_context_of` the run's root. Without a resource inside the path (a Bundle entry,
        a contained resource) it depends on the root's type and the path only: the same for every
        resource of the type, so it is worked out once (bounded)."""
        root = self.root
        root_type = root.get("resourceType") if isinstance(root, dict) else None
        if not isinstance(root_type, str) or "resource" in host or "contained" in host:
            return _context_of(root, host)
        contexts = self.v.contexts
        key = (root_type, host)
        found = contexts.get(key)
        if found is None:
            if len(contexts) >= 10_000:
                contexts.clear()
            found = contexts[key] = _context_of(root, host)
        return found

    def reference(self, targets: Sequence[str], value: dict[str, Any], where: str, label: str, element: str) -> None:
        text = value.get("reference")
        if not isinstance(text, str):
            return
        found = self.lookup(text)
        if found is not None:
            if not any(self.conforms(found, url, where) for url in targets):
                self.add(
                    "error", "invalid", f"{element}: {text} does not conform to {' or '.join(targets)}", where, label
                )
            return
        types: set[str] = set()
        for url in targets:
            if url.startswith(CORE_PREFIX) and self.v.packages.resource(url) is None:
                types.add(url.removeprefix(CORE_PREFIX))
            else:
                sd = self.v.packages.resource(url)
                if sd is not None and isinstance(sd.get("type"), str):
                    types.add(sd["type"])
        match = re.search(r"([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/]+)?$", text)
        if match and types and match.group(1) not in types:
            self.add(
                "error",
                "invalid",
                f"{element}: {text} is not a reference to {' or '.join(sorted(types))}",
                where,
                label,
            )

    # -- extensions no profile mentions ------------------------------------------------------------

    def sweep_extensions(self, resource: dict[str, Any], where: str, label: str) -> None:
        checked = self.checked_extensions
        stack: list[tuple[dict[str, Any], _Link]] = [(resource, where)]
        while stack:
            node, path = stack.pop()
            for key, value in node.items():
                if value.__class__ is str:
                    continue  # most values: nothing below them
                if key in ("contained", "resource"):
                    continue  # contained resources and Bundle entries are checked as resources
                if isinstance(value, list):
                    if not value:
                        continue
                    if key in _EXTENSIONS:
                        for i, extension in enumerate(value):
                            if isinstance(extension, dict) and id(extension) not in checked:
                                self.extension(extension, key, f"{_written(path)}.{key}[{i}]", label)
                    # Paths are only made for what may hold extensions (objects), not primitives.
                    if isinstance(value[0], dict):
                        for i, item in enumerate(value):
                            if isinstance(item, dict):
                                stack.append((item, (path, key, i)))
                elif isinstance(value, dict):
                    stack.append((value, (path, key, -1)))

    def extension(self, extension: Any, kind: str, where: str, label: str) -> None:
        if not isinstance(extension, dict) or id(extension) in self.checked_extensions:
            return
        url = extension.get("url")
        if not isinstance(url, str) or ("://" not in url and not url.startswith("urn:")):
            return  # a sub-extension of a complex extension: its parent checks it
        self.checked_extensions.add(id(extension))
        if self.v.packages.resource(url) is not None:
            self.datatype_profile(url, _Item(extension, None, "Extension", where), label)
            return
        if url.startswith(CORE_PREFIX):
            return  # an R4 core extension: its definition is not loaded
        hint = difflib.get_close_matches(url, self.v.known_extensions(), n=1, cutoff=0.8)
        did_you_mean = f"; did you mean {hint[0]}?" if hint else ""
        severity = "error" if kind == "modifierExtension" else "warning"
        self.add(severity, "extension", f"unknown extension {url}{did_you_mean}", where, label)


# Where the sweep is: the resource's path, or (parent, key, index or -1) links, written out only
# for the few nodes that raise an issue (most have none).
_Link: TypeAlias = "str | tuple[_Link, str, int]"


def _written(path: _Link) -> str:
    steps: list[str] = []
    while not isinstance(path, str):
        path, key, index = path
        steps.append(f".{key.lstrip('_')}[{index}]" if index >= 0 else f".{key.lstrip('_')}")
    return path + "".join(reversed(steps))


_STEP = re.compile(r"\.?([A-Za-z_]+)(?:\[(\d+)\])?(?:\.ofType\(([A-Za-z]+)\))?")
# The last step of an extension's path: what is left is the path of the element it extends.
_EXTENSION_STEP = re.compile(r"\.(?:modifierExtension|extension)\[\d+\]$")


def _child(node: Any, name: str, index: str) -> Any:
    """Property ``name`` of a JSON object (a choice element by its base name: ``value`` finds
    ``valueQuantity``), then item ``index`` of it when one is given."""
    if not isinstance(node, dict):
        return None
    key = name
    if key not in node:
        key = next((k for k in node if k.startswith(name) and k[len(name) : len(name) + 1].isupper()), name)
    found = node.get(key)
    if index:
        found = found[int(index)] if isinstance(found, list) and int(index) < len(found) else None
    return found


def _steps(where: str) -> list[tuple[str, str, str]]:
    """(name, index, ofType) of each step of an issue path after its root."""
    return _STEP.findall(where.split(".", 1)[1] if "." in where else "")


def _node_at(root: Any, where: str) -> Any:
    """The JSON node that an issue path (``Bundle.entry[1].resource.identifier[0]``) names."""
    node = root
    for name, index, _ in _steps(where):
        node = _child(node, name, index)
    return node


def _context_of(root: Any, where: str) -> tuple[str | None, str | None, str | None]:
    """The element path (``Patient.telecom.system``), its type (``code``) and its path inside the
    nearest datatype (``ContactPoint.system``) of the node at ``where``, starting again at each
    resource inside a Bundle or contained."""
    node: Any = root
    type_name = root.get("resourceType") if isinstance(root, dict) else None
    if not isinstance(type_name, str):
        return None, None, None
    path, model_type, element_path = type_name, type_name, type_name
    datatype_path: str | None = None
    for name, index, of_type in _steps(where):
        node = _child(node, name, index)
        if isinstance(node, dict) and isinstance(node.get("resourceType"), str) and name in ("resource", "contained"):
            type_name = node["resourceType"]
            path, model_type, element_path = type_name, type_name, type_name
            datatype_path = None
            continue
        path = f"{path}.{name}"
        element_path = f"{element_path}.{name}"
        try:
            elements = model.type_model(model_type).elements
        except KeyError:
            return path, None, None
        element = elements.get(element_path) or elements.get(f"{element_path}[x]")
        if element is None:
            return path, None, None
        datatype_path = element_path
        codes = [t.get("code") for t in element.types]
        code = of_type or (codes[0] if len(codes) == 1 else None)
        if code in ("BackboneElement", "Element") or code is None:
            type_name = code or "Element"
            continue
        type_name = code
        model_type, element_path = code, code
    return path, type_name, datatype_path


def _below(a: Any, b: Any) -> bool:
    try:
        return bool(_number(a) < _number(b))
    except TypeError:
        return bool(str(a) < str(b)) if isinstance(a, str) and isinstance(b, str) else False


def _show(value: Any) -> str:
    import json

    text = json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) < 120 else text[:117] + "..."
