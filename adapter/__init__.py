"""sp-fhir-adapter: a FHIR R4 interoperability adapter for social prescribing in England."""

from functools import cache

__all__ = ["software_version"]


@cache
def software_version() -> str:
    """The installed distribution's version (CapabilityStatement.software, message headers,
    Provenance, ``spfhir --version``), or ``unknown`` when the package is not installed."""
    from importlib import metadata

    try:
        return metadata.version("sp-fhir-adapter")
    except metadata.PackageNotFoundError:
        return "unknown"
