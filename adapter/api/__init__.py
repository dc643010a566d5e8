"""The FHIR R4 REST API (FastAPI): :func:`create_app` over a ``ResourceStore`` and a ``Validator``."""

from adapter.api.app import create_app

__all__ = ["create_app"]
