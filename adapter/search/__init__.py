"""FHIR search: the parameters each type supports, the index values of a resource, and parsed queries."""

from adapter.native import prefer_compiled

# Before any submodule is imported: its compiled form when it is built (decision 0006).
prefer_compiled(__name__, __path__)
