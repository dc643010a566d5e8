"""sekmet-fhir, the FHIR R4 server ``bench/api.py`` compares against: install and start it.

sekmet-fhir (PyPI) is a "micro hospital information system" for testing FHIR integrations; its FHIR
server is a FastAPI app on one SQLite file (one connection shared by all requests behind a lock,
WAL journal), run by uvicorn in one process (``sekmet serve``), with inbound structural validation of
every write through the fhir.resources R4B models. Its FHIR base is ``http://HOST:PORT/fhir``.

It lives in its own virtualenv, ``.cache/sekmet-venv`` (git-ignored), made on first use with the
pinned :data:`VERSION`, so its dependencies never mix with ours.

How it is configured for the benchmark (``settings.yaml``, written by :func:`write_config`):

- ``host``/``port``/``base_url``: 127.0.0.1 on the port we chose (``base_url`` is what it puts in
  Location headers, so it must match);
- ``db_path``/``data_dir``: a fresh SQLite file in the run's temp dir;
- ``simulator.enabled: false``: otherwise each ServiceRequest written starts its lab/RIS simulator,
  which writes Tasks and results two seconds later, load that is not part of a FHIR server;
- ``log_inbound: false``: otherwise every request and response body is also written to a traffic
  table in the same database (its own load-test runner switches this off as well).

Everything else is its default: ``validation.inbound: strict`` (writes are validated, as ours are),
no authentication, uvicorn's access log at INFO (as ours).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The sekmet-fhir release measured (the newest on PyPI when bench/api.py was written).
VERSION = "0.1.1"

#: Its own virtualenv; ``.cache/`` is git-ignored.
VENV = ROOT / ".cache" / "sekmet-venv"

#: Where its FHIR API is mounted.
BASE_PATH = "/fhir"


def _python() -> Path:
    return VENV / "bin" / "python"


def installed_version() -> str | None:
    """The sekmet-fhir version in :data:`VENV`, or None when there is no usable install."""
    if not _python().exists():
        return None
    probe = subprocess.run(
        [str(_python()), "-c", "import importlib.metadata as m; print(m.version('sekmet-fhir'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_installed() -> str:
    """Create :data:`VENV` with sekmet-fhir == :data:`VERSION` unless it is already there; the version.

    Raises ``RuntimeError`` (with pip's last lines) when the install fails.
    """
    if installed_version() == VERSION:
        return VERSION
    print(f"installing sekmet-fhir=={VERSION} into {VENV} ...", file=sys.stderr, flush=True)
    if not _python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = subprocess.run(
        [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q", f"sekmet-fhir=={VERSION}"],
        capture_output=True,
        text=True,
        check=False,
    )
    version = installed_version()
    if pip.returncode != 0 or version != VERSION:
        raise RuntimeError(f"pip install sekmet-fhir=={VERSION} failed: {(pip.stderr or pip.stdout).strip()[-800:]}")
    return version


def fast_http_stack() -> bool:
    """Whether its venv has uvloop and httptools (uvicorn then uses them instead of asyncio and h11)."""
    probe = subprocess.run([str(_python()), "-c", "import uvloop, httptools"], capture_output=True, check=False)
    return probe.returncode == 0


def write_config(folder: Path, port: int) -> Path:
    """Write the benchmark's ``settings.yaml`` into ``folder`` (see the module docstring)."""
    config = folder / "settings.yaml"
    config.write_text(
        "\n".join(
            [
                f"base_url: http://127.0.0.1:{port}{BASE_PATH}",
                "host: 127.0.0.1",
                f"port: {port}",
                f"data_dir: {folder / 'data'}",
                f"db_path: {folder / 'data' / 'sekmet.db'}",
                "log_inbound: false",
                "simulator:",
                "  enabled: false",
                "",
            ]
        )
    )
    return config


def command(config: Path) -> list[str]:
    """The command that serves sekmet-fhir with ``config`` (run it with the config's folder as cwd)."""
    return [str(VENV / "bin" / "sekmet"), "serve", "--config", str(config)]
