"""The ``gpconnect-structured`` builder: a GP Connect Access Record Structured response (the FHIR STU3
``collection`` Bundle answered by ``$gpc.getstructuredrecord``) as R4 UK Core resources.

https://developer.nhs.uk/apis/gpconnect/accessrecord_structured_development_retrieve_patient_record.html

:func:`build` takes the parsed JSON Bundle and gives a :class:`~adapter.mapping.base.Mapped`:

- The input is checked with the ``fhir.resources`` STU3 models; a pydantic error becomes one
  :class:`MappingError` naming the STU3 path. The models are used to check only: the mapping reads the
  JSON as sent, which the models would reformat (decimals lose trailing zeros, instants their offset).
- What a social prescribing link worker needs is mapped: Patient, Organization, Practitioner,
  Encounter, Condition (problem headers), Observation, AllergyIntolerance, and ReferralRequest as
  ServiceRequest. Which entry types, which elements go across unchanged, and every STU3 -> R4 value
  translation are data (``mappings/gpconnect-structured/mapping.yaml``); this module holds what data
  cannot say.
- Ids are deterministic (:func:`adapter.mapping.ids.deterministic_id` of the business identifier: NHS
  number, ODS code, SDS user id, the GP Connect cross-care-setting identifier), so the same person
  from a referral export and from GP Connect is one Patient. An entry with no identifier to identify
  it by is not mapped, and is reported.
- STU3 references (``Patient/1``, or an entry's ``fullUrl``) are resolved through the Bundle's entries
  (https://hl7.org/fhir/STU3/bundle.html#references) and written ``urn:uuid:<id>``; one that resolves
  to nothing this mapping produces is dropped and reported. A clinical entry whose subject is not the
  record's Patient is not mapped.
- ``Mapped.unused`` lists every STU3 path that held data and went nowhere
  (``Bundle.entry[7].resource (MedicationStatement)``,
  ``Bundle.entry[0].resource (Patient).extension[RegistrationDetails]``), with the reason after a colon
  where it is not just "not mapped"; ``Mapped.defaults`` the values supplied because R4 needs one.

:func:`flatten` goes the other way for reporting: one CSV-ready row per clinical R4 resource.

Deliberate deviations from a literal STU3 -> R4 conversion, for review:

- Patient.generalPractitioner also references the GP practice (STU3 ``managingOrganization``), as
  PDS does (https://digital.nhs.uk/developer/api-catalogue/personal-demographics-service-fhir,
  "generalPractitioner") and SP-Patient expects.
- Condition.asserter (GP Connect: "the practitioner who recorded the problem",
  https://developer.nhs.uk/apis/gpconnect/accessrecord_structured_problems.html) is both R4 ``asserter``
  and ``recorder``.
- AllergyIntolerance.verificationStatus ``unconfirmed`` is not carried (GP Connect fixes it and says
  it carries no meaning; see the YAML); Condition.verificationStatus ``unknown`` has no R4 code.
- A value that would break an R4 invariant is reported, not carried: clinicalStatus of an
  entered-in-error Condition (con-5) or AllergyIntolerance (ait-2), abatement of a Condition that is
  still active (con-4).
- Encounter.class, required in R4 and unused by GP Connect, is data-absent-reason ``unknown``.
- A ``modifierExtension`` rejects the record: it may change the meaning of what it sits on
  (https://hl7.org/fhir/STU3/extensibility.html#modifierExtension).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

import pydantic
import yaml
from fhir.resources.STU3 import get_fhir_model_class
from fhir.resources.STU3.bundle import Bundle
from nhs_number.validate import is_valid as nhs_number_is_valid

from adapter.fhir import model
from adapter.mapping.base import Mapped, MappedResource, MappingError
from adapter.mapping.ids import deterministic_id, identity
from adapter.mapping.spec import mappings_root

__all__ = ["COLUMNS", "build", "flatten"]

#: The columns of :func:`flatten`'s rows.
COLUMNS = ("nhs_number", "resource_type", "identifier", "code_system", "code", "display", "status", "date", "value")

_NAME = "gpconnect-structured"
#: Resource keys replaced rather than mapped: the type, the logical id (R4 ids are deterministic) and
#: meta (the STU3 version and profile).
_ENVELOPE = frozenset({"resourceType", "id", "meta"})


# -- the tables (mappings/gpconnect-structured/mapping.yaml) --------------------------------------


@dataclass(frozen=True, slots=True)
class _Element:
    to: str
    targets: tuple[str, ...] | None = None
    repeats: bool = False


@dataclass(frozen=True, slots=True)
class _EntrySpec:
    stu3: str
    r4: str
    profile: str
    fallback_profile: str | None
    identity: tuple[str, ...]
    subject: str | None
    elements: dict[str, _Element]


@dataclass(frozen=True, slots=True)
class _CodeMap:
    system: str | None
    codes: dict[str, str | None]
    display: dict[str, str]

    def code(self, value: Any, path: str) -> str | None:
        """The R4 code for the STU3 ``value``; ``None`` when R4 has none. A value STU3 does not define
        is a :class:`MappingError` (the STU3 models do not check codes)."""
        if not isinstance(value, str) or value not in self.codes:
            known = ", ".join(sorted(self.codes))
            raise MappingError(f"{path}: {value!r} is not an STU3 code here (expected one of {known})", field=path)
        return self.codes[value]

    def concept(self, code: str) -> dict[str, Any]:
        """The R4 CodeableConcept of an R4 code of this map's system."""
        coding: dict[str, Any] = {"system": self.system, "code": code}
        if code in self.display:
            coding["display"] = self.display[code]
        return {"coding": [coding]}


