"""Run the FHIR API with uvicorn: the app factory that reads :class:`adapter.settings.Settings`.

``spfhir serve`` puts its options into ``SPFHIR_*`` environment variables and starts uvicorn with
the import string ``adapter.serve:app_factory`` (``factory=True``), so every worker process builds
its own app and its own store from the same settings.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from adapter.api.app import create_app
from adapter.settings import Settings, open_store

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["APP_FACTORY", "ServeError", "app_factory", "build_app", "serve"]

#: The import string uvicorn is given.
APP_FACTORY = "adapter.serve:app_factory"


def build_app(settings: Settings) -> FastAPI:
    """The API over the store of ``settings.database``; the store is closed when the app shuts down,
    and the demo data set is loaded at start-up when ``settings.demo`` is set."""
    store = open_store(
        settings.database,
        sqlite_synchronous=settings.sqlite_synchronous,
        postgres_readers=settings.postgres_readers,
    )
    app = create_app(
        store,
        max_body_bytes=settings.max_body_bytes,
        profiles=settings.profiles,
        default_profiles=settings.default_profiles,
        ingest_processes=settings.ingest_processes,
    )
    # The app's own start-up and shut-down (its ingest worker processes) around ours.
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            async with inner(_app):
                if settings.demo:
                    from adapter.demo import load_demo

                    await load_demo(store)
                _settle_memory()
                yield
        finally:
            await store.close()

    app.router.lifespan_context = lifespan
    return app


def _settle_memory() -> None:
    """Load what every request needs (the R4 types, the bundled profiles), then move everything alive
    into the collector's permanent generation: the garbage collector then no longer walks the large,
    long-lived model on every full collection, which otherwise shows as latency spikes under load
    (https://docs.python.org/3/library/gc.html#gc.freeze); and collect less often
    (:mod:`adapter.memory`)."""
    from adapter.fhir import model
    from adapter.memory import collect_for_bulk_work, freeze_what_is_alive
    from adapter.validation.bundled import bundled_packages

    for type in ("Patient", "ServiceRequest", "Task", "Observation", "Bundle", "OperationOutcome"):
        model.type_model(type)
    bundled_packages()
    freeze_what_is_alive()
    collect_for_bulk_work()


def app_factory() -> FastAPI:
    """uvicorn factory: settings from the environment (``SPFHIR_*``)."""
    return build_app(Settings())


class ServeError(Exception):
    """A problem that stops ``spfhir serve`` before it serves; the message is one line."""


def _settings(overrides: dict[str, object]) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ServeError(f"{where}: {message}") from None


def _prepare_store(settings: Settings) -> None:
    """Open the store once before serving (a clear error now, not a traceback in a worker) and load
    the demo data set into it when asked. In-memory SQLite is per process: its demo data is loaded
    by the app itself at start-up."""
    import asyncio

    from adapter.settings import DatabaseURLError, sqlite_path

    async def check() -> None:
        store = open_store(
            settings.database,
            sqlite_synchronous=settings.sqlite_synchronous,
            postgres_readers=settings.postgres_readers,
        )
        try:
            if settings.demo:
                from adapter.demo import load_demo

                await load_demo(store)
            else:
                await store.history(count=1)
        finally:
            await store.close()

    try:
        if sqlite_path(settings.database) != ":memory:":
            asyncio.run(check())
    except DatabaseURLError as exc:
        raise ServeError(str(exc)) from None
    except Exception as exc:  # e.g. PostgreSQL unreachable, bad credentials
        raise ServeError(f"cannot use the database: {type(exc).__name__}: {exc}") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # that say they are TCP; with it on, each keep-alive request after the first waits ~40 ms
    # for the client's delayed ACK.
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    *,
    host: str | None = None,
    port: int | None = None,
    database: str | None = None,
    workers: int | None = None,
    demo: bool = False,
) -> int:
    """Run the API until interrupted (SIGINT/SIGTERM); options override ``SPFHIR_*`` settings.

    Raises :class:`ServeError` for a problem found before serving; returns the exit code.
    """
    import logging
    import os

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from adapter.settings import sqlite_path

    settings = _settings({"host": host, "port": port, "database": database, "workers": workers})
    if demo:
        settings.demo = True
    in_memory = sqlite_path(settings.database) == ":memory:"
    if in_memory and settings.workers > 1:
        raise ServeError("sqlite://:memory: is private to one process: use --workers 1 or a database file")
    _prepare_store(settings)
    sock = _bind(settings.host, settings.port)
    # Every worker builds its app from these (adapter.serve:app_factory reads Settings()).
    os.environ.update(
        {
            "SPFHIR_DATABASE": settings.database,
            "SPFHIR_HOST": settings.host,
            "SPFHIR_PORT": str(settings.port),
            "SPFHIR_WORKERS": str(settings.workers),
            "SPFHIR_MAX_BODY_BYTES": str(settings.max_body_bytes),
            "SPFHIR_DEMO": "1" if settings.demo and in_memory else "0",
        }
    )
    config = uvicorn.Config(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        access_log=settings.access_log,
    )
    server = uvicorn.Server(config)
    where = f"[{settings.host}]" if ":" in settings.host else settings.host
    logging.getLogger("uvicorn.error").info(
        "spfhir serving http://%s:%d/fhir (%s, %d worker(s))",
        where,
        sock.getsockname()[1],
        settings.database,
        settings.workers,
    )
    try:
        if settings.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
            return 0
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started and settings.workers == 1:
        raise ServeError("the server did not start (see the log above)")
    return 0
