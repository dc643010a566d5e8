"""FHIR NPM packages: load them from ``.tgz`` files, folders and the FHIR package cache, resolve their
dependencies, and look up their conformance resources by canonical URL.

A package (https://confluence.hl7.org/display/FHIR/NPM+Package+Specification) is a ``package/``
folder with ``package.json`` (name, version, dependencies) and one JSON file per resource; examples
sit in ``package/examples/``. We keep StructureDefinitions, ValueSets and CodeSystems, indexed by
``url`` (and ``url|version``). The standard cache is ``~/.fhir/packages/<name>#<version>/package``.

``hl7.fhir.r4.core`` 4.0.1 is always present: its resource types come from the compiled model
(:mod:`adapter.fhir.model`) and a profile chain ends there; only its extension definitions,
ValueSets and CodeSystems are needed as resources, and they are loaded from the package when one is
given (``--package``, the cache) or else left out (a binding to a core ValueSet that is not enumerated
in the compiled model is then reported as not checked).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from adapter.errors import InputError
from adapter.fhir import json_format

__all__ = [
    "CORE",
    "FhirPackage",
    "PackageError",
    "PackageSet",
    "cache_dir",
    "install",
    "installed",
    "load_package",
    "pack",
]

#: The R4 core package, which every package set contains implicitly.
CORE = ("hl7.fhir.r4.core", "4.0.1")
_KEPT = frozenset({"StructureDefinition", "ValueSet", "CodeSystem"})
_SPEC = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)#(?P<version>[A-Za-z0-9._\-+]+)")


class PackageError(InputError):
    """A package that cannot be read, or whose dependencies cannot be found."""

    issue_code = "not-found"


@dataclass(slots=True)
class FhirPackage:
    name: str
    version: str
    dependencies: dict[str, str]
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}#{self.version}"


def cache_dir() -> Path:
    """The FHIR package cache (``~/.fhir/packages``) that other FHIR tools share."""
    return Path.home() / ".fhir" / "packages"


def _files_of_tgz(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".json"):
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        yield member.name, extracted.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"{path}: not a readable package archive ({exc})") from exc


def _files_of_folder(path: Path) -> Iterator[tuple[str, bytes]]:
    root = path / "package" if (path / "package" / "package.json").exists() else path
    for file in sorted(root.rglob("*.json")):
        yield "package/" + file.relative_to(root).as_posix(), file.read_bytes()


def load_package(path: Path | str) -> FhirPackage:
    """Read a package from a ``.tgz`` or a folder (with or without the ``package/`` level)."""
    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path}: no such package file or folder")
    files = _files_of_tgz(path) if path.is_file() else _files_of_folder(path)
    manifest: dict[str, Any] | None = None
    resources: dict[str, dict[str, Any]] = {}
    examples: list[tuple[str, dict[str, Any]]] = []
    for name, data in files:
        parts = name.split("/")
        if parts[0] == "package" and len(parts) > 1:
            parts = parts[1:]
        try:
            # Examples are instances (decimals kept exact); conformance resources only need values
            # compared as numbers, so the much faster orjson reads them.
            content = json_format.loads(data) if parts[0] == "examples" else orjson.loads(data)
        except (InputError, orjson.JSONDecodeError) as exc:
            raise PackageError(f"{path}: {name} is not JSON ({exc})") from exc
        if parts == ["package.json"]:
            manifest = content
        elif not isinstance(content, dict) or parts[0].startswith("."):
            continue
        elif parts[0] == "examples":
            examples.append((parts[-1], content))
        elif len(parts) == 1 and content.get("resourceType") in _KEPT and isinstance(content.get("url"), str):
            resources[content["url"]] = content
            if isinstance(content.get("version"), str):
                resources[f"{content['url']}|{content['version']}"] = content
    if manifest is None or not isinstance(manifest.get("name"), str) or not isinstance(manifest.get("version"), str):
        raise PackageError(f"{path}: no package.json with a name and a version")
    dependencies = manifest.get("dependencies") or {}
    return FhirPackage(manifest["name"], manifest["version"], dict(dependencies), resources, examples, source=str(path))


class PackageSet:
    """Loaded packages and their conformance resources; :meth:`check` finds missing dependencies."""

    def __init__(self, packages: Iterable[FhirPackage] = ()) -> None:
        self.packages: dict[str, FhirPackage] = {}
        self._by_url: dict[str, dict[str, Any]] = {}
        for package in packages:
            self.add(package)

    def add(self, package: FhirPackage) -> FhirPackage:
        self.packages[package.name] = package
        for url, resource in package.resources.items():
            self._by_url.setdefault(url, resource)
        return package

    def add_path(self, path: Path | str) -> FhirPackage:
        return self.add(load_package(path))

    def add_from_cache(self, spec: str, cache: Path | None = None) -> FhirPackage:
        """Load ``name#version`` from the package cache."""
        match = _SPEC.fullmatch(spec)
        if match is None:
            raise PackageError(f"{spec!r} is not a package name#version")
        folder = (cache or cache_dir()) / spec
        if not folder.exists():
            raise PackageError(f"package {spec} is not in the package cache {cache or cache_dir()}")
        return self.add_path(folder)

    def resolve_dependencies(self, cache: Path | None = None) -> None:
        """Load every dependency not loaded yet from the cache; :class:`PackageError` names any missing one."""
        pending = True
        while pending:
            pending = False
            for package in list(self.packages.values()):
                for name, version in package.dependencies.items():
                    if (name, version) == CORE or name in self.packages:
                        continue
                    folder = (cache or cache_dir()) / f"{name}#{version}"
                    if not folder.exists():
                        raise PackageError(
                            f"package {package.key} needs {name}#{version}, which is neither loaded nor in the"
                            f" package cache ({cache or cache_dir()}); install it with"
                            f" `spfhir packages install {name}#{version}` or pass it with --package"
                        )
                    self.add_path(folder)
                    pending = True

    def check(self) -> None:
        """:class:`PackageError` when a loaded package's dependency is not loaded (R4 core always is)."""
        for package in self.packages.values():
            for name, version in package.dependencies.items():
                if (name, version) != CORE and name not in self.packages:
                    raise PackageError(f"package {package.key} needs {name}#{version}, which is not loaded")

    def resource(self, url: str) -> dict[str, Any] | None:
        """The StructureDefinition, ValueSet or CodeSystem with canonical ``url`` (``url|version`` too)."""
        found = self._by_url.get(url)
        if found is None and "|" in url:
            found = self._by_url.get(url.split("|", 1)[0])
        return found

    def structure_definitions(self) -> Iterator[dict[str, Any]]:
        seen: set[int] = set()
        for resource in self._by_url.values():
            if resource["resourceType"] == "StructureDefinition" and id(resource) not in seen:
                seen.add(id(resource))
                yield resource


