"""Validation of FHIR resources (the ``Validator`` seam)."""

from adapter.validation.base import Issue, Validator, has_errors, operation_outcome

__all__ = ["Issue", "Validator", "has_errors", "operation_outcome"]
