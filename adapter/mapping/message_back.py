"""The message back to the GP and referrer: a stored social prescribing case as one FHIR document.

PRSB Social Prescribing Information Standard v1.1, view "Message back to GP and referrer"
(``../shared/domain.md`` sections 1-2): when a case closes (or to report on an open one) the service
tells the person's GP practice and the referrer what happened: the referral, the personalised care
and support plan, the activities and contacts, the outcome measures before and after, and the
closure. Here that is a FHIR document (https://hl7.org/fhir/R4/documents.html): a Bundle of type
``document`` (profile SP-MessageBackToGP) whose first entry is the Composition
(SP-MessageBackToGPComposition), then the Patient and every resource the sections refer to, each
with ``fullUrl`` ``urn:uuid:<id>`` and its references rewritten to those fullUrls.

- :func:`build` is the mapping's ``build`` function (``mappings/message-back-to-gp/mapping.yaml``):
  a Bundle (``collection`` or ``searchset``) holding one EpisodeOfCare and its resources in, one
  document out. Deterministic: ids are uuid5 of the case's identifier, dates come from the case.
- :func:`render_html` turns any SP-MessageBackToGP document into a standalone HTML page.
- :func:`flatten` gives one CSV-ready row per outcome measure of a document (for reporting).

What the builder knows about codes, tools, ranges and sections is data: ``mapping.yaml`` and the
project's CodeSystems in ``profiles/`` (``../shared/style.md`` rule 5). A case the builder cannot
take raises :class:`~adapter.mapping.base.MappingError`; a broken ``mapping.yaml`` raises
:class:`~adapter.mapping.spec.SpecError` when it is first read.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from itertools import chain, count
from typing import Any

import yaml
from lxml import etree

from adapter.mapping.base import Mapped, MappedResource, MappingError
from adapter.mapping.ids import deterministic_id, identity
from adapter.mapping.spec import SpecError, mappings_root
from adapter.validation.bundled import profiles_dir

__all__ = ["COLUMNS", "build", "flatten", "render_html"]

_NAME = "message-back-to-gp"
_XHTML = "http://www.w3.org/1999/xhtml"
#: Columns of :func:`flatten`'s rows.
COLUMNS = ("nhs_number", "episode_identifier", "tool", "first_date", "first_score", "last_date", "last_score", "change")

# The narrative's default namespace (lxml-stubs types nsmap keys as str; lxml takes None for the default).
_DEFAULT_NAMESPACE: Any = {None: _XHTML}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The end of a literal reference: Type/id, optionally versioned (https://hl7.org/fhir/R4/references.html#literal).
_TYPE_ID = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
# Characters XML 1.0 cannot carry (https://www.w3.org/TR/xml/#charsets); FHIR strings cannot either.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]|[\ud800-\udfff]")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


# --------------------------------------------------------------------------------------------
# What the builder knows: mapping.yaml and the CodeSystems of profiles/
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Measure:
    """One series of scores: a tool's value, or one answer (component) of a tool such as ONS4."""

    key: str
    name: str
    low: int
    high: int
    better: str
    component: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class _Tool:
    key: str
    name: str
    codes: frozenset[tuple[str, str]]
    measures: tuple[_Measure, ...]


@dataclass(frozen=True, slots=True)
class _Section:
    system: str
    code: str
    display: str
    blocks: tuple[str, ...]
    heading: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class _Spec:
    document: dict[str, Any]
    case: dict[str, Any]
    type_coding: dict[str, str]
    sections: tuple[_Section, ...]
    tools: tuple[_Tool, ...]
    empty_reason: dict[str, str]


def _code_system(file_name: str) -> dict[str, Any]:
    path = profiles_dir() / file_name
    try:
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError(f"{_NAME}: cannot read the CodeSystem {path}: {exc}") from exc
    return loaded