@dataclass(frozen=True, slots=True)
class _Tables:
    entries: dict[str, _EntrySpec]
    maps: dict[str, _CodeMap]
    code_systems: dict[str, str]
    prefixes: dict[str, str]
    extension_names: dict[str, str]  # STU3 url -> name in the YAML's extensions
    extensions: dict[str, dict[str, Any]]
    translations: dict[str, Any]


def _element(body: Any) -> _Element:
    if isinstance(body, str):
        return _Element(body)
    targets = body.get("targets")
    return _Element(str(body["to"]), tuple(targets) if targets else None, bool(body.get("list")))


@cache
def _tables() -> _Tables:
    """The mapping's tables, read once."""
    raw = yaml.safe_load((mappings_root() / _NAME / "mapping.yaml").read_text(encoding="utf-8"))
    translations: dict[str, Any] = raw["translations"]
    entries = {
        name: _EntrySpec(
            stu3=name,
            r4=body["r4"],
            profile=body["profile"],
            fallback_profile=body.get("fallback_profile"),
            identity=tuple(body.get("identity") or ()),
            subject=body.get("subject"),
            elements={key: _element(value) for key, value in (raw["elements"].get(name) or {}).items()},
        )
        for name, body in raw["entries"].items()
    }
    maps = {
        name: _CodeMap(body.get("system"), dict(body["codes"]), dict(body.get("display") or {}))
        for name, body in translations.items()
        if isinstance(body, dict) and "codes" in body
    }
    extensions: dict[str, dict[str, Any]] = raw["extensions"]
    return _Tables(
        entries=entries,
        maps=maps,
        code_systems=dict(translations["code_systems"]),
        prefixes=dict(translations["code_system_prefixes"]),
        extension_names={url: name for name, body in extensions.items() for url in body["stu3"]},
        extensions=extensions,
        translations=translations,
    )


# -- checking the input ---------------------------------------------------------------------------


def _path(loc: Iterable[Any], entries: list[Any]) -> str:
    """A pydantic error location as an STU3 path: ``Bundle.entry[3].resource (Condition).subject``."""
    path = "Bundle"
    steps = list(loc)
    for n, step in enumerate(steps):
        if isinstance(step, int):
            path += f"[{step}]"
        else:
            path += f".{step}"
            if step == "resource" and n >= 2 and steps[n - 2] == "entry" and isinstance(steps[n - 1], int):
                path += _type_note(entries, steps[n - 1])
    return path


def _type_note(entries: list[Any], index: int) -> str:
    entry = entries[index] if 0 <= index < len(entries) else None
    resource = entry.get("resource") if isinstance(entry, dict) else None
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    return f" ({kind})" if isinstance(kind, str) else ""


def _checked(record: Any) -> list[dict[str, Any]]:
    """The Bundle's entries, once the record is known to be a valid STU3 Bundle."""
    if not isinstance(record, dict) or record.get("resourceType") != "Bundle":
        got = record.get("resourceType") if isinstance(record, dict) else type(record).__name__
        raise MappingError(
            f"expected an STU3 Bundle (the $gpc.getstructuredrecord response), got {got!r}", field="resourceType"
        )
    entries = record.get("entry")
    listed: list[Any] = entries if isinstance(entries, list) else []
    for index, entry in enumerate(listed):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and "resourceType" in resource:
            kind = resource["resourceType"]
            try:
                get_fhir_model_class(str(kind))
            except (KeyError, ValueError) as exc:
                where = f"Bundle.entry[{index}].resource.resourceType"
                raise MappingError(f"{where}: {kind!r} is not an STU3 resource type", field=where) from exc
    try:
        Bundle.model_validate(record)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = _path(first["loc"], listed)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise MappingError(
            f"not a valid STU3 Bundle: {where}: {first['msg']} (got {shown}){more}", field=where
        ) from exc
    return [entry for entry in listed if isinstance(entry, dict)]


