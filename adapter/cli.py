"""The ``spfhir`` command line: ``validate`` FHIR R4 resources and ``convert`` between JSON and XML.

    spfhir validate PATH... [--profile URL]... [--package FILE|NAME#VERSION]... [--tx URL]
                   [--must-support] [--format text|json|junit] [--quiet] [-o OUTPUT]
    spfhir convert INPUT --to json|xml [--pretty] [-o OUTPUT]
    spfhir serve [--host H] [--port P] [--database URL] [--workers N] [--demo]
    spfhir map --mapping NAME INPUT [-o OUTPUT | --to-server URL] [--batch-size N]; spfhir map --list
    spfhir unmap --mapping NAME INPUT -o OUTPUT.csv
    spfhir --version

Exit codes (validate): 0 every input is valid, 1 some input has an error issue, 2 a usage error or
an input that could not be read (reported on stderr as ``error: FILE: reason``, one line each; the
other inputs are still validated). ``map`` exits 1 when some records were rejected. ``convert``,
``unmap`` and ``serve`` exit 0 or 2.

Start-up time matters (the command runs once per file in pre-commit hooks and CI jobs): this module
imports only typer at import time; the validator, the codecs and rich are imported inside the
commands, and rich only for the text report and the progress bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from adapter.fhir.sources import Source
    from adapter.reports import Result
    from adapter.validation.base import Issue, Validator

__all__ = ["app", "main"]

#: Show a progress bar (on stderr, when it is a terminal) from this many input files on.
PROGRESS_MIN_FILES = 4

#: Environment variable that lets internal errors raise (with a traceback) instead of one line.
DEBUG_ENV = "SPFHIR_DEBUG"

EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2

app = typer.Typer(
    name="spfhir",
    help="FHIR R4 tools for social prescribing: validate resources, convert between JSON and XML.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class ReportFormat(StrEnum):
    text = "text"
    json = "json"
    junit = "junit"


class Target(StrEnum):
    json = "json"
    xml = "xml"


def _show_version(value: bool) -> None:
    if value:
        from adapter import software_version

        typer.echo(f"spfhir {software_version()}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """FHIR R4 tools for social prescribing: validate resources, convert between JSON and XML."""


def _one_line(text: str) -> str:
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def _stderr(line: str) -> None:
    sys.stderr.write(_one_line(line) + "\n")
    sys.stderr.flush()


def _fail(message: str) -> NoReturn:
    _stderr(f"error: {message}")
    raise typer.Exit(EXIT_ERROR)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _write_output(output: str | None, data: bytes) -> None:
    """Write to a file (atomically: a temporary file renamed into place) or to stdout for None/``-``."""
    if output is None or output == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    # Through symlinks to the real file; devices and pipes (/dev/null, /dev/stdout, a FIFO) are
    # written in place: renaming over them would replace the device node with a regular file.
    target = Path(os.path.realpath(output))
    try:
        if target.exists() and not target.is_file():
            with target.open("wb") as handle:
                handle.write(data)
            return
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        _fail(f"cannot write {output}: {exc.strerror or exc}")


# -- validate --------------------------------------------------------------------------------------


def _declares_profiles(resource: object) -> bool:
    """Whether a resource (or a Bundle entry, or a contained resource) names profiles in meta.profile."""
    if not isinstance(resource, dict):
        return False
    meta = resource.get("meta")
    if isinstance(meta, dict) and meta.get("profile"):
        return True
    inner = [entry.get("resource") for entry in resource.get("entry") or () if isinstance(entry, dict)]
    return any(_declares_profiles(r) for r in [*inner, *(resource.get("contained") or ())])


class _Validators:
    """The structural validator, and the profile validator built the first time it is needed (its
    packages cost ~0.1 s to load, which a plain structural check should not pay)."""

    def __init__(self, profiles: list[str], packages: list[str], tx: str | None, must_support: bool) -> None:
        from adapter.validation.structure import StructuralValidator

        self.structural = StructuralValidator()
        self.profiles = profiles
        self.packages = packages
        self.tx = tx
        self.must_support = must_support
        self._profile: Validator | None = None

    @staticmethod
    def _defaults_set() -> bool:
        # Only whether the variable is set; adapter.settings parses it (when it is).
        return os.environ.get("SPFHIR_DEFAULT_PROFILES", "").strip() not in ("", "{}")

    @property
    def always_profiles(self) -> bool:
        return bool(self.profiles or self.packages or self.tx or self.must_support or self._defaults_set())

    def for_resource(self, resource: object) -> Validator:
        if not (self.always_profiles or _declares_profiles(resource)):
            return self.structural
        if self._profile is None:
            self._profile = self._build()
        return self._profile

    def _build(self) -> Validator:
        from adapter.validation.bundled import bundled_packages
        from adapter.validation.packages import PackageError
        from adapter.validation.profiles import ProfileValidator
        from adapter.validation.terminology import (
            ChainedTerminology,
            LocalTerminology,
            RemoteTerminology,
            Terminology,
        )

        packages = bundled_packages()
        for spec in self.packages:
            if Path(spec).exists():
                packages.add_path(spec)
            elif "#" in spec:
                packages.add_from_cache(spec)
            else:
                raise PackageError(f"--package {spec}: no such file, and not a name#version")
        packages.resolve_dependencies()
        terminology: Terminology = LocalTerminology(packages.resource)
        defaults: dict[str, list[str]] = {}
        if self.tx or self._defaults_set():
            # pydantic-settings costs ~0.15 s of start-up: only when there is something to read.
            from adapter.settings import Settings

            settings = Settings()
            defaults = settings.default_profiles
            if self.tx:
                remote = RemoteTerminology(
                    self.tx,
                    token_url=settings.tx_token_url,
                    client_id=settings.tx_client_id,
                    client_secret=settings.tx_client_secret,
                )
                terminology = ChainedTerminology(terminology, remote)
        validator = ProfileValidator(
            packages, terminology=terminology, must_support=self.must_support, defaults=defaults
        )
        for url in self.profiles:
            validator.profile(url)  # an unknown --profile is a usage error, before any input is read
        return _WithProfiles(validator, self.profiles)


class _WithProfiles:
    """A ProfileValidator that always applies the --profile URLs."""

    def __init__(self, validator: Validator, profiles: list[str]) -> None:
        self.validator = validator
        self.profiles = profiles

    def validate(self, resource: object, profiles: Sequence[str] = ()) -> list[Issue]:
        return self.validator.validate(resource, list(profiles) or self.profiles)


def _check(validators: _Validators, source: Source) -> Result:
    from adapter.errors import AdapterError
    from adapter.reports import Result

    resource = source.resource
    assert resource is not None
    rtype = resource.get("resourceType")
    entries = resource.get("entry")
    result = Result(
        source.label,
        resource_type=rtype if isinstance(rtype, str) else None,
        entries=len(entries) if rtype == "Bundle" and isinstance(entries, list) else None,
    )
    try:
        result.issues = validators.for_resource(resource).validate(resource)
    except AdapterError as exc:  # e.g. a limit of the validator
        result.problem, result.problem_code = exc.message, exc.issue_code
        result.problem_expression = exc.expression
    except RecursionError:
        result.problem, result.problem_code = "nested too deeply to validate", "too-costly"
    except Exception as exc:  # never a traceback for a user; SPFHIR_DEBUG=1 shows it
        if _debug():
            raise
        result.problem = f"internal error while validating: {type(exc).__name__}: {exc}"
    return result


@app.command()
def validate(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH",
            help="Files, folders (searched recursively for *.json, *.xml, *.ndjson) or - for stdin.",
            show_default=False,
        ),
    ],
    report_format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Report format.", case_sensitive=False)
    ] = ReportFormat.text,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the errors and the summary line.")] = False,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write the report to this file.", show_default=False)
    ] = None,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", "-p", help="Validate against this profile (canonical URL); repeatable."),
    ] = None,
    package: Annotated[
        list[str] | None,
        typer.Option("--package", help="Load a FHIR package: a .tgz, a folder, or name#version from the cache."),
    ] = None,
    tx: Annotated[
        str | None, typer.Option("--tx", help="Terminology server for ValueSets we cannot expand locally.")
    ] = None,
    must_support: Annotated[
        bool, typer.Option("--must-support", help="Report absent mustSupport elements (information).")
    ] = False,
) -> None:
    """Validate FHIR R4 resources (JSON, XML, NDJSON, Bundles) against R4 core and profiles.

    Profiles: --profile, else each resource's meta.profile; the project's profiles and UK Core are
    always loaded, --package adds more. Exit code 0 when every input is valid, 1 when any has an
    error, 2 when an input cannot be read or a profile or package cannot be found.
    """
    from adapter.fhir import sources
    from adapter.memory import bulk_collection
    from adapter.reports import Result, json_report, junit_report, quiet_lines, summary_line

    validators = _Validators(profile or [], package or [], tx, must_support)
    if validators.always_profiles:
        try:
            validators.for_resource(None)
        except Exception as exc:
            from adapter.errors import AdapterError
            from adapter.validation.profiles import ProfileError

            if isinstance(exc, AdapterError | ProfileError):
                _fail(str(exc))
            raise
    entries = sources.discover(paths)
    results: list[Result] = []
    progress = _progress(len(entries)) if not quiet and len(entries) >= PROGRESS_MIN_FILES else None
    say = _stderr if progress is None else progress.say
    try:
        with bulk_collection():
            for entry in entries:
                if progress is not None:
                    progress.step(entry.label)
                for source in sources.read_entry(entry):
                    if source.error is not None:
                        say(f"error: {source.label}: {source.error}")
                        results.append(
                            Result(
                                source.label,
                                problem=source.error,
                                problem_code=source.error_code or "exception",
                                problem_expression=source.error_expression,
                            )
                        )
                        continue
                    result = _check(validators, source)
                    if result.problem is not None:
                        say(f"error: {result.label}: {result.problem}")
                    results.append(result)
    finally:
        if progress is not None:
            progress.stop()

    if report_format is ReportFormat.json:
        _write_output(output, json_report(results))
    elif report_format is ReportFormat.junit:
        _write_output(output, junit_report(results))
    elif quiet:
        lines = [*quiet_lines(results), summary_line(results)]
        _write_output(output, ("\n".join(lines) + "\n").encode("utf-8"))
    else:
        _write_table(output, results)

    if any(r.problem is not None for r in results):
        raise typer.Exit(EXIT_ERROR)
    raise typer.Exit(EXIT_OK if all(r.valid for r in results) else EXIT_INVALID)


def _write_table(output: str | None, results: list[Result]) -> None:
    import io

    from rich.console import Console

    from adapter.reports import write_table

    if output is None or output == "-":
        console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else _plain_width())
        write_table(console, results)
        return
    buffer = io.StringIO()
    write_table(Console(file=buffer, width=_plain_width(), no_color=True, force_terminal=False), results)
    _write_output(output, buffer.getvalue().encode("utf-8"))


def _plain_width() -> int:
    """Width of the table when it is not written to a terminal (a file, a pipe, a CI log)."""
    try:
        return max(80, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return 160


class _Progress:
    """A rich progress bar on stderr; messages printed through it so they do not garble the bar."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("validating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}", style="dim"),
            console=self._console,
            transient=True,
        )
        self._task = self._bar.add_task("", total=total)
        self._started = False

    def step(self, label: str) -> None:
        if not self._started:
            self._bar.start()
            self._started = True
        else:
            self._bar.advance(self._task)
        self._bar.update(self._task, description=label[-40:])

    def say(self, line: str) -> None:
        self._console.print(_one_line(line), markup=False, highlight=False, soft_wrap=True, style="red")

    def stop(self) -> None:
        if self._started:
            self._bar.stop()