@cache
def _spec() -> _Spec:
    """``mapping.yaml`` read once, with the section codes and document type of ``profiles/``."""
    path = mappings_root() / _NAME / "mapping.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        document, sections_raw, case = raw["document"], raw["sections"], raw["case"]
        doc_type = _code_system(document["type_code_system"])
        display = {c["code"]: c.get("display", c["code"]) for c in doc_type.get("concept") or ()}
        type_coding = {
            "system": doc_type["url"],
            "code": document["type_code"],
            "display": display[document["type_code"]],
        }
        section_system = _code_system(sections_raw["code_system"])
        content: dict[str, Any] = sections_raw["content"]
        known = {c["code"] for c in section_system.get("concept") or ()}
        unknown = sorted(set(content) - known)
        if unknown:
            raise SpecError(f"{path}: sections.content: {unknown} are not codes of {section_system['url']}")
        sections = []
        for concept in section_system.get("concept") or ():
            body = content.get(concept["code"])
            if body is None:
                continue
            blocks = tuple(body["blocks"])
            if not set(blocks) <= set(_BLOCKS):
                raise SpecError(f"{path}: sections.content.{concept['code']}: unknown blocks in {list(blocks)}")
            heading = None
            if body.get("heading"):
                heading = {"system": sections_raw["heading_system"], **body["heading"]}
            sections.append(
                _Section(
                    section_system["url"], concept["code"], concept.get("display", concept["code"]), blocks, heading
                )
            )
        tools = tuple(_tool(body) for body in raw["outcome_tools"])
        empty_reason = dict(sections_raw["empty_reason"])
    except (KeyError, TypeError, AttributeError, ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: {exc!r}") from exc
    return _Spec(document, case, type_coding, tuple(sections), tools, empty_reason)


def _tool(body: dict[str, Any]) -> _Tool:
    low, high = (int(bound) for bound in body["range"])
    codes = frozenset((str(c["system"]), str(c["code"])) for c in body["codes"])
    if body.get("items"):
        measures = tuple(
            _Measure(
                f"{body['key']}:{item['key']}",
                f"{body['name']} {item['name']}",
                low,
                high,
                str(item.get("better", body.get("better", "higher"))),
                (str(item["code"]["system"]), str(item["code"]["code"])),
            )
            for item in body["items"]
        )
    else:
        measures = (_Measure(str(body["key"]), str(body["name"]), low, high, str(body.get("better", "higher"))),)
    return _Tool(str(body["key"]), str(body["name"]), codes, measures)


# --------------------------------------------------------------------------------------------
# The input Bundle: its resources, and references between them
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Entry:
    resource: dict[str, Any]
    #: ``Type/id`` (what the trace names), else the fullUrl, else the entry's position.
    label: str
    full_url: str | None

    @property
    def type(self) -> str:
        return str(self.resource["resourceType"])


class _Index:
    """The resources of a Bundle, found by fullUrl or by the ``Type/id`` a reference ends with
    (https://hl7.org/fhir/R4/bundle.html#references)."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.entries: list[_Entry] = []
        self._by_url: dict[str, _Entry] = {}
        self._by_key: dict[str, _Entry] = {}
        for position, item in enumerate(bundle.get("entry") or ()):
            resource = item.get("resource") if isinstance(item, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                continue
            key = f"{resource['resourceType']}/{resource['id']}" if isinstance(resource.get("id"), str) else None
            if key is not None and key in self._by_key:
                continue  # a searchset can hold a resource twice (a match that is also an _include)
            full_url = item.get("fullUrl") if isinstance(item.get("fullUrl"), str) else None
            entry = _Entry(resource, key or full_url or f"{resource['resourceType']}(entry {position})", full_url)
            self.entries.append(entry)
            if key is not None:
                self._by_key[key] = entry
            if full_url is not None:
                self._by_url.setdefault(full_url, entry)

    def of_type(self, type: str) -> list[_Entry]:
        return [entry for entry in self.entries if entry.type == type]

    def resolve(self, reference: Any) -> _Entry | None:
        text = reference.get("reference") if isinstance(reference, dict) else reference
        if not isinstance(text, str) or text.startswith("#"):
            return None
        if text in self._by_url:
            return self._by_url[text]
        match = _TYPE_ID.search(text)
        return self._by_key.get(f"{match.group(1)}/{match.group(2)}") if match else None

    def references(self, resource: Any) -> Iterator[_Entry]:
        """The entries ``resource`` refers to, in document order (contained resources included)."""
        if isinstance(resource, dict):
            for key, value in resource.items():
                if key == "reference" and isinstance(value, str):
                    found = self.resolve(value)
                    if found is not None:
                        yield found
                else:
                    yield from self.references(value)
        elif isinstance(resource, list):
            for value in resource:
                yield from self.references(value)


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _at(resource: Any, path: str) -> list[Any]:
    """The values at a dotted path (``period.end``), through lists."""
    values = [resource]
    for part in path.split("."):
        values = [child for value in values if isinstance(value, dict) for child in _list(value.get(part))]
    return values


# --------------------------------------------------------------------------------------------
# Dates and text
# --------------------------------------------------------------------------------------------


def _instant(text: Any) -> datetime | None:
    """A FHIR date, dateTime or instant as an aware datetime (a date alone: midnight UTC), for ordering."""
    if not isinstance(text, str):
        return None
    try:
        if len(text) == 4:
            return datetime(int(text), 1, 1, tzinfo=UTC)
        if len(text) == 7:
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _as_instant(text: str) -> str:
    """A date or dateTime as an ``instant`` (Bundle.timestamp): a date alone is midnight UTC."""
    if "T" in text:
        return text
    moment = _instant(text)
    return moment.isoformat() if moment else text


def _day(text: Any) -> str:
    """``2024-01-24T11:30:00+00:00`` -> ``24 January 2024``: the date as written (no time zone shift)."""
    if not isinstance(text, str):
        return ""
    parts = text[:10].split("-")
    try:
        if len(parts) == 3:
            return f"{int(parts[2])} {_MONTHS[int(parts[1]) - 1]} {int(parts[0])}"
        if len(parts) == 2:
            return f"{_MONTHS[int(parts[1]) - 1]} {int(parts[0])}"
    except (ValueError, IndexError):
        return text
    return text


def _clean(text: Any) -> str:
    """Text that XML can carry (lxml escapes the rest when it writes the narrative)."""
    return _NOT_XML.sub("", str(text)) if text is not None else ""


def _concept(value: Any) -> str:
    """What a CodeableConcept (or Coding) says: its text, else its codings' displays, else codes."""
    if not isinstance(value, dict):
        return ""
    if isinstance(value.get("text"), str):
        return str(value["text"])
    codings = [c for c in _list(value.get("coding")) if isinstance(c, dict)] or [value]
    for key in ("display", "code"):
        found = [str(c[key]) for c in codings if isinstance(c.get(key), str)]
        if found:
            return found[0]
    return ""


def _human_name(resource: dict[str, Any]) -> str:
    names = [n for n in _list(resource.get("name")) if isinstance(n, dict)]
    if not names:
        return ""
    name = next((n for n in names if n.get("use") in ("official", "usual")), names[0])
    if isinstance(name.get("text"), str):
        return str(name["text"])
    parts = [*_list(name.get("prefix")), *_list(name.get("given")), name.get("family"), *_list(name.get("suffix"))]
    return " ".join(str(part) for part in parts if part)


def _pairs(codings: Iterable[Any]) -> set[tuple[str, str]]:
    return {(str(c.get("system")), str(c.get("code"))) for c in codings if isinstance(c, dict)}


# --------------------------------------------------------------------------------------------
# Outcome scores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Score:
    when: str
    at: datetime
    value: int


@dataclass(slots=True)
class _Series:
    measure: _Measure
    scores: list[_Score] = field(default_factory=list)

    @property
    def first(self) -> _Score:
        return self.scores[0]

    @property
    def last(self) -> _Score | None:
        """The last score, when there is a follow-up one."""
        return self.scores[-1] if len(self.scores) > 1 else None


def _tool_of(spec: _Spec, observation: dict[str, Any]) -> _Tool | None:
    codes = _pairs(_list((observation.get("code") or {}).get("coding")))
    return next((tool for tool in spec.tools if tool.codes & codes), None)


def _effective(observation: dict[str, Any]) -> str | None:
    for path in ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant"):
        found = [value for value in _at(observation, path) if _instant(value) is not None]
        if found:
            return str(found[0])
    return None


def _integer(holder: dict[str, Any]) -> int | None:
    """valueInteger, or a whole-number valueQuantity (older systems send scores as quantities)."""
    value = holder.get("valueInteger")
    if value is None:
        value = (holder.get("valueQuantity") or {}).get("value")
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal) or value != int(value):
        return None
    return int(value)