# -- one build ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Target:
    """What a local STU3 reference resolves to: an R4 resource of this mapping."""

    type: str
    id: str


@dataclass(slots=True)
class _Candidate:
    """A Bundle entry this mapping will turn into an R4 resource."""

    index: int
    spec: _EntrySpec
    resource: dict[str, Any]
    target: _Target
    identity: str
    keys: list[str]

    @property
    def label(self) -> str:
        return f"Bundle.entry[{self.index}].resource ({self.spec.stu3})"


def _extension_name(url: Any) -> str:
    """A short name for an extension URL in trace paths: ``...Extension-CareConnect-GPC-RegistrationDetails-1``
    -> ``RegistrationDetails``."""
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    for prefix in ("Extension-", "CareConnect-", "GPC-"):
        name = name.removeprefix(prefix)
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


class _Source:
    """One STU3 resource being mapped: hands out its elements and remembers which were taken."""

    def __init__(self, resource: dict[str, Any], label: str) -> None:
        self.data = resource
        self.label = label
        self.taken: set[str] = set(_ENVELOPE)
        self.taken_extensions: set[int] = set()

    def take(self, key: str) -> Any:
        self.taken.add(key)
        return self.data.get(key)

    def extensions(self, names: Mapping[str, str], name: str) -> list[dict[str, Any]]:
        """The resource's extensions whose URL is one of ``name``'s (``names``: URL -> name), taken."""
        found = []
        for index, extension in enumerate(self.data.get("extension") or ()):
            if isinstance(extension, dict) and names.get(str(extension.get("url"))) == name:
                self.taken_extensions.add(index)
                found.append(extension)
        return found

    def extension_path(self, extension: Any) -> str:
        url = extension.get("url") if isinstance(extension, dict) else None
        return f"{self.label}.extension[{_extension_name(url)}]"

    def leftovers(self) -> list[str]:
        """Paths of the elements and extensions with a value that nothing took."""
        found = []
        for key, value in self.data.items():
            if key == "extension":
                for index, extension in enumerate(value or ()):
                    if index not in self.taken_extensions:
                        found.append(self.extension_path(extension))
            elif key not in self.taken and value not in (None, "", [], {}):
                found.append(f"{self.label}.{key}")
        return found