def _progress(total: int) -> _Progress | None:
    """A progress bar when stderr is a terminal (never in CI logs or redirected output)."""
    if not sys.stderr.isatty() or os.environ.get("TERM") == "dumb":
        return None
    return _Progress(total)


# -- convert ---------------------------------------------------------------------------------------


@app.command()
def convert(
    input_path: Annotated[
        str,
        typer.Argument(metavar="INPUT", help="A JSON or XML resource, or - for stdin.", show_default=False),
    ],
    to: Annotated[Target, typer.Option("--to", "-t", help="Output format.", case_sensitive=False)],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Output file, or - for stdout.", show_default=True)
    ] = "-",
    pretty: Annotated[bool, typer.Option("--pretty", help="Indent the output.")] = False,
) -> None:
    """Convert one FHIR R4 resource between JSON and XML (format of INPUT detected from its content)."""
    from adapter.errors import AdapterError
    from adapter.fhir import sources

    source = sources.load(input_path)
    if source.error is not None:
        _fail(f"{source.label}: {source.error}")
    resource = source.resource
    assert resource is not None
    try:
        if to is Target.xml:
            from adapter.fhir import xml_format

            data = xml_format.dumps(resource, pretty=pretty)
        else:
            from adapter.fhir import json_format

            data = json_format.dumps(resource, indent=pretty)
    except AdapterError as exc:
        _fail(f"{source.label}: cannot convert to {to.value.upper()}: {exc.message}")
    except Exception as exc:
        if _debug():
            raise
        _fail(f"{source.label}: cannot convert to {to.value.upper()}: {type(exc).__name__}: {exc}")
    if not data.endswith(b"\n"):
        data += b"\n"
    _write_output(output, data)