def _scores(spec: _Spec, observation: _Entry) -> list[tuple[_Measure, _Score]]:
    """The scores an outcome Observation holds; a score out of its tool's range is refused."""
    tool = _tool_of(spec, observation.resource)
    when = _effective(observation.resource)
    if tool is None or when is None:
        return []
    moment = _instant(when)
    assert moment is not None  # _effective only returns parseable dates
    found = []
    for measure in tool.measures:
        if measure.component is None:
            holders = [observation.resource]
        else:
            holders = [
                c
                for c in _list(observation.resource.get("component"))
                if isinstance(c, dict) and measure.component in _pairs(_list((c.get("code") or {}).get("coding")))
            ]
        for holder in holders[:1]:
            value = _integer(holder)
            if value is None:
                continue
            if not measure.low <= value <= measure.high:
                raise MappingError(
                    f"{observation.label}: the {measure.name} score {value} is outside {measure.low}-{measure.high}",
                    field=f"{observation.label}.value",
                )
            found.append((measure, _Score(when, moment, value)))
    return found


def _series(spec: _Spec, observations: Iterable[_Entry]) -> list[_Series]:
    """Each measure's scores in time order, measures in the order of ``outcome_tools``."""
    by_key = {measure.key: _Series(measure) for tool in spec.tools for measure in tool.measures}
    for observation in observations:
        for measure, score in _scores(spec, observation):
            by_key[measure.key].scores.append(score)
    for series in by_key.values():
        series.scores.sort(key=lambda score: (score.at, score.when, score.value))
    return [series for series in by_key.values() if series.scores]


def _is_outcome(spec: _Spec, entry: _Entry) -> bool:
    resource = entry.resource
    return (
        entry.type == "Observation"
        and resource.get("status") in spec.case["observation_statuses"]
        and _tool_of(spec, resource) is not None
        and _effective(resource) is not None
    )


def _signed(change: int) -> str:
    return f"{change:+d}" if change else "0"


# --------------------------------------------------------------------------------------------
# The case: which input resources belong to it
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Case:
    spec: _Spec
    index: _Index
    episode: _Entry
    episode_identity: str
    patient: _Entry
    referrals: list[_Entry]
    tasks: list[_Entry]
    encounters: list[_Entry]
    care_plans: list[_Entry]
    goals: list[_Entry]
    observations: list[_Entry]

    @property
    def closed(self) -> bool:
        return self.episode.resource.get("status") in self.spec.document["closed_case_statuses"]

    def name(self, reference: Any) -> str:
        return _name(self.index, reference)

    def named(self, entry: _Entry) -> str:
        return _named(self.index, entry)


def _name(index: _Index, reference: Any) -> str:
    """Who or what a reference points at, in words: the resolved resource's name, else its display."""
    found = index.resolve(reference)
    named = _named(index, found) if found is not None else ""
    display = reference.get("display") if isinstance(reference, dict) else None
    return named or (str(display) if display else "")


def _named(index: _Index, entry: _Entry) -> str:
    """A person's or organisation's name; a PractitionerRole is its practitioner (organisation)."""
    resource = entry.resource
    if entry.type in ("Patient", "Practitioner", "RelatedPerson"):
        return _human_name(resource)
    if entry.type == "PractitionerRole":
        parts = []
        for key, kind in (("practitioner", "Practitioner"), ("organization", "Organization")):
            found = index.resolve(resource.get(key))
            # Only one level down: a role's practitioner and organisation are not roles themselves.
            words = _named(index, found) if found is not None and found.type == kind else ""
            display = resource[key].get("display") if isinstance(resource.get(key), dict) else None
            parts.append(words or str(display or ""))
        who, where = parts
        return f"{who} ({where})" if who and where else who or where
    if isinstance(resource.get("name"), str):
        return str(resource["name"])
    return ""


def _sort_key(entry: _Entry, *paths: str) -> tuple[datetime, str]:
    moments = [m for path in paths for m in map(_instant, _at(entry.resource, path)) if m is not None]
    return (min(moments) if moments else datetime.max.replace(tzinfo=UTC), entry.label)