class _Build:
    """One Bundle being mapped: the targets of its local references, and the trace."""

    def __init__(self, tables: _Tables) -> None:
        self.tables = tables
        self.mapped = Mapped()
        #: Local reference (``Type/id`` or an entry's fullUrl) -> the R4 resource it resolves to.
        self.targets: dict[str, _Target] = {}
        #: Local reference -> the STU3 type of the entry it names (mapped or not), for the trace.
        self.kinds: dict[str, str] = {}
        self.patient: _Target | None = None

    def unused(self, path: str, reason: str | None = None) -> None:
        self.mapped.unused.append(f"{path}: {reason}" if reason else path)

    # -- references -----------------------------------------------------------------------------

    def resolve(self, reference: Any) -> _Target | None:
        if not isinstance(reference, str):
            return None
        return self.targets.get(reference) or self.targets.get(reference.split("/_history/", 1)[0])

    def reference(self, value: dict[str, Any], path: str, targets: tuple[str, ...] | None) -> dict[str, Any] | None:
        """An STU3 Reference as an R4 one to the produced resource, or ``None`` (reported) when it
        names nothing this mapping produces, or a type the R4 element does not allow."""
        reference = value["reference"]
        target = self.resolve(reference)
        if target is None:
            kind = self.kinds.get(reference)
            if kind is None:
                self.unused(path, f"{reference} does not resolve in the Bundle")
            else:
                self.unused(path, f"{reference} is a {kind} entry that is not mapped")
            return None
        if targets is not None and target.type not in targets:
            self.unused(path, f"{reference} is a {target.type}, which R4 does not allow here")
            return None
        result: dict[str, Any] = {"reference": f"urn:uuid:{target.id}"}
        if isinstance(value.get("display"), str):
            result["display"] = value["display"]
        for key in value:
            if key not in ("reference", "display"):
                self.unused(f"{path}.{key}")
        return result

    def patient_reference(self) -> dict[str, Any]:
        assert self.patient is not None
        return {"reference": f"urn:uuid:{self.patient.id}"}

    # -- datatypes ------------------------------------------------------------------------------

    def system(self, system: Any) -> Any:
        """A Coding.system, moved to its R4 URL when R4 moved it."""
        if not isinstance(system, str):
            return system
        if system in self.tables.code_systems:
            return self.tables.code_systems[system]
        for old, new in self.tables.prefixes.items():
            if system.startswith(old):
                return new + system[len(old) :]
        return system

    def convert(self, value: Any, path: str, targets: tuple[str, ...] | None = None, coding: bool = False) -> Any:
        """An STU3 value of a datatype R4 shares (CodeableConcept, Identifier, HumanName, Period...) as
        R4: Coding systems translated, references resolved, known extensions translated; whatever
        cannot go across is reported and left out. ``None`` when nothing is left."""
        if isinstance(value, list):
            items = [self.convert(item, f"{path}[{n}]", targets, coding) for n, item in enumerate(value)]
            kept = [item for item in items if item is not None]
            return kept or None
        if isinstance(value, float):
            # JSON read with floats (orjson): R4 decimals are Decimal here (adapter.fhir.json_format)
            return Decimal(repr(value))
        if not isinstance(value, dict):
            return value
        if value.get("modifierExtension"):
            raise MappingError(f"{path}.modifierExtension: a modifier extension this mapping does not know", field=path)
        if isinstance(value.get("reference"), str):
            return self.reference(value, path, targets)
        result: dict[str, Any] = {}
        for key, item in value.items():
            if key == "extension":
                extensions = self.datatype_extensions(item, path)
                if extensions:
                    result["extension"] = extensions
            elif key == "coding":
                converted = self.convert(item, f"{path}.coding", coding=True)
                if converted is not None:
                    result["coding"] = converted
            elif key == "system" and coding:
                result["system"] = self.system(item)
            elif key.startswith("_"):
                self.unused(f"{path}.{key}")
            else:
                converted = self.convert(item, f"{path}.{key}")
                if converted is not None:
                    result[key] = converted
        return result or None

    def datatype_extensions(self, extensions: Any, path: str) -> list[dict[str, Any]]:
        """Extensions on a datatype (NHS number verification status on an Identifier, SNOMED CT
        description on a Coding) in their R4 form; others are reported."""
        result: list[dict[str, Any]] = []
        for extension in extensions or ():
            url = extension.get("url") if isinstance(extension, dict) else None
            name = self.tables.extension_names.get(str(url))
            where = f"{path}.extension[{_extension_name(url)}]"
            if name == "nhs-number-verification":
                translated = self.verification_status(extension, where)
                if translated is not None:
                    result.append(translated)
            elif name == "sct-description":
                result.extend(self.sct_description(extension, where))
            else:
                self.unused(where)
        return result

    def verification_status(self, extension: dict[str, Any], where: str) -> dict[str, Any] | None:
        codes = self.tables.maps["nhs-number-verification"]
        source = self.tables.translations["nhs-number-verification"]["from"]
        concept = extension.get("valueCodeableConcept") or {}
        for coding in concept.get("coding") or ():
            if coding.get("system") == source and coding.get("code") in codes.codes:
                code = codes.codes[coding["code"]]
                if code is not None:
                    url = self.tables.extensions["nhs-number-verification"]["r4"]
                    return {"url": url, "valueCodeableConcept": codes.concept(code)}
        self.unused(where, "no CareConnect NHS number verification status code")
        return None

    def sct_description(self, extension: dict[str, Any], where: str) -> list[dict[str, Any]]:
        parts: dict[str, str] = self.tables.extensions["sct-description"]["parts"]
        result = []
        for n, part in enumerate(extension.get("extension") or ()):
            url = part.get("url") if isinstance(part, dict) else None
            values = [value for key, value in part.items() if key.startswith("value")] if url in parts else []
            if url == "descriptionId" and values:
                result.append({"url": parts["descriptionId"], "valueId": values[0]})
            elif url == "descriptionDisplay" and values:
                result.append({"url": parts["descriptionDisplay"], "valueString": values[0]})
            else:
                self.unused(f"{where}.extension[{n}]")
        return result


# -- resources ------------------------------------------------------------------------------------


def _business_identity(resource: dict[str, Any], spec: _EntrySpec) -> tuple[str, str] | None:
    """(system, value) of the identifier that identifies the resource: the first of the preferred
    systems, else the first identifier with a system and a value."""
    identifiers = [
        item
        for item in resource.get("identifier") or ()
        if isinstance(item, dict) and isinstance(item.get("system"), str) and isinstance(item.get("value"), str)
    ]
    for system in spec.identity:
        for item in identifiers:
            if item["system"] == system:
                return system, item["value"]
    if identifiers and spec.stu3 != "Patient":
        return identifiers[0]["system"], identifiers[0]["value"]
    return None


