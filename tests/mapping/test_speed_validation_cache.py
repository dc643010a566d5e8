"""The mapper checks a resource once for all records that give it identically (issue #5): also one with
references, when the resources it refers to are the same too; never when they differ."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from adapter.mapping.engine import MappedRecord, Mapper
from adapter.mapping.sources import RawRecord
from adapter.mapping.spec import load
from adapter.validation.base import Issue
from adapter.validation.bundled import bundled_packages
from adapter.validation.profiles import ProfileValidator
from bench.api import nhs_numbers
from bench.map import case

SPEC = load("sp-case")


class _Counting(ProfileValidator):
    """The bundled profiles, counting what is checked; a link worker's role at a service named
    "Closed" is refused (an answer that depends on the Organization it refers to, not on the role)."""

    def __init__(self) -> None:
        super().__init__(bundled_packages())
        self.checked: Counter[str] = Counter()

    def validate(
        self,
        resource: Any,
        profiles: Sequence[str] = (),
        *,
        resolve: Callable[[str], dict[str, Any] | None] | None = None,
        conformance: dict[tuple[int, str], bool] | None = None,
    ) -> list[Issue]:
        self.checked[resource["resourceType"]] += 1
        issues = super().validate(resource, profiles, resolve=resolve, conformance=conformance)
        if resource["resourceType"] == "PractitionerRole" and resolve is not None:
            service = resolve(resource["organization"]["reference"]) or {}
            if service.get("name") == "Closed":
                issues.append(Issue("error", "business-rule", "the service is closed", "PractitionerRole.organization"))
        return issues


def _cases(service_names: list[str]) -> list[dict[str, Any]]:
    """Cases of different people with one link worker at one service, named as given."""
    numbers = itertools.islice(nhs_numbers(), len(service_names))
    records = [case(index, number) for index, number in enumerate(numbers)]
    for record, name in zip(records, service_names, strict=True):
        record["link_worker"] = {"id": "LW-01", "name": "Link Worker 1"}
        record["service_name"] = name
    return records


def _map(mapper: Mapper, records: list[dict[str, Any]]) -> list[MappedRecord]:
    return [mapper.map(RawRecord(number, record)) for number, record in enumerate(records, 1)]


def test_a_resource_whose_targets_repeat_too_is_checked_once_with_the_same_result() -> None:
    records = _cases(["Hub"] * 4)
    validator = _Counting()
    results = _map(Mapper(SPEC, validator), records)
    # The role's targets (the link worker, the service) are new in the first record, known from
    # the second; the role itself is checked then, and taken as checked from the third.
    assert validator.checked["PractitionerRole"] == 2
    assert validator.checked["Practitioner"] == validator.checked["Organization"] == 1
    assert validator.checked["Patient"] == validator.checked["CareTeam"] == 4  # a new person each time
    # What each record gives is what a mapper that has seen no other record gives.
    for result, record in zip(results, records, strict=True):
        [alone] = _map(Mapper(SPEC, _Counting()), [record])
        assert result.error is None
        assert [item.resource for item in result.resources] == [item.resource for item in alone.resources]


def test_a_resource_is_checked_again_when_a_resource_it_refers_to_differs() -> None:
    # The role is the same JSON whatever the service's name (it names no service); the service
    # (same identity, so the same id) differs, and with it the answer for the role.
    validator = _Counting()
    results = _map(Mapper(SPEC, validator), _cases(["Hub", "Hub", "Closed", "Closed"]))
    assert [result.error is None for result in results] == [True, True, False, False]
    error = results[3].error
    assert error is not None and "the service is closed" in error.message