def pack(source: Path, out_dir: Path) -> Path:
    """Write the package in folder ``source`` (``package.json`` plus resources and ``examples/``) as
    ``<name>-<version>.tgz`` in ``out_dir``, in the NPM layout other validators load (``package/...``)."""
    import io
    import tarfile

    package = load_package(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{package.name}-{package.version}.tgz"
    root = source / "package" if (source / "package" / "package.json").exists() else source
    files = sorted([root / "package.json", *root.glob("*.json"), *(root / "examples").glob("*.json")])
    with tarfile.open(target, "w:gz") as archive:
        for file in dict.fromkeys(files):
            data = file.read_bytes()
            info = tarfile.TarInfo("package/" + file.relative_to(root).as_posix())
            info.size = len(data)
            info.mtime = 0  # reproducible archives
            archive.addfile(info, io.BytesIO(data))
    return target


def install(spec: str, *, cache: Path | None = None, registry: str = "https://packages.fhir.org") -> FhirPackage:
    """Put a package into the package cache: from a ``.tgz`` file, or ``name#version`` downloaded
    from an NPM-style FHIR registry (``GET {registry}/{name}/{version}`` answers with the archive, or
    with the version's JSON whose ``dist.tarball`` is the archive, as npm registries do)."""
    import shutil
    import tarfile
    import tempfile

    import httpx

    cache = cache or cache_dir()
    path = Path(spec)
    with tempfile.TemporaryDirectory() as scratch:
        if path.is_file():
            archive = path
        else:
            match = _SPEC.fullmatch(spec)
            if match is None:
                raise PackageError(f"{spec!r} is neither a package file nor a name#version")
            url = f"{registry.rstrip('/')}/{match['name']}/{match['version']}"
            try:
                with httpx.Client(timeout=60.0, follow_redirects=True) as client:
                    response = client.get(url)
                    if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
                        tarball = response.json().get("dist", {}).get("tarball")
                        if not isinstance(tarball, str):
                            raise PackageError(f"{url} names no dist.tarball")
                        response = client.get(tarball)
            except httpx.HTTPError as exc:
                raise PackageError(f"cannot download {spec} from {registry}: {exc}") from exc
            if response.status_code != 200:
                raise PackageError(f"cannot download {spec} from {registry}: HTTP {response.status_code}")
            archive = Path(scratch) / "package.tgz"
            archive.write_bytes(response.content)
        package = load_package(archive)
        target = cache / f"{package.name}#{package.version}"
        unpacked = Path(scratch) / "unpacked"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(unpacked, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise PackageError(f"{spec}: cannot unpack ({exc})") from exc
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked), str(target))
    package.source = str(target)
    return package


def installed(cache: Path | None = None) -> list[tuple[str, str]]:
    """(name#version, path) of every package in the cache."""
    cache = cache or cache_dir()
    if not cache.is_dir():
        return []
    return [
        (folder.name, str(folder))
        for folder in sorted(cache.iterdir())
        if (folder / "package" / "package.json").exists()
    ]