def _case(spec: _Spec, record: dict[str, Any]) -> _Case:
    if record.get("resourceType") != "Bundle" or record.get("type") not in ("collection", "searchset"):
        raise MappingError("the record must be a Bundle of type collection or searchset", field="type")
    index = _Index(record)
    episodes = index.of_type("EpisodeOfCare")
    if len(episodes) != 1:
        raise MappingError(
            f"a case is one EpisodeOfCare; the Bundle holds {len(episodes)}", field="entry.resource.EpisodeOfCare"
        )
    episode = episodes[0]
    identifier = next(
        (
            i
            for i in _list(episode.resource.get("identifier"))
            if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str)
        ),
        None,
    )
    if identifier is None:
        raise MappingError(
            f"{episode.label} has no identifier (system and value): the document's identity is the case's",
            field="EpisodeOfCare.identifier",
        )
    patient = index.resolve(episode.resource.get("patient"))
    if patient is None or patient.type != "Patient":
        raise MappingError(f"{episode.label}: its patient is not in the Bundle", field="EpisodeOfCare.patient")

    referrals = [
        found
        for found in map(index.resolve, _list(episode.resource.get("referralRequest")))
        if found is not None and found.type == "ServiceRequest"
    ]
    tasks = [
        task
        for task in index.of_type("Task")
        if any(index.resolve(task.resource.get("focus")) is referral for referral in referrals)
    ]

    care_plans = _care_plans(spec, index, patient)
    return _Case(
        spec,
        index,
        episode,
        identity(identifier["system"], identifier["value"]),
        patient,
        referrals,
        tasks,
        _encounters(spec, index, episode, patient, referrals),
        care_plans,
        _goals(index, care_plans, patient),
        _outcomes(spec, index, patient),
    )


def _encounters(spec: _Spec, index: _Index, episode: _Entry, patient: _Entry, referrals: list[_Entry]) -> list[_Entry]:
    """The contacts of the case that took place, by date: Encounters linked to the case, or to its
    referral, or (linked to no case) the person's."""

    def of_case(entry: _Entry) -> bool:
        resource = entry.resource
        cases = [index.resolve(r) for r in _list(resource.get("episodeOfCare"))]
        if cases:
            return episode in cases
        if any(index.resolve(r) in referrals for r in _list(resource.get("basedOn"))):
            return True
        return index.resolve(resource.get("subject")) is patient

    statuses = spec.case["contact_statuses"]
    found = [e for e in index.of_type("Encounter") if e.resource.get("status") in statuses and of_case(e)]
    return sorted(found, key=lambda e: _sort_key(e, "period.start"))


def _care_plans(spec: _Spec, index: _Index, patient: _Entry) -> list[_Entry]:
    """The person's personalised care and support plans (category pcsp)."""
    category = spec.case["care_plan_category"]
    wanted = (category["system"], category["code"])
    found = [
        plan
        for plan in index.of_type("CarePlan")
        if index.resolve(plan.resource.get("subject")) is patient
        and wanted in _pairs(coding for c in _list(plan.resource.get("category")) for coding in _list(c.get("coding")))
    ]
    return sorted(found, key=lambda e: _sort_key(e, "created", "period.start"))


def _goals(index: _Index, care_plans: list[_Entry], patient: _Entry) -> list[_Entry]:
    """The plans' goals in their order, then the person's goals that no CarePlan names."""
    goals = [
        goal
        for plan in care_plans
        for goal in map(index.resolve, _list(plan.resource.get("goal")))
        if goal is not None and goal.type == "Goal"
    ]
    in_a_plan = {
        id(goal) for plan in index.of_type("CarePlan") for goal in map(index.resolve, _list(plan.resource.get("goal")))
    }
    others = [
        goal
        for goal in index.of_type("Goal")
        if id(goal) not in in_a_plan and index.resolve(goal.resource.get("subject")) is patient
    ]
    return list(dict.fromkeys(goals + sorted(others, key=lambda e: _sort_key(e, "startDate"))))


def _outcomes(spec: _Spec, index: _Index, patient: _Entry) -> list[_Entry]:
    """The person's outcome Observations, by tool (in the order of ``outcome_tools``) then date."""
    order = {tool.key: position for position, tool in enumerate(spec.tools)}

    def key(entry: _Entry) -> tuple[int, datetime | None, str]:
        tool = _tool_of(spec, entry.resource)
        return (order[tool.key] if tool else len(order), _instant(_effective(entry.resource)), entry.label)

    found = [
        o
        for o in index.of_type("Observation")
        if _is_outcome(spec, o) and index.resolve(o.resource.get("subject")) is patient
    ]
    return sorted(found, key=key)


# --------------------------------------------------------------------------------------------
# Narrative blocks: each gives XHTML elements and the entries it is about
# --------------------------------------------------------------------------------------------

_Block = tuple[list[Any], list[_Entry]]


def _x(tag: str, *children: Any) -> Any:
    """An XHTML element with text (escaped when written) and child elements."""
    element = etree.Element(f"{{{_XHTML}}}{tag}", nsmap=_DEFAULT_NAMESPACE)
    for child in children:
        if isinstance(child, str):
            _append_text(element, _clean(child))
        else:
            element.append(child)
    return element


def _table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> Any:
    return _x(
        "table",
        _x("thead", _x("tr", *(_x("th", _clean(cell)) for cell in head))),
        _x("tbody", *(_x("tr", *(_x("td", _clean(cell)) for cell in row)) for row in rows)),
    )


def _facts(rows: Iterable[tuple[str, str]]) -> Any:
    """A two-column table of what is known (rows without a value are left out)."""
    return _x("table", _x("tbody", *(_x("tr", _x("th", _clean(k)), _x("td", _clean(v))) for k, v in rows if v)))


def _referral_block(case: _Case) -> _Block:
    if not case.referrals:
        return [_x("p", "No referral is recorded for this case.")], []
    parts: list[Any] = []
    for referral in case.referrals:
        resource = referral.resource
        tasks = [t for t in case.tasks if case.index.resolve(t.resource.get("focus")) is referral]
        statuses = []
        for task in tasks:
            status = _concept(task.resource.get("businessStatus")) or str(task.resource.get("status", ""))
            when = _day(task.resource.get("lastModified") or task.resource.get("authoredOn"))
            statuses.append(f"{status} ({when})" if when else status)
        parts.append(
            _facts(
                [
                    ("Referral date", _day(resource.get("authoredOn"))),
                    ("Referred by", case.name(resource.get("requester"))),
                    ("Reason", "; ".join(filter(None, map(_concept, _list(resource.get("reasonCode")))))),
                    ("Referred to", "; ".join(filter(None, map(case.name, _list(resource.get("performer")))))),
                    (
                        "Referral identifier",
                        ", ".join(str(i["value"]) for i in _list(resource.get("identifier")) if i.get("value")),
                    ),
                    ("Notes", " ".join(str(n.get("text", "")) for n in _list(resource.get("note")))),
                    ("Status", "; ".join(statuses)),
                ]
            )
        )
    return parts, [*case.referrals, *case.tasks]


