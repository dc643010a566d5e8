"""Golden cases of the mappings: ``mappings/<name>/cases/<case>/input.*`` and ``expected.json``.

``expected.json`` holds what ``spfhir map`` gives for the input: the run's summary (records mapped
and rejected, with reasons, unused fields, defaults) and its output (the transaction Bundle, or the
document). Volatile values are blanked before comparing: ``Provenance.recorded`` always, and the
``Type.element`` paths a case lists under ``volatile:`` in its ``case.yaml``.

Regenerate after a deliberate change, then review the diff::

    .venv/bin/python -m tests.mapping.golden --update
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml

from adapter.mapping.commands import map_records
from adapter.mapping.spec import mappings_root

VOLATILE = ("Provenance.recorded",)


def cases() -> list[Path]:
    return sorted(path for path in mappings_root().glob("*/cases/*") if path.is_dir() and any(path.glob("input.*")))


def _blank(output: Any, volatile: set[str]) -> Any:
    resources = [output] + [entry.get("resource", {}) for entry in output.get("entry") or ()]
    for resource in resources:
        for path in volatile:
            type, _, element = path.partition(".")
            if resource.get("resourceType") == type and element in resource:
                resource[element] = "<volatile>"
    return output


def run_case(case: Path) -> dict[str, Any]:
    """The summary and output of mapping the case's input, volatile values blanked."""
    mapping = case.parent.parent.name
    source = next(case.glob("input.*"))
    settings = yaml.safe_load((case / "case.yaml").read_text()) if (case / "case.yaml").is_file() else {}
    volatile = set(VOLATILE) | set(settings.get("volatile") or ())
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "out.json"
        with source.open("rb") as handle:
            summary = map_records(mapping, handle, source.name, str(target))
        output = orjson.loads(target.read_bytes()) if target.exists() else None
    return {"summary": summary.as_json(), "output": _blank(output, volatile) if output else None}


def main(arguments: list[str]) -> int:
    update = "--update" in arguments
    for case in cases():
        result = run_case(case)
        expected = case / "expected.json"
        text = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        if update:
            expected.write_bytes(text)
        print(f"{'wrote' if update else 'ran'} {case.relative_to(mappings_root())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
