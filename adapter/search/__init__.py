"""FHIR search: the parameters each type supports, the index values of a resource, and parsed queries."""