def _status(build: _Build, source: _Source, key: str, table: str) -> str | None:
    """The R4 code of the STU3 code at ``key`` (through the named code map), reported when R4 has none."""
    value = source.take(key)
    if value is None:
        return None
    code = build.tables.maps[table].code(value, f"{source.label}.{key}")
    if code is None:
        build.unused(f"{source.label}.{key}", f"{value!r} has no R4 equivalent")
    return code


def _statuses(build: _Build, source: _Source, out: dict[str, Any], kind: str, erroneous: str) -> str | None:
    """``clinicalStatus`` and ``verificationStatus`` through the ``{kind}-clinical`` and
    ``{kind}-verification`` code maps; the R4 clinical code, None when there is none or R4 forbids
    one (an entered-in-error record, ``erroneous`` says which and its invariant)."""
    maps = build.tables.maps
    clinical = _status(build, source, "clinicalStatus", f"{kind}-clinical")
    verification = _status(build, source, "verificationStatus", f"{kind}-verification")
    if clinical and verification == "entered-in-error":
        build.unused(f"{source.label}.clinicalStatus", f"R4 has none on {erroneous}")
        clinical = None
    elif clinical:
        out["clinicalStatus"] = maps[f"{kind}-clinical"].concept(clinical)
    if verification:
        out["verificationStatus"] = maps[f"{kind}-verification"].concept(verification)
    return clinical


def _patient(build: _Build, source: _Source, out: dict[str, Any], spec: _EntrySpec) -> None:
    practice = source.take("managingOrganization")
    practice_ref = (
        build.convert(practice, f"{source.label}.managingOrganization", ("Organization",))
        if isinstance(practice, dict)
        else None
    )
    gps = build.convert(
        source.take("generalPractitioner"), f"{source.label}.generalPractitioner", ("Organization", "Practitioner")
    )
    references = ([practice_ref] if practice_ref else []) + (gps or [])
    targets = [ref["reference"] for ref in references]
    unique = [ref for n, ref in enumerate(references) if ref["reference"] not in targets[:n]]
    if unique:
        out["generalPractitioner"] = unique
    if practice_ref:
        out["managingOrganization"] = practice_ref
    # SP-Patient adds two rules to UK Core Patient (profiles/StructureDefinition-SP-Patient.json): a
    # verification status on the NHS number, and a valid Modulus 11 check digit (sp-nhs-1).
    verification_url = build.tables.extensions["nhs-number-verification"]["r4"]
    nhs = next(item for item in out.get("identifier") or () if item.get("system") == spec.identity[0])
    verified = any(extension.get("url") == verification_url for extension in nhs.get("extension") or ())
    number = str(nhs.get("value"))
    if not (verified and number.isdigit() and len(number) == 10 and nhs_number_is_valid(number)):
        out["meta"]["profile"] = [spec.fallback_profile]


def _condition(build: _Build, source: _Source, out: dict[str, Any], spec: _EntrySpec) -> None:
    clinical = _statuses(build, source, out, "condition", "an entered-in-error Condition (con-5)")
    abated = [key for key in out if key.startswith("abatement")]
    if abated and clinical not in ("inactive", "resolved", "remission"):
        reason = f"clinicalStatus is {clinical or 'absent'}: R4 allows no abatement then (con-4)"
        for key in abated:
            build.unused(f"{source.label}.{key}", reason)
            del out[key]
    category = build.convert(source.take("category"), f"{source.label}.category")
    if category is None:
        fixed = build.tables.translations["condition-category"]
        coding = {"system": fixed["system"], "code": fixed["code"], "display": fixed["display"]}
        category = [{"coding": [coding]}]
        build.mapped.defaults.append(f"{source.label}.category={fixed['code']}")
    out["category"] = category
    asserter = source.take("asserter")
    if isinstance(asserter, dict):
        reference = build.convert(asserter, f"{source.label}.asserter", ("Practitioner", "Patient"))
        if reference is not None:
            out["recorder"] = reference
            out["asserter"] = copy.deepcopy(reference)
    significance_url = build.tables.extensions["problem-significance"]["r4"]
    for extension in source.extensions(build.tables.extension_names, "problem-significance"):
        concept = extension.get("valueCodeableConcept") or {}
        codings = concept.get("coding") or [{}]
        code = extension.get("valueCode") or codings[0].get("code")
        if isinstance(code, str):
            out.setdefault("extension", []).append({"url": significance_url, "valueCode": code})
        else:
            build.unused(source.extension_path(extension), "no significance code")


def _encounter(build: _Build, source: _Source, out: dict[str, Any], spec: _EntrySpec) -> None:
    out["status"] = _status(build, source, "status", "encounter-status")
    stu3_class = source.take("class")
    r4_class = build.convert(stu3_class, f"{source.label}.class", coding=True) if stu3_class else None
    if r4_class is None:
        r4_class = copy.deepcopy(build.tables.translations["encounter-class-absent"])
        build.mapped.defaults.append(f"{source.label}.class=unknown (data-absent-reason)")
    out["class"] = r4_class


