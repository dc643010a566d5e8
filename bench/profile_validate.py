"""Profile validation speed: throughput on social prescribing journeys, CLI start-up with the profiles
loaded, and peak memory.

    .venv/bin/python -m bench.profile_validate [--journeys 400] [--runs 5]

The corpus is built from the examples in ``profiles/examples``: each journey is a copy of every
example (patients, referrals, statuses, consents, contacts, case, plan, goals, six outcome scores, the
BaRS referral message and the message back to the GP) with its own ids, NHS number (999 test range,
valid Modulus 11 check digit), so 400 journeys are about 25,000 resources counting Bundle
entries and contained resources. Every resource is validated against the profiles it claims (our
profiles on UK Core, both differential-only) by :class:`ProfileValidator` in one process.

Also measured: ``spfhir validate`` of one file with ``--profile`` (CLI start, loading the bundled
packages and R4 core, compiling the profile chain, validating), median wall time of ``--runs``; and
the peak RSS of that process and of this one.
"""

from __future__ import annotations

import argparse
import json
import resource as rusage
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.api import nhs_numbers

ROOT = Path(__file__).resolve().parents[1]


def _rewrite(value: Any, ids: dict[str, str], nhs_old: set[str], nhs_new: str) -> Any:
    """A copy with every id (in ids and references) made unique and the NHS numbers replaced."""
    if isinstance(value, dict):
        return {key: _rewrite(item, ids, nhs_old, nhs_new) for key, item in value.items()}
    if isinstance(value, list):
        return [_rewrite(item, ids, nhs_old, nhs_new) for item in value]
    if isinstance(value, str):
        if value in nhs_old:
            return nhs_new
        for old, new in ids.items():
            if old in value:
                value = value.replace(old, new)
        return value
    return value


def journeys(count: int) -> list[dict[str, Any]]:
    from adapter.fhir import json_format

    examples = [json_format.loads(p.read_bytes()) for p in sorted((ROOT / "profiles" / "examples").glob("*.json"))]
    ids = sorted({e["id"] for e in examples}, key=len, reverse=True)
    nhs_old = {"9990000018", "9990000026"}
    corpus: list[dict[str, Any]] = []
    for n in range(count):
        mapping = {old: f"{old}-j{n}" for old in ids}
        for example in examples:
            corpus.append(_rewrite(example, mapping, nhs_old, next(nhs_numbers(1000 + n))))
    return corpus


def resources_in(resource: dict[str, Any]) -> int:
    inner = [e["resource"] for e in resource.get("entry") or () if isinstance(e, dict) and "resource" in e]
    return 1 + sum(resources_in(r) for r in [*inner, *(resource.get("contained") or ())])


def throughput(journey_count: int) -> dict[str, Any]:
    from adapter.validation.bundled import bundled_packages
    from adapter.validation.profiles import ProfileValidator

    corpus = journeys(journey_count)
    total = sum(resources_in(r) for r in corpus)
    validator = ProfileValidator(bundled_packages())
    for resource in corpus[:60]:  # compile the profiles first: steady state is what is measured
        validator.validate(resource)
    started = time.perf_counter()
    errors = 0
    for resource in corpus:
        errors += sum(1 for issue in validator.validate(resource) if issue.is_error)
    elapsed = time.perf_counter() - started
    return {
        "files": len(corpus),
        "resources": total,
        "seconds": elapsed,
        "resources_per_s": total / elapsed,
        "errors": errors,
        "peak_rss_mb": rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 1024,
    }


def cli_start(runs: int) -> dict[str, Any]:
    example = ROOT / "profiles" / "examples" / "Patient-sp-patient-1.json"
    profile = "https://sp-fhir-adapter.org/fhir/StructureDefinition/SP-Patient"
    times: list[float] = []
    peak = 0.0
    script = (
        "import resource, sys\n"
        "from adapter.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(runs):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", script, "validate", str(example), "--profile", profile, "-q"],
                cwd=scratch,
                capture_output=True,
                text=True,
            )
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise SystemExit(f"spfhir validate failed: {done.stdout} {done.stderr}")
            peak = max(peak, int(done.stderr.strip().splitlines()[-1]) / 1024)
    return {"median_s": statistics.median(times), "runs": [round(t, 3) for t in times], "peak_rss_mb": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--journeys", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    start = cli_start(args.runs)
    result = throughput(args.journeys)
    print(json.dumps({"throughput": result, "cli_start": start}, indent=2))
    print(
        f"profile validation: {result['resources']:,} resources in {result['files']:,} files,"
        f" {result['seconds']:.2f} s = {result['resources_per_s']:,.0f} resources/s, {result['errors']} errors,"
        f" peak RSS {result['peak_rss_mb']:.0f} MB (corpus in memory)"
    )
    print(
        f"spfhir validate one file --profile SP-Patient: median {start['median_s']:.3f} s of {start['runs']},"
        f" peak RSS {start['peak_rss_mb']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