# -- serve -----------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on [default: 127.0.0.1].", show_default=False)
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port [default: 8080].", show_default=False)] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            help="sqlite:///PATH, sqlite://:memory: or postgresql://... [default: sqlite:///./spfhir.db].",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Server processes [default: 1].", show_default=False)
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Load the synthetic demo data set (idempotent).")] = False,
) -> None:
    """Serve the FHIR R4 API under /fhir (uvicorn); SPFHIR_* environment variables set the defaults.

    Exit code 2 when it cannot start (bad database URL, port in use).
    """
    from adapter.serve import ServeError
    from adapter.serve import serve as run_server

    try:
        code = run_server(host=host, port=port, database=database, workers=workers, demo=demo)
    except ServeError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


# -- profiles and packages -------------------------------------------------------------------------

# -- map, unmap -----------------------------------------------------------------------------------


class SourceKind(StrEnum):
    csv = "csv"
    json = "json"
    ndjson = "ndjson"
    xml = "xml"


class _Counter:
    """A record counter with rate on stderr, when it is a terminal."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            SpinnerColumn(),
            TextColumn(label),
            TextColumn("{task.completed} records"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._bar.add_task("", total=None)
        self._bar.start()

    def step(self) -> None:
        self._bar.advance(self._task)

    def stop(self) -> None:
        self._bar.stop()


@app.command("map")
def map_command(
    input: Annotated[str | None, typer.Argument(help="Source file (CSV, JSON, NDJSON, XML), or - for stdin.")] = None,
    mapping: Annotated[str | None, typer.Option("--mapping", "-m", help="Mapping name (see --list).")] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="OUT.ndjson (resources), DIR/ (a transaction Bundle per batch), OUT.json or - (one Bundle).",
        ),
    ] = None,
    to_server: Annotated[
        str | None, typer.Option("--to-server", help="FHIR base URL: POST each batch there as a transaction.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Records per transaction Bundle.")] = 100,
    processes: Annotated[
        int, typer.Option("--processes", "-j", min=1, help="Worker processes that map records side by side.")
    ] = 1,
    source_format: Annotated[
        SourceKind | None, typer.Option("--format", help="Source format (default: from the file name or content).")
    ] = None,
    encoding: Annotated[
        str | None, typer.Option("--encoding", help="CSV encoding (default: UTF-8, with or without BOM, else cp1252).")
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option("--delimiter", help="CSV delimiter (default: the mapping's).")
    ] = None,
    summary_json: Annotated[
        str | None, typer.Option("--summary-json", help="Also write the run's summary as JSON to this file.")
    ] = None,
    list_mappings: Annotated[bool, typer.Option("--list", help="List the mappings and exit.")] = False,
) -> None:
    """Map source records to FHIR R4 (UK Core) with a declarative mapping.

    Exit codes: 0 every record mapped, 1 some records rejected (listed on stderr), 2 usage error or
    unreadable input.
    """
    from adapter.errors import AdapterError
    from adapter.mapping.spec import available

    if list_mappings:
        for name, title in available():
            typer.echo(f"{name}\t{title}")
        raise typer.Exit(EXIT_OK)
    if mapping is None or input is None:
        _fail("map needs --mapping NAME and an INPUT (or --list)")
    if output is not None and to_server is not None:
        _fail("give either -o OUTPUT or --to-server URL, not both")
    if encoding is not None:
        import codecs

        try:
            codecs.lookup(encoding)
        except LookupError:
            _fail(f"--encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, cp1252)")
    if delimiter is not None and len(delimiter) != 1:
        _fail(f"--delimiter must be one character, not {delimiter!r}")
    if to_server is not None:
        import httpx

        try:
            url = httpx.URL(to_server)
        except httpx.InvalidURL as exc:
            _fail(f"--to-server {to_server!r} is not a URL: {exc}")
        if url.scheme not in ("http", "https"):
            _fail(f"--to-server {to_server!r} is not an http(s) URL")
    from adapter.mapping.commands import map_records, summary_lines

    counter = (
        _Counter(f"mapping {Path(input).name}") if sys.stderr.isatty() and os.environ.get("TERM") != "dumb" else None
    )
    try:
        handle = sys.stdin.buffer if input == "-" else open(input, "rb")  # noqa: SIM115
    except OSError as exc:
        _fail(f"{input}: {exc.strerror or exc}")
    try:
        with handle:
            summary = map_records(
                mapping,
                handle,
                "stdin" if input == "-" else Path(input).name,
                output,
                to_server=to_server,
                batch_size=batch_size,
                format=source_format.value if source_format else None,
                encoding=encoding,
                delimiter=delimiter,
                on_record=counter.step if counter else None,
                processes=processes,
            )
    except AdapterError as exc:
        _fail(f"{input}: {exc.message}")
    finally:
        if counter is not None:
            counter.stop()
    for line in summary_lines(summary):
        _stderr(line)
    if summary_json:
        import orjson

        _write_output(summary_json, orjson.dumps(summary.as_json(), option=orjson.OPT_INDENT_2))
    raise typer.Exit(EXIT_INVALID if summary.rejected else EXIT_OK)


@app.command("unmap")
def unmap_command(
    input: Annotated[str, typer.Argument(help="FHIR resources: a Bundle (JSON or XML), NDJSON, or a folder of them.")],
    mapping: Annotated[str, typer.Option("--mapping", "-m", help="Mapping name (see spfhir map --list).")],
    output: Annotated[str, typer.Option("-o", "--output", help="OUT.csv (groups as JSON cells) or OUT.ndjson.")],
) -> None:
    """Write FHIR resources back as flat source records (one per referral, case or assessment), for reporting."""
    from adapter.errors import AdapterError
    from adapter.mapping.unmap_files import unmap_files

    try:
        count = unmap_files(mapping, Path(input), output)
    except AdapterError as exc:
        _fail(f"{input}: {exc.message}")
    _stderr(f"{count} records written to {output}")


profiles_app = typer.Typer(help="The project's FHIR profile package.", no_args_is_help=True)
packages_app = typer.Typer(help="FHIR packages in the package cache (~/.fhir/packages).", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
app.add_typer(packages_app, name="packages")


@profiles_app.command("pack")
def profiles_pack(
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Folder to write the .tgz into.")] = ".",
) -> None:
    """Write the project's profiles as a FHIR NPM package (.tgz) that other validators can load."""
    from adapter.errors import AdapterError
    from adapter.validation.bundled import profiles_dir
    from adapter.validation.packages import pack

    try:
        target = pack(profiles_dir(), Path(out_dir))
    except (AdapterError, OSError) as exc:
        _fail(str(exc))
    typer.echo(str(target))