def _observation(build: _Build, source: _Source, out: dict[str, Any], spec: _EntrySpec) -> None:
    out["status"] = _status(build, source, "status", "observation-status")
    comment = source.take("comment")
    if isinstance(comment, str) and comment:
        # R4 replaced Observation.comment with note (https://hl7.org/fhir/R4/observation.html "Changes since R3")
        out["note"] = [{"text": comment}]
    components = build.convert(source.take("component"), f"{source.label}.component")
    for component in components or ():
        if isinstance(component.get("interpretation"), dict):
            component["interpretation"] = [component["interpretation"]]
    if components:
        out["component"] = components


def _allergy(build: _Build, source: _Source, out: dict[str, Any], spec: _EntrySpec) -> None:
    _statuses(build, source, out, "allergy", "an entered-in-error allergy (ait-2)")
    names = build.tables.extension_names
    end = build.tables.extensions["allergy-end"]
    for extension in source.extensions(names, "allergy-end"):
        where = source.extension_path(extension)
        parts = []
        for n, part in enumerate(extension.get("extension") or ()):
            name = end["parts"].get(part.get("url")) if isinstance(part, dict) else None
            values = [value for key, value in part.items() if key.startswith("value")] if name else []
            if name and values:
                parts.append({"url": name, ("valueDateTime" if name == "endDate" else "valueString"): values[0]})
            else:
                build.unused(f"{where}.extension[{n}]")
        if "clinicalStatus" in out and parts:
            out["clinicalStatus"].setdefault("extension", []).append({"url": end["r4"], "extension": parts})
        elif parts:
            build.unused(where, "no clinicalStatus to carry it in R4")
    for extension in source.extensions(names, "associated-encounter"):
        value = extension.get("valueReference")
        where = source.extension_path(extension)
        reference = build.convert(value, where, ("Encounter",)) if isinstance(value, dict) else None
        if reference is not None:
            out["encounter"] = reference


def _service_request(build: _Build, source: _Source, out: dict[str, Any], spec: _EntrySpec) -> None:
    out["status"] = _status(build, source, "status", "request-status")
    out["intent"] = _status(build, source, "intent", "request-intent")
    priority = _status(build, source, "priority", "request-priority")
    if priority:
        out["priority"] = priority
    services = build.convert(source.take("serviceRequested"), f"{source.label}.serviceRequested")
    if services:
        # R4 code is 0..1 (https://hl7.org/fhir/R4/servicerequest-version-maps.html: serviceRequested -> code)
        out["code"] = services[0]
        for n in range(1, len(services)):
            build.unused(f"{source.label}.serviceRequested[{n}]", "R4 ServiceRequest.code holds one")
    requester = source.take("requester")
    if isinstance(requester, dict):
        where = f"{source.label}.requester"
        agent = requester.get("agent")
        reference = build.convert(agent, f"{where}.agent", ("Practitioner", "Organization", "Patient"))
        if reference is not None:
            out["requester"] = reference
        for key, value in requester.items():
            if key != "agent" and value:
                build.unused(f"{where}.{key}")
    description = source.take("description")
    if isinstance(description, str) and description:
        # R4 ServiceRequest has no description; the referral's free text is a note
        out.setdefault("note", []).append({"text": description})


_SPECIAL: dict[str, Callable[[_Build, _Source, dict[str, Any], _EntrySpec], None]] = {
    "Patient": _patient,
    "Condition": _condition,
    "Encounter": _encounter,
    "Observation": _observation,
    "AllergyIntolerance": _allergy,
    "ReferralRequest": _service_request,
}


def _resource(build: _Build, candidate: _Candidate) -> dict[str, Any]:
    """The R4 resource of one candidate entry."""
    spec = candidate.spec
    source = _Source(candidate.resource, candidate.label)
    if source.data.get("modifierExtension"):
        where = f"{candidate.label}.modifierExtension"
        raise MappingError(f"{where}: a modifier extension this mapping does not know", field=where)
    out: dict[str, Any] = {
        "resourceType": spec.r4,
        "id": candidate.target.id,
        "meta": {"profile": [spec.profile]},
    }
    if spec.subject and source.take(spec.subject) is not None:
        out[spec.subject] = build.patient_reference()
    for key, element in spec.elements.items():
        value = source.take(key)
        if value is None:
            continue
        converted = build.convert(value, f"{candidate.label}.{key}", element.targets)
        if converted is None:
            continue
        if element.repeats and not isinstance(converted, list):
            converted = [converted]
        out[element.to] = converted
    special = _SPECIAL.get(spec.stu3)
    if special is not None:
        special(build, source, out, spec)
    for path in source.leftovers():
        build.unused(path)
    return _in_order(out)


