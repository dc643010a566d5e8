"""Start-up time of the ``spfhir`` command: wall time of whole runs, each in a fresh process.

    python -m bench.cli_start                       # both cases below, 11 runs each
    python -m bench.cli_start -n 21 -- validate examples/bundle.json
    python -m bench.cli_start --budget 0.3          # exit 1 when the median is over 0.3 s

Runs the installed console script (``spfhir`` next to this interpreter) when there is one,
otherwise the same entry point through ``python -c "from adapter.cli import main; main()"``.
One untimed warm-up run first fills the OS file cache. Prints median, min and max wall time.

Without arguments it times two cases: ``examples/patient.json`` as it is (it declares the UK Core
Patient profile, so the bundled packages are loaded and the profile chain compiled), and the same
patient without ``meta.profile`` (structural R4 validation only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARGS = ["validate", "examples/patient.json"]


def command() -> list[str]:
    script = Path(sys.executable).with_name("spfhir")
    if script.exists():
        return [str(script)]
    found = shutil.which("spfhir")
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return [found]
    return [sys.executable, "-c", "from adapter.cli import main; main()"]


def run_once(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr.decode("utf-8", "replace"))
    return elapsed, done.returncode


def measure(args: list[str], runs: int) -> float:
    full = [*command(), *args]
    run_once(full)  # warm-up, not timed
    times: list[float] = []
    codes: set[int] = set()
    for _ in range(runs):
        elapsed, code = run_once(full)
        times.append(elapsed)
        codes.add(code)
    median = statistics.median(times)
    print(f"command: {' '.join(full)}")
    print(f"runs: {len(times)}  exit codes: {sorted(codes)}")
    print(f"median {median:.3f} s  min {min(times):.3f} s  max {max(times):.3f} s")
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=11, help="timed runs (default 11)")
    parser.add_argument("--budget", type=float, default=None, help="fail when a median is over this (s)")
    parser.add_argument("args", nargs="*", help="spfhir arguments (after --)")
    options = parser.parse_args(argv)
    medians: list[float] = []
    if options.args:
        medians.append(measure(options.args, options.runs))
    else:
        medians.append(measure(DEFAULT_ARGS, options.runs))
        with tempfile.TemporaryDirectory() as scratch:
            plain = json.loads((ROOT / "examples" / "patient.json").read_text())
            plain.pop("meta", None)
            path = Path(scratch) / "patient-no-profile.json"
            path.write_text(json.dumps(plain))
            medians.append(measure(["validate", str(path)], options.runs))
    if options.budget is not None and max(medians) > options.budget:
        print(f"over budget: median {max(medians):.3f} s > {options.budget:.3f} s")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