def _goal_row(case: _Case, goal: _Entry) -> list[str]:
    resource = goal.resource
    scores = {str(e.get("url")): e.get("valueInteger") for e in _list(resource.get("extension")) if isinstance(e, dict)}
    importance, confidence = (
        scores.get(case.spec.case["goal_importance"]),
        scores.get(case.spec.case["goal_confidence"]),
    )
    status = _concept(resource.get("achievementStatus")) or str(resource.get("lifecycleStatus", ""))
    return [
        _concept(resource.get("description")),
        f"{importance}/10" if importance is not None else "",
        f"{confidence}/10" if confidence is not None else "",
        status,
    ]


def _plan_block(case: _Case) -> _Block:
    parts: list[Any] = []
    for plan in case.care_plans:
        resource = plan.resource
        review = [
            e.get("valueDate")
            for e in _list(resource.get("extension"))
            if isinstance(e, dict) and e.get("url") == case.spec.case["review_date"]
        ]
        parts.append(
            _facts(
                [
                    ("What matters to the person", str(resource.get("description", ""))),
                    ("Plan agreed", _day(resource.get("created") or (resource.get("period") or {}).get("start"))),
                    ("Agreed with", "; ".join(filter(None, map(case.name, _list(resource.get("contributor")))))),
                    ("Status", str(resource.get("status", ""))),
                    ("Review date", _day(review[0]) if review else ""),
                ]
            )
        )
    if case.goals:
        parts.append(
            _table(["Goal", "Importance", "Confidence", "Status"], (_goal_row(case, goal) for goal in case.goals))
        )
    if not parts:
        return [_x("p", "No personalised care and support plan is recorded.")], []
    return parts, [*case.care_plans, *case.goals]


def _activity_row(case: _Case, activity: dict[str, Any]) -> list[str]:
    detail = activity.get("detail") or {}
    when = detail.get("scheduledString") or ""
    period = detail.get("scheduledPeriod") or {}
    if not when and period:
        when = " to ".join(filter(None, (_day(period.get("start")), _day(period.get("end")))))
    return [
        str(detail.get("description") or "") or case.name(activity.get("reference")) or _concept(detail.get("code")),
        _concept(detail.get("code")),
        "; ".join(filter(None, map(case.name, _list(detail.get("performer"))))),
        str(detail.get("status", "")),
        when,
        "; ".join(filter(None, map(_concept, _list(activity.get("outcomeCodeableConcept"))))),
    ]


def _activities_block(case: _Case) -> _Block:
    plans = [plan for plan in case.care_plans if _list(plan.resource.get("activity"))]
    rows = [
        _activity_row(case, activity)
        for plan in plans
        for activity in _list(plan.resource.get("activity"))
        if isinstance(activity, dict)
    ]
    if not rows:
        return [_x("p", "No activities are recorded.")], []
    head = ["Activity", "Category", "Provider", "Status", "When", "Outcome"]
    return [_x("p", f"{len(rows)} {'activity' if len(rows) == 1 else 'activities'}."), _table(head, rows)], plans


def _contacts_block(case: _Case) -> _Block:
    if not case.encounters:
        return [_x("p", "No contacts with the link worker are recorded.")], []
    modes: dict[str, str] = case.spec.case["contact_modes"]
    rows = []
    for encounter in case.encounters:
        resource = encounter.resource
        kind = resource.get("class") or {}
        mode = modes.get(str(kind.get("code"))) or _concept(kind)
        with_whom = [case.name(p.get("individual")) for p in _list(resource.get("participant")) if isinstance(p, dict)]
        rows.append([_day((resource.get("period") or {}).get("start")), mode, "; ".join(filter(None, with_whom))])
    count = len(rows)
    first, last = rows[0][0], rows[-1][0]
    span = f" on {first}" if first == last else f", from {first} to {last}"
    summary = f"{count} {'contact' if count == 1 else 'contacts'} with the link worker{span}."
    return [_x("p", summary), _table(["Date", "Mode", "Seen by"], rows)], case.encounters


def _closure_type_text(case: _Case) -> str:
    """The text of the EpisodeOfCare's case-closed type, where the sp-case mapping puts the reason."""
    wanted = case.spec.document.get("case_closed_type") or {}
    for concept in case.episode.resource.get("type") or ():
        codings = concept.get("coding") if isinstance(concept, dict) else None
        for coding in codings if isinstance(codings, list) else ():
            if (
                isinstance(coding, dict)
                and coding.get("system") == wanted.get("system")
                and coding.get("code") == wanted.get("code")
                and isinstance(concept.get("text"), str)
            ):
                return _clean(concept["text"])
    return ""


def _closure_block(case: _Case) -> _Block:
    resource = case.episode.resource
    status = str(resource.get("status", ""))
    period = resource.get("period") or {}
    if case.closed:
        text = f"The case was closed on {_day(period.get('end'))} (status: {status})."
        reasons = [
            (
                _instant(t.resource.get("lastModified") or t.resource.get("authoredOn")),
                _concept(t.resource["statusReason"]),
            )
            for t in case.tasks
            if isinstance(t.resource.get("statusReason"), dict)
        ]
        reasons.sort(key=lambda pair: (pair[0] or datetime.min.replace(tzinfo=UTC), pair[1]))
        reason = reasons[-1][1] if reasons else _closure_type_text(case)
        rows = [("Reason for closure", reason or "not recorded")]
    else:
        since = _day(period.get("start"))
        text = f"The case is open (status: {status}){f' since {since}' if since else ''}; it has not been closed."
        rows = []
    rows.append(("Link worker", case.name(resource.get("careManager"))))
    rows.append(("Service", case.name(resource.get("managingOrganization"))))
    return [_x("p", text), _facts(rows)], [case.episode]