def _in_order(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` with its elements in the order R4 defines them, as FHIR JSON is usually written
    (https://hl7.org/fhir/R4/json.html)."""
    kind = resource["resourceType"]
    rank = {name: n for n, name in enumerate(model.type_model(kind).children(kind))}
    ordered = sorted((key for key in resource if key != "resourceType"), key=lambda key: rank.get(key, len(rank)))
    return {"resourceType": kind, **{key: resource[key] for key in ordered}}


def _keys(entry: dict[str, Any], resource: dict[str, Any]) -> list[str]:
    """The local references that name this entry: ``Type/id`` and its fullUrl."""
    keys = []
    if isinstance(resource.get("id"), str):
        keys.append(f"{resource['resourceType']}/{resource['id']}")
    if isinstance(entry.get("fullUrl"), str):
        keys.append(entry["fullUrl"])
    return keys


def build(record: dict[str, Any]) -> Mapped:
    """The R4 UK Core resources of one GP Connect Access Record Structured Bundle (STU3), and the trace."""
    tables = _tables()
    entries = _checked(record)
    patients = [n for n, entry in enumerate(entries) if (entry.get("resource") or {}).get("resourceType") == "Patient"]
    if not patients:
        raise MappingError("the Bundle has no Patient entry", field="Bundle.entry")
    if len(patients) > 1:
        where = ", ".join(f"Bundle.entry[{n}]" for n in patients)
        raise MappingError(
            f"the Bundle has more than one Patient ({where}); one record is one patient", field="Bundle.entry"
        )
    run = _Build(tables)

    # Pass 1: give each mappable entry its identity and id, so that references can be resolved.
    candidates: list[_Candidate] = []
    seen: dict[tuple[str, str], _Candidate] = {}
    for index, entry in enumerate(entries):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            if any(value for key, value in entry.items() if key != "fullUrl"):
                run.unused(f"Bundle.entry[{index}]")
            continue
        kind = str(resource.get("resourceType"))
        keys = _keys(entry, resource)
        for key in keys:
            run.kinds[key] = kind
        spec = tables.entries.get(kind)
        if spec is None:
            run.unused(f"Bundle.entry[{index}].resource ({kind})")
            continue
        business = _business_identity(resource, spec)
        label = f"Bundle.entry[{index}].resource ({kind})"
        if business is None:
            if kind == "Patient":
                where = f"{label}.identifier"
                raise MappingError(f"{where}: the Patient has no NHS number ({spec.identity[0]})", field=where)
            run.unused(label, "no identifier to identify it by")
            continue
        key = identity(*business)
        earlier = seen.get((spec.r4, key))
        if earlier is not None:
            earlier.keys.extend(keys)  # references to either entry resolve to the one resource
            run.unused(label, f"same identifier as Bundle.entry[{earlier.index}], mapped once")
            continue
        candidate = _Candidate(index, spec, resource, _Target(spec.r4, deterministic_id(spec.r4, key)), key, keys)
        seen[(spec.r4, key)] = candidate
        candidates.append(candidate)
        if kind == "Patient":
            run.patient = candidate.target
            for local in keys:
                run.targets[local] = candidate.target

    # A clinical entry must be about the record's Patient (its subject resolves to the Patient entry).
    kept = []
    for candidate in candidates:
        subject = candidate.resource.get(candidate.spec.subject) if candidate.spec.subject else None
        if isinstance(subject, dict) and run.resolve(subject.get("reference")) is not run.patient:
            reason = f"its {candidate.spec.subject} ({subject.get('reference')}) is not the record's Patient"
            run.unused(candidate.label, reason)
            continue
        kept.append(candidate)
        for local in candidate.keys:
            run.targets[local] = candidate.target

    # Pass 2: map, in the YAML's order of types, then the Bundle's order.
    order = list(tables.entries)
    for candidate in sorted(kept, key=lambda c: (order.index(c.spec.stu3), c.index)):
        resource = _resource(run, candidate)
        run.mapped.resources.append(MappedResource(resource, if_none_exist=candidate.identity))
    return run.mapped


# -- reporting ------------------------------------------------------------------------------------


def _first_coding(concept: Any) -> tuple[str, str, str]:
    """(system, code, display) of a CodeableConcept's first coding; its text as display when the
    coding has none."""
    if not isinstance(concept, dict):
        return "", "", ""
    codings = concept.get("coding") or [{}]
    coding = codings[0]
    display = coding.get("display") or concept.get("text") or ""
    return str(coding.get("system") or ""), str(coding.get("code") or ""), str(display)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _quantity(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    unit = value.get("unit") or value.get("code")
    return " ".join(part for part in (_text(value.get("comparator")) + _text(value.get("value")), _text(unit)) if part)


def _observation_value(resource: Mapping[str, Any]) -> str:
    """An Observation's value[x] as text (https://hl7.org/fhir/R4/observation-definitions.html#Observation.value_x_)."""
    if "valueQuantity" in resource:
        return _quantity(resource["valueQuantity"])
    if "valueCodeableConcept" in resource:
        _, code, display = _first_coding(resource["valueCodeableConcept"])
        return display or code
    if "valueRange" in resource:
        low, high = resource["valueRange"].get("low"), resource["valueRange"].get("high")
        return f"{_quantity(low)} - {_quantity(high)}".strip(" -")
    if "valueRatio" in resource:
        ratio = resource["valueRatio"]
        return f"{_quantity(ratio.get('numerator'))} / {_quantity(ratio.get('denominator'))}"
    if "valuePeriod" in resource:
        return f"{_text(resource['valuePeriod'].get('start'))}/{_text(resource['valuePeriod'].get('end'))}"
    for key in ("valueString", "valueBoolean", "valueInteger", "valueTime", "valueDateTime"):
        if key in resource:
            return _text(resource[key])
    return ""


def _date(resource: Mapping[str, Any], *keys: str) -> str:
    """The first of ``keys`` with a value; a Period counts by its start."""
    for key in keys:
        value = resource.get(key)
        if isinstance(value, dict):
            value = value.get("start")
        if value:
            return str(value)
    return ""


def _row(
    resource: Mapping[str, Any], patients: Mapping[str, str], systems: Mapping[str, tuple[str, ...]]
) -> dict[str, str]:
    kind = str(resource["resourceType"])
    subject = resource.get("patient" if kind == "AllergyIntolerance" else "subject") or {}
    reference = str(subject.get("reference") or "")
    identifiers = [item for item in resource.get("identifier") or () if isinstance(item, dict)]
    preferred = [item for item in identifiers if item.get("system") in systems.get(kind, ())]
    chosen = (preferred or identifiers or [{}])[0]
    concept: Any
    if kind == "Encounter":
        concept = (resource.get("type") or [None])[0]
    elif kind == "ServiceRequest":
        # GP Connect puts a referral's main code in reasonCode (see the YAML); code when there is one
        concept = resource.get("code") or (resource.get("reasonCode") or [None])[0]
    else:
        concept = resource.get("code")
    system, code, display = _first_coding(concept)
    if kind in ("Condition", "AllergyIntolerance"):
        status = _first_coding(resource.get("clinicalStatus"))[1]
    else:
        status = _text(resource.get("status"))
    dates = {
        "Condition": ("onsetDateTime", "onsetPeriod", "recordedDate"),
        "AllergyIntolerance": ("onsetDateTime", "onsetPeriod", "recordedDate"),
        "Observation": ("effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued"),
        "ServiceRequest": ("authoredOn", "occurrenceDateTime", "occurrencePeriod"),
        "Encounter": ("period",),
    }[kind]
    return {
        "nhs_number": patients.get(reference.rsplit(":", 1)[-1].rsplit("/", 1)[-1], ""),
        "resource_type": kind,
        "identifier": _text(chosen.get("value")),
        "code_system": system,
        "code": code,
        "display": display,
        "status": status,
        "date": _date(resource, *dates),
        "value": _observation_value(resource) if kind == "Observation" else "",
    }


def flatten(resources: Iterable[Mapping[str, Any] | MappedResource]) -> list[dict[str, str]]:
    """Flat rows (:data:`COLUMNS`, all text) for reporting: one per Condition, Observation,
    AllergyIntolerance, ServiceRequest and Encounter, in the order given. The NHS number is that of
    the Patient among ``resources`` the row's subject references (``urn:uuid:<id>`` or
    ``Patient/<id>``); the code is the first coding of the resource's main concept; the date is the
    onset (else the recorded date), the effective time (else issued), authoredOn, or the period start."""
    items = [item.resource if isinstance(item, MappedResource) else item for item in resources]
    tables = _tables()
    nhs_system = tables.entries["Patient"].identity[0]
    patients = {
        str(item.get("id")): str(identifier.get("value"))
        for item in items
        if item.get("resourceType") == "Patient"
        for identifier in item.get("identifier") or ()
        if identifier.get("system") == nhs_system
    }
    systems = {spec.r4: spec.identity for spec in tables.entries.values()}
    kinds = ("Condition", "Observation", "AllergyIntolerance", "ServiceRequest", "Encounter")
    return [_row(item, patients, systems) for item in items if item.get("resourceType") in kinds]
