"""A database written before index version 3, whose index rows were keyed by ``(type, id)`` and
whose ``resources`` had no ``rid``, opens with every resource searchable, sortable and includable,
and its later writes replace index rows by ``rid`` (issue #5, ``adapter/store/_search_sql.py``).

The old layout is made from a current database by SQL that both SQLite and PostgreSQL accept: the
``rid`` columns dropped, the owner indexes on ``(type, id)`` again, ``index_version`` 2.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapter.search.query import parse_search
from adapter.store import ResourceStore, SQLiteStore
from adapter.store._search_sql import INDEX_TABLES

pytestmark = pytest.mark.anyio


def _old_layout(execute: Callable[[str], Any]) -> None:
    for table in INDEX_TABLES:
        execute(f"DROP INDEX {table}_owner")
        execute(f"ALTER TABLE {table} DROP COLUMN rid")
        execute(f"CREATE INDEX {table}_owner ON {table} (type, id)")
    execute("ALTER TABLE resources DROP COLUMN rid")
    execute("UPDATE store_meta SET value = '2' WHERE key = 'index_version'")


async def _write_old(store: ResourceStore) -> tuple[str, str]:
    """A Patient (its second version) and an Observation about it; their ids."""
    patient = await store.create({"resourceType": "Patient", "name": [{"family": "Zebedee"}], "gender": "female"})
    patient["name"] = [{"family": "Abbott"}]
    await store.update(patient)
    observation = await store.create(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "wellbeing"},
            "subject": {"reference": f"Patient/{patient['id']}"},
        }
    )
    return patient["id"], observation["id"]


async def _check_upgraded(store: ResourceStore, patient: str, observation: str) -> None:
    async def ids(type: str, *pairs: tuple[str, str]) -> list[str]:
        found = await store.search(parse_search(type, list(pairs)))
        return [resource["id"] for resource in found.resources + found.included]

    # The rows of the current version only, found by value, by sort and by _include.
    assert await ids("Patient", ("family", "Abbott")) == [patient]
    assert await ids("Patient", ("family", "Zebedee")) == []
    assert await ids("Observation", ("_include", "Observation:subject")) == [observation, patient]
    second = await store.create({"resourceType": "Patient", "name": [{"family": "Moss"}]})
    assert await ids("Patient", ("_sort", "family")) == [patient, second["id"]]
    # A write after the upgrade replaces the upgraded rows.
    current = await store.read("Patient", patient)
    current["name"] = [{"family": "Young"}]
    await store.update(current)
    assert await ids("Patient", ("family", "Abbott")) == []
    assert await ids("Patient", ("family", "Young")) == [patient]
    assert await ids("Patient", ("_sort", "family")) == [second["id"], patient]
    await store.delete("Observation", observation)
    assert await ids("Observation", ("status", "final")) == []


def _check_rids(fetch: Callable[[str], list[Any]], key: str) -> None:
    """Each current version's rid is the key of its history row, and every index row has a resource."""
    rows = fetch(
        f"SELECT r.rid, h.{key} FROM resources r JOIN history h"
        " ON h.type = r.type AND h.id = r.id AND h.version = r.version"
    )
    assert rows and all(rid == history_key for rid, history_key in rows)
    for table in INDEX_TABLES:
        assert fetch(f"SELECT count(*) FROM {table} s LEFT JOIN resources r ON r.rid = s.rid WHERE r.rid IS NULL") == [
            (0,)
        ]


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
async def test_a_database_of_index_version_2_is_upgraded_on_open(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    open_store: Callable[[], Any]
    connect: Callable[[], Any]
    if dialect == "sqlite":
        path = tmp_path / "old.db"
        open_store, key = (lambda: SQLiteStore(path)), "rowid"
        connect = lambda: sqlite3.connect(path, isolation_level=None)  # noqa: E731
    else:
        psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
        from adapter.store.postgres import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        open_store, key = (lambda: PostgresStore(dsn)), "seq"
        connect = lambda: psycopg.connect(dsn, autocommit=True)  # noqa: E731
    async with open_store() as store:
        patient, observation = await _write_old(store)
    with connect() as raw:
        _old_layout(raw.execute)
    async with open_store() as upgraded:
        await _check_upgraded(upgraded, patient, observation)
    with connect() as raw:
        _check_rids(lambda sql: raw.execute(sql).fetchall(), key)
        if dialect == "sqlite":
            assert [row[2] for row in raw.execute("PRAGMA index_info(sp_string_owner)")] == ["rid"]