def _outcomes_block(case: _Case) -> _Block:
    series = _series(case.spec, case.observations)
    if not series:
        return [_x("p", "No outcome measures are recorded.")], []
    rows = []
    for one in series:
        measure, first, last = one.measure, one.first, one.last
        name = f"{measure.name} ({measure.low}-{measure.high})"
        if last is None:
            rows.append([name, f"{first.value} ({_day(first.when)})", "-", "no follow-up score"])
            continue
        change = last.value - first.value
        better = change > 0 if measure.better == "higher" else change < 0
        verdict = "no change" if change == 0 else "improved" if better else "worse"
        rows.append(
            [
                name,
                f"{first.value} ({_day(first.when)})",
                f"{last.value} ({_day(last.when)})",
                f"{_signed(change)} ({verdict})",
            ]
        )
    intro = _x("p", "First and last score of each measure; the change is the last score minus the first.")
    return [intro, _table(["Measure", "First score", "Last score", "Change"], rows)], case.observations


_BLOCKS: dict[str, tuple[str, Callable[[_Case], _Block]]] = {
    "referral": ("Referral", _referral_block),
    "plan": ("Personalised care and support plan", _plan_block),
    "activities": ("Activities", _activities_block),
    "contacts": ("Contacts", _contacts_block),
    "closure": ("Case closure", _closure_block),
    "outcomes": ("Outcomes", _outcomes_block),
}


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------


class _Ids:
    """The document id of each included resource: its own id when that is a UUID (the store's
    deterministic ids), else uuid5 of its business identifier, else of its ``Type/id``."""

    def __init__(self) -> None:
        self._ids: dict[int, str] = {}
        self._taken: set[str] = set()

    def __call__(self, entry: _Entry) -> str:
        found = self._ids.get(id(entry))
        if found is not None:
            return found
        own = entry.resource.get("id")
        candidates = []
        if isinstance(own, str) and _UUID.fullmatch(own):
            candidates.append(own)
        if entry.full_url and _UUID.fullmatch(entry.full_url.removeprefix("urn:uuid:")):
            candidates.append(entry.full_url.removeprefix("urn:uuid:"))
        for i in _list(entry.resource.get("identifier")):
            if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str):
                candidates.append(deterministic_id(entry.type, identity(i["system"], i["value"])))
                break
        candidates.append(deterministic_id(entry.type, entry.label))
        # Two entries with one label (the same fullUrl and no id) still get ids of their own.
        spare = (deterministic_id(entry.type, f"{entry.label}#{n}") for n in count(1))
        chosen = next(c for c in chain(candidates, spare) if c not in self._taken)
        self._taken.add(chosen)
        self._ids[id(entry)] = chosen
        return chosen


def _rewrite(value: Any, index: _Index, urls: dict[int, str]) -> Any:
    """A copy of ``value`` whose references to included resources are their ``urn:uuid`` fullUrls
    (https://hl7.org/fhir/R4/bundle.html#references: a document resolves references inside itself)."""
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            if key == "reference" and isinstance(child, str):
                found = index.resolve(child)
                out[key] = urls.get(id(found), child) if found is not None else child
            else:
                out[key] = _rewrite(child, index, urls)
        return out
    if isinstance(value, list):
        return [_rewrite(child, index, urls) for child in value]
    return copy.copy(value)


def _document_date(case: _Case, included: Iterable[_Entry]) -> str:
    dates: dict[str, list[str]] = case.spec.document["dates"]
    found = [
        (moment, str(text))
        for entry in included
        for path in dates.get(entry.type, ())
        for text in _at(entry.resource, path)
        if (moment := _instant(text)) is not None
    ]
    if not found:
        raise MappingError("the case has no date to date the document by", field="EpisodeOfCare.period")
    return _as_instant(max(found)[1])


def _section(case: _Case, section: _Section, ids: _Ids) -> tuple[dict[str, Any], list[_Entry]]:
    parts: list[Any] = []
    entries: list[_Entry] = []
    for block in section.blocks:
        title, make = _BLOCKS[block]
        elements, about = make(case)
        if len(section.blocks) > 1:
            parts.append(_x("h3", title))
        parts += elements
        entries += about
    entries = list(dict.fromkeys(entries))
    coding = [{"system": section.system, "code": section.code, "display": section.display}]
    if section.heading:
        coding.append(section.heading)
    out: dict[str, Any] = {
        "title": section.display,
        "code": {"coding": coding},
        "text": {"status": "generated", "div": etree.tostring(_x("div", *parts), encoding="unicode")},
    }
    if entries:
        out["entry"] = [{"reference": f"urn:uuid:{ids(entry)}"} for entry in entries]
    else:
        out["emptyReason"] = {"coding": [case.spec.empty_reason]}
    return out, entries


def _reference(case: _Case, entry: _Entry, ids: _Ids) -> dict[str, Any]:
    reference = {"reference": f"urn:uuid:{ids(entry)}"}
    name = case.named(entry)
    return {**reference, "display": name} if name else reference


