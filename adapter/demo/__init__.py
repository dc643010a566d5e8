"""A small synthetic social prescribing data set for demonstrations (``spfhir serve --demo``).

Everything is made up: NHS numbers are in the 999 test range (with a valid Modulus 11 check digit),
ODS codes are synthetic (Y9000n). The resources live as JSON files in ``adapter/demo/data`` and
are loaded with fixed ids, so loading twice changes nothing: a resource whose stored content is
already the same is skipped, anything else is written with ``update``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any

from nhs_number.validate import is_valid

from adapter.fhir.json_format import loads
from adapter.store.base import Gone, NotFound, Resource, ResourceStore

__all__ = ["LoadSummary", "demo_resources", "load_demo", "nhs_number_valid"]


def demo_resources() -> list[Resource]:
    """Every demo resource, in file-name order (parsed afresh on each call)."""
    folder = importlib_resources.files(__package__).joinpath("data")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return [loads(f.read_bytes()) for f in files]


@dataclass(frozen=True, slots=True)
class LoadSummary:
    written: int
    unchanged: int


def _content(resource: Resource) -> dict[str, Any]:
    """The resource without what the store owns (``meta.versionId``, ``meta.lastUpdated``)."""
    content = dict(resource)
    meta = content.pop("meta", None)
    if isinstance(meta, dict):
        rest = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if rest:
            content["meta"] = rest
    return content


async def load_demo(store: ResourceStore) -> LoadSummary:
    """Write the demo data set into ``store``; resources already stored with the same content are skipped."""
    written = unchanged = 0
    for resource in demo_resources():
        try:
            current = await store.read(resource["resourceType"], resource["id"])
        except (NotFound, Gone):
            current = None
        if current is not None and _content(current) == _content(resource):
            unchanged += 1
            continue
        await store.update(resource)
        written += 1
    return LoadSummary(written, unchanged)


def nhs_number_valid(number: str) -> bool:
    """Ten digits, as written, with a valid Modulus 11 check digit (the ``nhs-number`` library,
    https://www.datadictionary.nhs.uk/attributes/nhs_number.html)."""
    return len(number) == 10 and number.isdigit() and is_valid(number)
