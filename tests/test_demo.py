"""The synthetic demo data set (adapter.demo): valid R4, idempotent loading, test-range NHS numbers."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from adapter.demo import demo_resources, load_demo, nhs_number_valid
from adapter.settings import DatabaseURLError, Settings, open_store, sqlite_path
from adapter.store import SQLiteStore
from adapter.validation.structure import StructuralValidator

NHS_NUMBER = "https://fhir.nhs.uk/Id/nhs-number"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
SCT = "http://snomed.info/sct"

RESOURCES = demo_resources()


def codes(resource: dict[str, object], element: str) -> set[str]:
    value = resource.get(element)
    concepts = value if isinstance(value, list) else [value]
    return {c["code"] for concept in concepts if isinstance(concept, dict) for c in concept.get("coding", [])}


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: f"{r['resourceType']}/{r['id']}")
def test_every_demo_resource_is_valid(resource: dict[str, object]) -> None:
    issues = StructuralValidator().validate(resource)
    assert [i for i in issues if i.is_error] == []


def test_the_data_set_has_what_the_demo_needs() -> None:
    counts = Counter(r["resourceType"] for r in RESOURCES)
    assert counts["Patient"] == 3
    gp_practices = [r for r in RESOURCES if r["resourceType"] == "Organization" and r["id"].startswith("demo-gp-")]
    assert len(gp_practices) == 2
    for required in ("HealthcareService", "Practitioner", "PractitionerRole", "ServiceRequest", "Task"):
        assert counts[required] >= 1, required
    for required in ("Encounter", "EpisodeOfCare", "CarePlan", "Goal", "Observation"):
        assert counts[required] >= 1, required
    assert len({(r["resourceType"], r["id"]) for r in RESOURCES}) == len(RESOURCES)  # fixed, unique ids

    referrals = [r for r in RESOURCES if r["resourceType"] == "ServiceRequest"]
    assert all(codes(r, "code") == {"871731000000106"} for r in referrals)
    tasks = [r for r in RESOURCES if r["resourceType"] == "Task"]
    assert {t["focus"]["reference"] for t in tasks} == {f"ServiceRequest/{r['id']}" for r in referrals}
    encounters = [r for r in RESOURCES if r["resourceType"] == "Encounter"]
    assert all(codes(e, "type") == {"1362931000000106"} for e in encounters)
    careplan = next(r for r in RESOURCES if r["resourceType"] == "CarePlan")
    assert len(careplan["activity"]) >= 2

    scores = [r for r in RESOURCES if r["resourceType"] == "Observation" and codes(r, "code") == {"718426000"}]
    assert len(scores) >= 2  # before and after
    assert all(isinstance(s["valueInteger"], int) and 14 <= s["valueInteger"] <= 70 for s in scores)
    assert all(r["code"]["coding"][0]["system"] == SCT for r in scores)


def test_references_inside_the_data_set_resolve() -> None:
    known = {f"{r['resourceType']}/{r['id']}" for r in RESOURCES}

    def references(value: object) -> list[str]:
        if isinstance(value, dict):
            found = [value["reference"]] if isinstance(value.get("reference"), str) else []
            return found + [ref for v in value.values() for ref in references(v)]
        if isinstance(value, list):
            return [ref for v in value for ref in references(v)]
        return []

    dangling = {ref for r in RESOURCES for ref in references(r)} - known
    assert dangling == set()


def test_nhs_numbers_are_in_the_test_range_and_pass_modulus_11() -> None:
    numbers = [
        i["value"]
        for r in RESOURCES
        if r["resourceType"] == "Patient"
        for i in r["identifier"]
        if i["system"] == NHS_NUMBER
    ]
    assert sorted(numbers) == ["9990000018", "9990000026", "9990000034"]
    for number in numbers:
        assert number.startswith("999"), number  # the 999 range is reserved for testing
        assert nhs_number_valid(number), number


def test_ods_codes_are_synthetic() -> None:
    ods = [i["value"] for r in RESOURCES if r["resourceType"] == "Organization" for i in r.get("identifier", [])]
    assert ods and all(code.startswith("Y9") for code in ods)
    assert all(i["system"] == ODS for r in RESOURCES if r["resourceType"] == "Organization" for i in r["identifier"])


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("9990000018", True),
        ("9990000026", True),
        ("9990000034", True),
        ("9434765919", True),  # the NHS Data Dictionary's worked example
        ("9000000008", False),  # wrong check digit
        ("9000000010", False),
        ("900000000", False),  # nine digits
        ("99900000181", False),
        ("900000000A", False),
        ("0000000060", False),  # check digit would be 10: never valid
    ],
)
def test_modulus_11(number: str, valid: bool) -> None:
    assert nhs_number_valid(number) is valid


def test_loading_twice_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with SQLiteStore(tmp_path / "demo.db") as store:
            first = await load_demo(store)
            assert (first.written, first.unchanged) == (len(RESOURCES), 0)
            second = await load_demo(store)
            assert (second.written, second.unchanged) == (0, len(RESOURCES))
            for resource in RESOURCES:
                versions = await store.history(resource["resourceType"], resource["id"])
                assert len(versions) == 1, (resource["resourceType"], resource["id"])
            assert len(await store.history()) == len(RESOURCES)

        # A fresh store on the same file (a restart): still nothing to do.
        async with SQLiteStore(tmp_path / "demo.db") as store:
            third = await load_demo(store)
            assert third.written == 0
            # A changed resource is put back to the demo content as a new version.
            patient = await store.read("Patient", "demo-patient-1")
            patient["gender"] = "other"
            await store.update(patient)
            fourth = await load_demo(store)
            assert fourth.written == 1
            assert (await store.read("Patient", "demo-patient-1"))["gender"] == "female"
            assert len(await store.history("Patient", "demo-patient-1")) == 3

    asyncio.run(scenario())


# -- settings ----------------------------------------------------------------------------------------


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE", "HOST", "PORT", "WORKERS", "MAX_BODY_BYTES", "DEMO"):
        monkeypatch.delenv(f"SPFHIR_{name}", raising=False)
    settings = Settings()
    assert settings.database == "sqlite:///./spfhir.db"
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.max_body_bytes == 10_000_000
    assert settings.demo is False
    monkeypatch.setenv("SPFHIR_PORT", "9090")
    monkeypatch.setenv("SPFHIR_DATABASE", "postgresql://u:p@db.example/fhir")
    monkeypatch.setenv("SPFHIR_DEMO", "1")
    settings = Settings()
    assert (settings.port, settings.database, settings.demo) == (9090, "postgresql://u:p@db.example/fhir", True)
    assert Settings(port=1234).port == 1234  # explicit values win over the environment


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./spfhir.db", "./spfhir.db"),
        ("sqlite:///data/x.db", "data/x.db"),
        ("sqlite:////var/lib/x.db", "/var/lib/x.db"),
        ("sqlite://:memory:", ":memory:"),
        ("postgresql://localhost/fhir", None),
    ],
)
def test_sqlite_path(url: str, path: str | None) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["mysql://x/y", "", "sqlite://", "sqlite:///", "sqlite:relative.db", "postgresql://"])
def test_bad_database_urls(url: str) -> None:
    with pytest.raises(DatabaseURLError) as info:
        open_store(url)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        Settings(database=url)


def test_open_store_chooses_the_store(tmp_path: Path) -> None:
    from adapter.store.postgres import PostgresStore

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(store, SQLiteStore)
    asyncio.run(store.close())
    assert (tmp_path / "s.db").exists()
    memory = open_store("sqlite://:memory:")
    assert isinstance(memory, SQLiteStore)
    asyncio.run(memory.close())
    postgres = open_store("postgresql://user@127.0.0.1:1/none")  # connects on first use only
    assert isinstance(postgres, PostgresStore)
    asyncio.run(postgres.close())


def test_postgres_readers_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapter.store.postgres import PostgresStore

    monkeypatch.setenv("SPFHIR_POSTGRES_READERS", "7")
    settings = Settings(database="postgresql://user@127.0.0.1:1/none")
    assert settings.postgres_readers == 7
    store = open_store(settings.database, postgres_readers=settings.postgres_readers)
    assert isinstance(store, PostgresStore) and store._reader_count == 7
    asyncio.run(store.close())
    monkeypatch.setenv("SPFHIR_POSTGRES_READERS", "0")
    with pytest.raises(ValueError):
        Settings()