def build(record: dict[str, Any]) -> Mapped:
    """The message back to the GP and referrer for the case in ``record`` (a collection or searchset
    Bundle holding exactly one EpisodeOfCare), as one document Bundle (SP-MessageBackToGP).

    ``unused`` names (``Type/id``) the input resources that are not in the document.
    """
    spec = _spec()
    case = _case(spec, record)
    ids = _Ids()
    defaults: list[str] = []
    episode = case.episode.resource
    author = case.index.resolve(episode.get("careManager"))
    custodian = case.index.resolve(episode.get("managingOrganization"))
    if author is None:
        author = custodian
        defaults.append("Composition.author=EpisodeOfCare.managingOrganization")
    if author is None:
        raise MappingError(
            f"{case.episode.label}: neither its careManager nor its managingOrganization is in the Bundle",
            field="EpisodeOfCare.careManager",
        )

    sections = []
    included: list[_Entry] = [case.patient, author, *([custodian] if custodian else [])]
    for section in spec.sections:
        body, entries = _section(case, section, ids)
        sections.append(body)
        included += entries
    # Everything the included resources refer to that the case holds goes in too, so that every
    # reference resolves inside the document (https://hl7.org/fhir/R4/documents.html#content).
    included = list(dict.fromkeys(included))
    seen = {id(entry) for entry in included}
    position = 0
    while position < len(included):
        for found in case.index.references(included[position].resource):
            if id(found) not in seen:
                seen.add(id(found))
                included.append(found)
        position += 1

    system = spec.document["identifier_system"]
    timestamp = _document_date(case, included)
    # One document per state of the case: mapping the same case again gives the same document,
    # while a later one (an interim, then the final letter) is a new document with its own
    # identifier, as https://hl7.org/fhir/R4/documents.html#content asks.
    version = f"{case.episode_identity}&date={timestamp}&closed={case.closed}"
    bundle_id = deterministic_id("Bundle", version)
    composition_id = deterministic_id("Composition", version)
    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "id": composition_id,
        "meta": {"profile": [spec.document["composition_profile"]]},
        "identifier": {"system": system, "value": f"urn:uuid:{composition_id}"},
        "status": "final" if case.closed else "preliminary",
        "type": {"coding": [spec.type_coding]},
        "subject": _reference(case, case.patient, ids),
        "date": timestamp,
        "author": [_reference(case, author, ids)],
        "title": spec.document["title"],
    }
    if custodian is not None:
        composition["custodian"] = _reference(case, custodian, ids)
    composition["section"] = sections

    urls = {id(entry): f"urn:uuid:{ids(entry)}" for entry in included}
    document_entries = [{"fullUrl": f"urn:uuid:{composition_id}", "resource": composition}]
    for entry in included:
        resource = _rewrite(entry.resource, case.index, urls)
        resource["id"] = ids(entry)
        document_entries.append({"fullUrl": urls[id(entry)], "resource": resource})
    bundle = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [spec.document["bundle_profile"]]},
        "identifier": {"system": system, "value": f"urn:uuid:{bundle_id}"},
        "type": "document",
        "timestamp": timestamp,
        "entry": document_entries,
    }
    unused = [entry.label for entry in case.index.entries if id(entry) not in seen]
    return Mapped(
        resources=[MappedResource(bundle, if_none_exist=identity(system, f"urn:uuid:{bundle_id}"))],
        unused=unused,
        defaults=defaults,
    )


# --------------------------------------------------------------------------------------------
# Reading a document back: the HTML page, and the outcome rows
# --------------------------------------------------------------------------------------------


def _composition(document: dict[str, Any]) -> tuple[_Index, dict[str, Any]]:
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        raise MappingError("not a Bundle", field="resourceType")
    index = _Index(document)
    if not index.entries or index.entries[0].type != "Composition":
        raise MappingError("not a FHIR document: the first entry is not a Composition", field="entry")
    return index, index.entries[0].resource


def _nhs_number(spec: _Spec, patient: dict[str, Any] | None) -> str:
    for identifier in _list((patient or {}).get("identifier")):
        if isinstance(identifier, dict) and identifier.get("system") == spec.case["nhs_number_system"]:
            return str(identifier.get("value", ""))
    return ""


def _spaced(nhs_number: str) -> str:
    """``9990000018`` -> ``999 000 0018``, as NHS numbers are shown to people."""
    return f"{nhs_number[:3]} {nhs_number[3:6]} {nhs_number[6:]}" if re.fullmatch(r"\d{10}", nhs_number) else nhs_number


def flatten(document: dict[str, Any]) -> list[dict[str, str]]:
    """One row per outcome measure of a message-back document (ONS4: one per answer), for reporting:
    ``nhs_number, episode_identifier, tool, first_date, first_score, last_date, last_score, change``.
    Without a follow-up score, ``last_date``, ``last_score`` and ``change`` are empty."""
    spec = _spec()
    index, composition = _composition(document)
    patient = index.resolve(composition.get("subject"))
    nhs_number = _nhs_number(spec, patient.resource if patient else None)
    episodes = index.of_type("EpisodeOfCare")
    episode_identifier = ""
    for identifier in _list(episodes[0].resource.get("identifier")) if episodes else ():
        if isinstance(identifier, dict) and identifier.get("value"):
            episode_identifier = str(identifier["value"])
            break
    observations = [entry for entry in index.entries if _is_outcome(spec, entry)]
    rows = []
    for series in _series(spec, observations):
        first, last = series.first, series.last
        rows.append(
            {
                "nhs_number": nhs_number,
                "episode_identifier": episode_identifier,
                "tool": series.measure.key,
                "first_date": first.when,
                "first_score": str(first.value),
                "last_date": last.when if last else "",
                "last_score": str(last.value) if last else "",
                "change": _signed(last.value - first.value) if last else "",
            }
        )
    return rows


