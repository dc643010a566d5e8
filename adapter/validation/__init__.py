"""Validation of FHIR resources (the ``Validator`` seam)."""

from adapter.native import prefer_compiled

# Before any submodule is imported: the compiled structural walk when it is built (decision 0006).
prefer_compiled(__name__, __path__)

from adapter.validation.base import Issue, Validator, has_errors, operation_outcome  # noqa: E402

__all__ = ["Issue", "Validator", "has_errors", "operation_outcome"]
