"""Hatch build hook: compiles the modules of ``adapter.native.COMPILED`` with Cython.

See docs/decisions/0006-compiled-modules.md. For an editable install (``pip install -e .``, what
``scripts/setup`` does) the compiled modules go into ``adapter/_native/`` in the source tree; for
a wheel they go into the wheel, which is then tagged for this platform. When compiling fails (no
C compiler, say), the build warns and goes on: the modules then run as plain Python.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _native_module(root: Path) -> Any:
    """adapter/native.py, loaded from its file (the package itself is not importable here)."""
    spec = importlib.util.spec_from_file_location("_spfhir_native", root / "adapter" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_modules(root: Path, out: Path) -> list[Path]:
    """Compile each module of COMPILED into ``out/<module>/`` with its ``source.sha256``."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    native = _native_module(root)
    modules: tuple[str, ...] = native.COMPILED
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {m: native.module_source(m, root) for m in modules}
        extensions = cythonize(
            [Extension(m, [str(source)]) for m, source in sources.items()],
            build_dir=str(Path(tmp) / "c"),
            compiler_directives={"language_level": "3"},
            quiet=True,
        )
        # Distribution(attrs) does not read pyproject.toml (setuptools would refuse hatch's tables).
        dist = Distribution({"name": "sp-fhir-adapter-native", "ext_modules": extensions})
        build_ext: Any = dist.get_command_obj("build_ext")
        build_ext.build_lib = str(Path(tmp) / "lib")
        build_ext.build_temp = str(Path(tmp) / "temp")
        build_ext.parallel = os.cpu_count() or 1
        build_ext.ensure_finalized()
        build_ext.run()
        for module, source in sources.items():
            built = Path(build_ext.get_ext_fullpath(module))
            folder = out / module
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / built.name
            shutil.copyfile(built, target)
            stamp = folder / "source.sha256"
            stamp.write_text(native.source_digest(source) + "\n")
            written += [target, stamp]
    return written


class CompiledModulesHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"
    #: A wheel's compiled modules until the wheel is written (removed by finalize).
    _staging: Path | None = None

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        pure_python = _native_module(root).PURE_PYTHON
        if os.environ.get(pure_python):
            self.app.display_info(f"{pure_python} is set: no compiled modules")
            return
        editable = version == "editable"
        if editable:
            out = root / "adapter" / "_native"
            shutil.rmtree(out, ignore_errors=True)  # no module of an earlier build outlives its source
        else:
            out = self._staging = Path(tempfile.mkdtemp(prefix="spfhir-native-"))
        try:
            written = compile_modules(root, out)
        except Exception as exc:  # no compiler, a Cython error: plain Python still works
            shutil.rmtree(out, ignore_errors=True)
            print(f"warning: compiled modules not built ({exc}); they run as plain Python", file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if not editable:
            for path in written:
                build_data["force_include"][str(path)] = "adapter/_native/" + path.relative_to(out).as_posix()

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