_PAGE_STYLE = """
body { font-family: Arial, Helvetica, sans-serif; color: #212b32; margin: 0; line-height: 1.4; }
header.banner { background: #005eb8; color: #fff; padding: 12px 24px; }
header.banner h1 { margin: 0 0 4px; font-size: 1.5em; }
header.banner dl { margin: 0; display: flex; flex-wrap: wrap; gap: 4px 24px; }
header.banner dt { font-weight: bold; } header.banner dd { margin: 0 0 0 6px; }
main { padding: 12px 24px; max-width: 60em; }
section { border-top: 1px solid #d8dde0; margin-top: 16px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d8dde0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f4f5; }
p.about { color: #4c6272; }
"""
# Elements and attributes of a narrative that the page keeps; the rest is unwrapped to its text.
# No links or images: the page loads nothing (https://hl7.org/fhir/R4/narrative.html#xhtml).
_PAGE_TAGS = frozenset(
    {
        *("abbr", "acronym", "address", "b", "bdo", "big", "blockquote", "br", "caption", "cite", "code"),
        *("col", "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6"),
        *("hr", "i", "ins", "kbd", "li", "ol", "p", "pre", "q", "s", "samp", "small", "span", "strike"),
        *("strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul", "var"),
    }
)
_PAGE_ATTRIBUTES = frozenset({"colspan", "rowspan", "scope", "abbr", "title", "lang"})
_DROPPED = frozenset({"script", "style"})
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _append_text(target: Any, text: str | None) -> None:
    if not text:
        return
    if len(target):
        target[-1].tail = (target[-1].tail or "") + text
    else:
        target.text = (target.text or "") + text


def _copy_narrative(target: Any, source: Any) -> None:
    """Copy an XHTML narrative into the page, keeping only plain formatting (``_PAGE_TAGS``)."""
    _append_text(target, source.text)
    for child in source:
        if isinstance(child.tag, str):
            qname = etree.QName(child)
            name = qname.localname.lower() if qname.namespace == _XHTML else ""
            if name in _PAGE_TAGS:
                kept = {k: v for k, v in child.attrib.items() if k in _PAGE_ATTRIBUTES}
                _copy_narrative(etree.SubElement(target, name, kept), child)
            elif name not in _DROPPED:
                _copy_narrative(target, child)
        _append_text(target, child.tail)


def _narrative(section: dict[str, Any]) -> Any:
    div = etree.Element("div", {"class": "narrative"})
    text = (section.get("text") or {}).get("div")
    if not isinstance(text, str):
        div.text = "(no narrative)"
        return div
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        div.text = _clean(text)
        return div
    try:
        source = etree.fromstring(text.encode("utf-8"), _XML_PARSER)
    except etree.XMLSyntaxError:
        div.text = _clean(text)  # shown as text, escaped: never as markup
        return div
    _copy_narrative(div, source)
    return div


def render_html(document: dict[str, Any]) -> str:
    """A standalone HTML5 page of a message-back document (any SP-MessageBackToGP Bundle): a patient
    banner (name, NHS number, date of birth, GP practice), then each section's title and narrative,
    the author and the date. All text is escaped; the page loads nothing (a Content-Security-Policy
    of ``default-src 'none'`` and inline CSS)."""
    spec = _spec()
    index, composition = _composition(document)
    patient_entry = index.resolve(composition.get("subject"))
    patient = patient_entry.resource if patient_entry else {}
    name = _human_name(patient) or str((composition.get("subject") or {}).get("display", "")) or "Unknown person"
    title = str(composition.get("title") or "Social prescribing: message back to GP and referrer")

    def named(reference: Any) -> str:
        return _clean(_name(index, reference))

    facts: list[Any] = []
    for label, value in (
        ("NHS number", _spaced(_nhs_number(spec, patient))),
        ("Date of birth", _day(patient.get("birthDate"))),
        ("Gender", str(patient.get("gender") or "")),
        ("GP practice", "; ".join(filter(None, map(named, _list(patient.get("generalPractitioner")))))),
    ):
        if value:
            facts += [etree.Element("dt"), etree.Element("dd")]
            facts[-2].text, facts[-1].text = label, _clean(value)
    authors = "; ".join(filter(None, map(named, _list(composition.get("author")))))
    status = str(composition.get("status") or "")

    root = etree.Element("html", lang="en-GB")
    head = etree.SubElement(root, "head")
    etree.SubElement(head, "meta", charset="utf-8")
    etree.SubElement(
        head,
        "meta",
        {"http-equiv": "Content-Security-Policy", "content": "default-src 'none'; style-src 'unsafe-inline'"},
    )
    etree.SubElement(head, "meta", name="viewport", content="width=device-width, initial-scale=1")
    etree.SubElement(head, "title").text = _clean(f"{title}: {name}")
    etree.SubElement(head, "style").text = _PAGE_STYLE
    body = etree.SubElement(root, "body")
    banner = etree.SubElement(body, "header", {"class": "banner"})
    etree.SubElement(banner, "h1").text = _clean(name)
    etree.SubElement(banner, "dl").extend(facts)
    main = etree.SubElement(body, "main")
    etree.SubElement(main, "h1").text = _clean(title)
    about = etree.SubElement(main, "p", {"class": "about"})
    about.text = _clean(
        "; ".join(
            filter(
                None,
                (
                    f"From {authors}" if authors else "",
                    f"dated {_day(composition.get('date'))}" if composition.get("date") else "",
                    f"status {status}" if status else "",
                ),
            )
        )
        + "."
    )
    for section in _list(composition.get("section")):
        if not isinstance(section, dict):
            continue
        part = etree.SubElement(main, "section")
        etree.SubElement(part, "h2").text = _clean(section.get("title") or _concept(section.get("code")) or "Section")
        part.append(_narrative(section))
    footer = etree.SubElement(main, "p", {"class": "about"})
    identifier = (document.get("identifier") or {}).get("value") or document.get("id") or ""
    footer.text = _clean(f"Document {identifier}, {document.get('timestamp', '')}.")
    html: str = etree.tostring(root, method="html", encoding="unicode", doctype="<!DOCTYPE html>")
    return html + "\n"
