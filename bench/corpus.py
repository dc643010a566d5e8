"""The official FHIR R4 examples (npm package ``hl7.fhir.r4.examples@4.0.1``, 5,306 resources).

Fetched once with ``npm pack`` into ``.cache/`` (the npm registry is the package's home); used by the
benchmarks and by the full-corpus tests. ``SPFHIR_R4_EXAMPLES`` may point at an unpacked copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
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
    try:
        out = subprocess.run(
            ["npm", "pack", PACKAGE, "--silent"],
            cwd=CACHE,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    tgz = CACHE / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        tar.extractall(CACHE, filter="data")
    tgz.unlink()
    return folder if (folder / "package.json").exists() else None


def example_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.name != "package.json")


if __name__ == "__main__":
    print(official_examples())
