"""The packages that ship with the adapter: our profiles (``profiles/``) and the packages they depend on
(``profiles/vendor/*.tgz``, UK Core).

In a source checkout (or an editable install) they are read from the repository; an installed wheel
carries them under ``adapter/_data/profiles`` (``pyproject.toml``, hatch ``force-include``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from adapter.validation.packages import PackageSet

__all__ = ["bundled_packages", "profiles_dir"]


def profiles_dir() -> Path:
    """Where the project's profile package source is."""
    installed = Path(__file__).resolve().parent.parent / "_data" / "profiles"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "profiles"


@cache
def _bundled() -> PackageSet:
    packages = PackageSet()
    root = profiles_dir()
    for vendored in sorted((root / "vendor").glob("*.tgz")):
        packages.add_path(vendored)
    if (root / "package.json").exists():
        packages.add_path(root)
    return packages


def bundled_packages() -> PackageSet:
    """A new package set holding the bundled packages (loaded once; callers may add more)."""
    return PackageSet(_bundled().packages.values())
