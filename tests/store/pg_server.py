"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a temp dir, ``pg_ctl start`` on a free
port of 127.0.0.1, ``stop`` and remove at the end.

The binaries come from PATH or ``/usr/lib/postgresql/<version>/bin`` (Debian's layout; run
``scripts/install-postgres`` to get them). PostgreSQL refuses to run as root, so as root the server
runs as the ``postgres`` OS user (``runuser``) with a data dir it owns. :func:`start` raises
:class:`Unavailable` with the reason when there is no way to start a server; the tests then skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"


class Unavailable(Exception):
    """No PostgreSQL server could be started here; the message says why."""


def find_bin_dir() -> Path | None:
    """The folder holding both ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian version."""
    on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if on_path[0] and on_path[1]:
        folder = Path(on_path[0]).resolve().parent
        if (folder / "pg_ctl").exists():
            return folder
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    for folder in candidates:
        if os.access(f"{folder}/initdb", os.X_OK) and os.access(f"{folder}/pg_ctl", os.X_OK):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    bin_dir: Path
    root: Path
    port: int
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname} connect_timeout=10"

    def pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        """Stop the server (fast: rolls back open transactions) and remove its files; never raises."""
        with contextlib.suppress(Exception):
            running = self.pg_ctl("status", timeout=10).returncode == 0
            if running and self.pg_ctl("stop", "-m", "fast", "-w", "-t", "30").returncode != 0:
                self.pg_ctl("stop", "-m", "immediate", "-w", "-t", "30")
        shutil.rmtree(self.root, ignore_errors=True)


def start(*, durable: bool = False) -> Server:
    """Start a fresh cluster; raises :class:`Unavailable` when that is not possible here.

    Tests run without fsync (a throwaway cluster need not survive a crash). ``durable`` keeps
    PostgreSQL's defaults instead (fsync, full-page writes, a WAL flush at every commit), as a
    production server runs: what benchmarks measure."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise Unavailable("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin (run scripts/install-postgres)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="spfhir-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root, ignore_errors=True)
            raise Unavailable("running as root without runuser: cannot run PostgreSQL as another user")
        try:
            shutil.chown(root, user=SUPERUSER, group=None)
        except (LookupError, OSError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise Unavailable(f"running as root and no usable {SUPERUSER!r} OS user: {exc}") from exc
        as_user = [runuser, "-u", SUPERUSER, "--"]
    server = Server(bin_dir, root, free_port(), as_user)
    try:
        initdb = subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(server.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if initdb.returncode != 0:
            raise Unavailable(f"initdb failed: {(initdb.stderr or initdb.stdout).strip()[-500:]}")
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={server.port}",
                f"-c unix_socket_directories={server.root}",
                *([] if durable else ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]),
                "-c max_connections=50",
            ]
        )
        started = server.pg_ctl("start", "-w", "-t", "60", "-l", str(root / "server.log"), "-o", options, timeout=90)
        if started.returncode != 0:
            log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
            raise Unavailable(f"pg_ctl start failed: {(started.stderr + log).strip()[-500:]}")
    except Unavailable:
        server.stop()
        raise
    except (OSError, subprocess.SubprocessError) as exc:
        server.stop()
        raise Unavailable(f"could not start PostgreSQL: {exc}") from exc
    return server
