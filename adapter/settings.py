"""Settings of the adapter: one pydantic-settings model read from ``SPFHIR_*`` environment variables.

This is the only module that reads the environment for configuration (architecture: settings.py).

    SPFHIR_DATABASE        sqlite:///PATH (default sqlite:///./spfhir.db), sqlite://:memory:,
                           or postgresql://USER:PASSWORD@HOST:PORT/DB
    SPFHIR_HOST            address to listen on (default 127.0.0.1)
    SPFHIR_PORT            port (default 8080)
    SPFHIR_WORKERS         server processes (default 1)
    SPFHIR_MAX_BODY_BYTES  largest accepted request body (default 10 MB)
    SPFHIR_DEMO            load the synthetic demo data set at start-up (default false)
    SPFHIR_POSTGRES_READERS  pooled PostgreSQL connections per worker for reads and searches (default 4)
    SPFHIR_INGEST_PROCESSES  processes, per server process, that map and validate the records of a large
                           $ingest while the server stores them (default 1; 0: map in the server process)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from adapter.store import ResourceStore

__all__ = ["DatabaseURLError", "Settings", "open_store", "sqlite_path"]

SQLITE_PREFIX = "sqlite://"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
MEMORY = ":memory:"


class DatabaseURLError(ValueError):
    """A database URL the adapter cannot use; the message is one line, meant for a user."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPFHIR_", extra="ignore")

    database: str = "sqlite:///./spfhir.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=10_000_000, ge=1)
    demo: bool = False
    #: One log line per request (uvicorn's access log); off by default: it costs about 4% of
    #: throughput (docs/benchmarks.md) and a proxy in front usually logs requests anyway.
    access_log: bool = False
    #: SQLite durability: NORMAL (default; survives a killed process) or FULL (also a power cut).
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    #: PostgreSQL: pooled connections per worker for reads and one-page searches (writes have their own).
    postgres_readers: int = Field(default=4, ge=1)
    #: Processes (per server process, started on the first large request) that map and validate the
    #: records of an ``$ingest`` of 128 records or more while the server stores them; 0: none.
    ingest_processes: int = Field(default=1, ge=0)
    #: How writes treat the profiles a resource declares in meta.profile: enforce (422), warn (log), off.
    profiles: Literal["enforce", "warn", "off"] = "enforce"
    #: Profiles a resource of a type is checked against when it declares none, as JSON:
    #: ``{"Patient": ["https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Patient"]}``.
    default_profiles: dict[str, list[str]] = Field(default_factory=dict)
    #: NPM-style FHIR package registry for `spfhir packages install NAME#VERSION`.
    package_registry: str = "https://packages.fhir.org"
    #: OAuth2 client credentials for the terminology server (``spfhir validate --tx``), if it needs them.
    tx_token_url: str | None = None
    tx_client_id: str | None = None
    tx_client_secret: str | None = None

    @field_validator("database")
    @classmethod
    def _check_database(cls, value: str) -> str:
        check_database_url(value)
        return value


def sqlite_path(database: str) -> str | None:
    """The file (or ``:memory:``) of a ``sqlite://`` URL; None for any other URL."""
    if not database.startswith(SQLITE_PREFIX):
        return None
    rest = database[len(SQLITE_PREFIX) :]
    if rest == MEMORY:
        return MEMORY
    if rest.startswith("/") and len(rest) > 1:
        return rest[1:]  # sqlite:///relative/path -> relative/path; sqlite:////abs -> /abs
    raise DatabaseURLError(f"bad SQLite URL {database!r}: use sqlite:///PATH or sqlite://:memory:")


def check_database_url(database: str) -> None:
    """Raise :class:`DatabaseURLError` unless ``database`` is a URL :func:`open_store` accepts."""
    if sqlite_path(database) is not None:
        return
    if database.startswith(POSTGRES_PREFIXES) and len(database) > database.index("://") + 3:
        return
    raise DatabaseURLError(
        f"unsupported database URL {database!r}: use sqlite:///PATH, sqlite://:memory: or postgresql://..."
    )


def open_store(
    database: str, *, sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL", postgres_readers: int = 4
) -> ResourceStore:
    """The store for ``database``: :class:`SQLiteStore` for ``sqlite://``, :class:`PostgresStore` for
    ``postgresql://`` (connects on first use). Raises :class:`DatabaseURLError` for anything else."""
    check_database_url(database)
    path = sqlite_path(database)
    if path is not None:
        import sqlite3

        from adapter.store.sqlite import SQLiteStore

        try:
            return SQLiteStore(path, synchronous=sqlite_synchronous)
        except sqlite3.Error as exc:
            raise DatabaseURLError(f"cannot open SQLite database {path!r}: {exc}") from exc
    from adapter.store.postgres import PostgresStore

    return PostgresStore(database, readers=postgres_readers)
