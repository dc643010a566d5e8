"""FHIR packages: pack, install from a file and from an NPM-style registry (a real local HTTP server),
list, and resolve dependencies from the cache; the CLI commands as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from adapter.validation.packages import PackageError, PackageSet, install, installed, load_package, pack

ROOT = Path(__file__).resolve().parents[2]


def small_package(
    folder: Path, name: str = "test.small", version: str = "1.2.3", deps: dict[str, str] | None = None
) -> Path:
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps({"name": name, "version": version, "dependencies": deps or {}}))
    value_set = {"resourceType": "ValueSet", "id": "v", "url": "https://test.example/ValueSet/v", "status": "draft"}
    (folder / "ValueSet-v.json").write_text(json.dumps(value_set))
    (folder / "examples").mkdir()
    (folder / "examples" / "Patient-p.json").write_text(json.dumps({"resourceType": "Patient", "id": "p"}))
    return folder


def test_pack_writes_an_npm_layout_that_loads_back(tmp_path: Path) -> None:
    archive = pack(small_package(tmp_path / "src"), tmp_path / "out")
    assert archive.name == "test.small-1.2.3.tgz"
    loaded = load_package(archive)
    assert (loaded.name, loaded.version) == ("test.small", "1.2.3")
    assert loaded.resources["https://test.example/ValueSet/v"]["id"] == "v"
    assert [name for name, _ in loaded.examples] == ["Patient-p.json"]
    assert (
        pack(small_package(tmp_path / "src2"), tmp_path / "out2").read_bytes() == archive.read_bytes()
    )  # reproducible


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """An NPM-style registry on 127.0.0.1: /test.small/1.2.3 is the archive, /test.npm/2.0.0 is npm's JSON."""
    direct = pack(small_package(tmp_path / "a"), tmp_path / "dist").read_bytes()
    npm_style = pack(small_package(tmp_path / "b", "test.npm", "2.0.0"), tmp_path / "dist").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = f"http://127.0.0.1:{self.server.server_address[1]}"
            routes = {
                "/test.small/1.2.3": ("application/tar+gzip", direct),
                "/test.npm/2.0.0": (
                    "application/json",
                    json.dumps({"dist": {"tarball": f"{host}/files/npm.tgz"}}).encode(),
                ),
                "/files/npm.tgz": ("application/octet-stream", npm_style),
            }
            found = routes.get(self.path)
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", found[0] if found else "text/plain")
            body = found[1] if found else b"not found"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_install_from_a_registry_then_resolve_dependencies_from_the_cache(tmp_path: Path, registry: str) -> None:
    cache = tmp_path / "cache"
    assert install("test.small#1.2.3", cache=cache, registry=registry).key == "test.small#1.2.3"
    assert install("test.npm#2.0.0", cache=cache, registry=registry).key == "test.npm#2.0.0"
    assert [key for key, _ in installed(cache)] == ["test.npm#2.0.0", "test.small#1.2.3"]
    with pytest.raises(PackageError, match="HTTP 404"):
        install("test.absent#9.9.9", cache=cache, registry=registry)
    needing = PackageSet()
    needing.add_path(small_package(tmp_path / "c", "test.needs", "0.1.0", {"test.small": "1.2.3", "test.npm": "2.0.0"}))
    needing.resolve_dependencies(cache=cache)
    assert sorted(needing.packages) == ["test.needs", "test.npm", "test.small"]
    assert needing.resource("https://test.example/ValueSet/v") is not None


def spfhir(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from adapter.cli import main; main()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


def test_the_cli_packs_installs_lists_and_validates_with_a_cached_package(tmp_path: Path, registry: str) -> None:
    packed = spfhir("profiles", "pack", "-o", str(tmp_path / "out"), home=tmp_path)
    assert packed.returncode == 0, packed.stderr
    archive = Path(packed.stdout.strip())
    assert load_package(archive).name == "sp-fhir-adapter.profiles"
    done = spfhir("packages", "install", "test.small#1.2.3", "--registry", registry, home=tmp_path)
    assert done.returncode == 0 and "installed test.small#1.2.3" in done.stdout
    listed = spfhir("packages", "list", home=tmp_path)
    assert "test.small#1.2.3" in listed.stdout
    patient = tmp_path / "p.json"
    patient.write_text(json.dumps({"resourceType": "Patient", "gender": "female"}))
    ok = spfhir("validate", str(patient), "--package", "test.small#1.2.3", "-q", home=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = spfhir("validate", str(patient), "--package", "test.absent#1.0.0", home=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "test.absent#1.0.0" in missing.stderr
    failed = spfhir("packages", "install", "test.absent#1.0.0", "--registry", registry, home=tmp_path)
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr
