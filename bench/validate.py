"""Structural validation throughput over the official R4 examples, in one process.

Run from the project root: ``python -m bench.validate [--limit N] [--no-compare]``.

Reads every file of ``hl7.fhir.r4.examples@4.0.1`` into memory first (so disk is not measured),
then times parse + validate for each file with :class:`StructuralValidator`, with the garbage
collector's thresholds ``spfhir validate`` sets (:func:`adapter.memory.bulk_collection`). Reports files/s and
resources/s (resources counts every resource validated: top-level files plus Bundle entries and
contained resources), the files with errors, and the peak RSS of the process. In the same run it
measures fhir.resources (R4B models, ``model_validate_json``) on the same bytes in a child process
(so that its peak memory is its own) and prints the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.corpus import example_files, official_examples


def _count(res: Any) -> int:
    if not isinstance(res, dict):
        return 0
    total = 1
    contained = res.get("contained")
    for item in contained if isinstance(contained, list) else ():
        total += _count(item)
    if res.get("resourceType") == "Bundle":
        for entry in res.get("entry") or ():
            if isinstance(entry, dict):
                total += _count(entry.get("resource"))
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(blobs: list[tuple[str, bytes]]) -> dict[str, Any]:
    from adapter.fhir.json_format import loads
    from adapter.memory import bulk_collection
    from adapter.validation.structure import StructuralValidator

    validator = StructuralValidator()
    invalid: dict[str, str] = {}
    resources = 0
    # The collector's settings `spfhir validate` makes for its inputs (adapter.memory).
    with bulk_collection():
        start = time.perf_counter()
        for name, data in blobs:
            parsed = loads(data)
            issues = validator.validate(parsed)
            resources += _count(parsed)
            errors = [i for i in issues if i.is_error]
            if errors:
                invalid[name] = f"{errors[0].expression}: {errors[0].diagnostics}"
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "files": len(blobs), "resources": resources, "invalid": invalid}


def run_fhir_resources(paths: list[str]) -> dict[str, Any]:
    from fhir.resources.R4B import get_fhir_model_class

    blobs = [Path(p).read_bytes() for p in paths]
    rejected = 0
    start = time.perf_counter()
    for data in blobs:
        try:
            rtype = json.loads(data)["resourceType"]
            get_fhir_model_class(rtype).model_validate_json(data)
        except Exception:
            rejected += 1
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "files": len(blobs), "rejected": rejected, "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="only the first N files")
    parser.add_argument("--no-compare", action="store_true", help="skip the fhir.resources run")
    parser.add_argument("--fhir-resources-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fhir_resources_child:
        paths = json.loads(Path(args.fhir_resources_child).read_text())
        print(json.dumps(run_fhir_resources(paths)))
        return 0

    folder = official_examples()
    if folder is None:
        print("error: the official R4 examples could not be fetched (npm pack hl7.fhir.r4.examples@4.0.1)")
        return 2
    files = example_files(folder)
    if args.limit:
        files = files[: args.limit]
    blobs = [(p.name, p.read_bytes()) for p in files]
    megabytes = sum(len(b) for _, b in blobs) / 1e6
    gc.collect()
    ours = run_ours(blobs)
    rate = ours["files"] / ours["seconds"]
    print(f"corpus: {ours['files']} files, {ours['resources']} resources, {megabytes:.0f} MB")
    print(
        f"spfhir structural validation (parse + validate, 1 process): {ours['seconds']:.2f} s, "
        f"{rate:,.0f} files/s, {ours['resources'] / ours['seconds']:,.0f} resources/s, "
        f"peak RSS {peak_rss_mb():.0f} MB (corpus bytes held in memory included)"
    )
    from adapter.native import compiled_modules

    compiled = ", ".join(compiled_modules()) or "none (plain Python)"
    print(f"compiled modules (decision 0006; SPFHIR_PURE_PYTHON=1 runs plain Python): {compiled}")
    print(f"files with errors: {len(ours['invalid'])}")
    for name, first in sorted(ours["invalid"].items()):
        print(f"  {name}: {first[:150]}")
    if not args.no_compare:
        listing = Path(".cache/bench-validate-files.json")
        listing.parent.mkdir(exist_ok=True)
        listing.write_text(json.dumps([str(p) for p in files]))
        out = subprocess.run(
            [sys.executable, "-m", "bench.validate", "--fhir-resources-child", str(listing)],
            capture_output=True,
            text=True,
            check=True,
        )
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
        their_rate = theirs["files"] / theirs["seconds"]
        print(
            f"fhir.resources R4B model_validate_json: {theirs['seconds']:.2f} s, {their_rate:,.0f} files/s, "
            f"rejected {theirs['rejected']}, peak RSS {theirs['peak_rss_mb']:.0f} MB"
        )
        print(f"ratio (spfhir / fhir.resources, files/s): {rate / their_rate:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
