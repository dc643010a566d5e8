"""Database upkeep off the write path: a daemon thread with a connection of its own runs a piece of
work shortly after each :meth:`Housekeeping.wake`, so that the writer never waits for it. SQLite
copies its WAL back into the database file there (checkpoints), PostgreSQL refreshes the planner's
statistics (ANALYZE)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Housekeeping"]

_log = logging.getLogger("adapter.store")


class Housekeeping:
    """Runs ``work(connection)`` on a daemon thread named ``name``, ``delay`` seconds after a
    :meth:`wake` (wakes that come meanwhile share the run). ``connect`` opens the thread's
    connection on the first run; a run that raises one of ``errors`` is logged, and its connection
    closed and opened again for the next run (the writer's own mechanisms remain meanwhile)."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], Any],
        work: Callable[[Any], None],
        errors: tuple[type[BaseException], ...],
        delay: float,
    ) -> None:
        self._name = name
        self._connect = connect
        self._work = work
        self._errors = errors
        self._delay = delay
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        conn: Any = None
        try:
            while True:
                self._wanted.wait()
                if self._stopping:
                    return
                self._wanted.clear()
                time.sleep(self._delay)
                try:
                    if conn is None:
                        conn = self._connect()
                    self._work(conn)
                except self._errors as exc:
                    _log.debug("%s: %s", self._name, exc)
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()