@packages_app.command("install")
def packages_install(
    spec: Annotated[str, typer.Argument(metavar="FILE.tgz|NAME#VERSION", show_default=False)],
    registry: Annotated[
        str | None,
        typer.Option("--registry", help="Package registry [default: SPFHIR_PACKAGE_REGISTRY or packages.fhir.org]."),
    ] = None,
) -> None:
    """Install a package into the FHIR package cache, from a file or from the registry."""
    from adapter.errors import AdapterError
    from adapter.settings import Settings
    from adapter.validation.packages import install

    try:
        package = install(spec, registry=registry or Settings().package_registry)
    except AdapterError as exc:
        _fail(exc.message)
    typer.echo(
        f"installed {package.key} ({len({id(r) for r in package.resources.values()})} resources) in {package.source}"
    )


@packages_app.command("list")
def packages_list() -> None:
    """List the packages in the FHIR package cache."""
    from adapter.validation.packages import installed

    for key, path in installed():
        typer.echo(f"{key}\t{path}")


# -- entry point -----------------------------------------------------------------------------------


def main() -> None:
    """Console script ``spfhir``: typer, with a last guard that turns any stray error into one line."""
    from adapter.errors import AdapterError

    try:
        app(prog_name="spfhir")
    except AdapterError as exc:
        _stderr(f"error: {exc.message}")
        raise SystemExit(EXIT_ERROR) from None
    except (OSError, UnicodeError) as exc:
        if isinstance(exc, BrokenPipeError):  # e.g. `spfhir validate ... | head`
            _quiet_broken_pipe()
        _stderr(f"error: {exc}")
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        _stderr("interrupted")
        raise SystemExit(130) from None


def _quiet_broken_pipe() -> NoReturn:
    # Point stdout at devnull so the interpreter's final flush does not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_ERROR)


if __name__ == "__main__":
    main()
