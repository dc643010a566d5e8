"""The official FHIR R4 examples (npm package ``hl7.fhir.r4.examples@4.0.1``, 5,306 resources).

Fetched once with ``npm pack`` into ``.cache/`` (the npm registry is the package's home); used by the
benchmarks and by the full-corpus tests. ``SPFHIR_R4_EXAMPLES`` may point at an unpacked copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "hl7.fhir.r4.examples@4.0.1"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "hl7.fhir.r4.examples-4.0.1"


def official_examples(fetch: bool = True) -> Path | None:
    """Folder of the official R4 example JSON files, or None when it cannot be had."""
    override = os.environ.get("SPFHIR_R4_EXAMPLES")
    if override:
        return Path(override) if Path(override).is_dir() else None
    folder = CACHE / "package"
    if (folder / "package.json").exists():
        return folder
    if not fetch or shutil.which("npm") is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    # Fetch into a private folder and rename it into place, so that concurrent test workers
    # never see a half-extracted corpus.
    work = Path(tempfile.mkdtemp(dir=CACHE))
    try:
        out = subprocess.run(
            ["npm", "pack", PACKAGE, "--silent"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        with tarfile.open(work / out.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(work, filter="data")
        with contextlib.suppress(OSError):  # another process got there first
            (work / "package").rename(folder)
    except (OSError, subprocess.SubprocessError, tarfile.TarError, IndexError):
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder if (folder / "package.json").exists() else None


def example_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.name != "package.json")


if __name__ == "__main__":
    print(official_examples())
