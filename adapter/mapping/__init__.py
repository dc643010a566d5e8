"""The mapping engine: declarative specs in ``mappings/`` turn source records into FHIR R4 resources.

Seam (``../shared/architecture.md``): :class:`Mapper` maps one record to validated resources and a
trace, pure and without I/O; :func:`load` reads a spec; :func:`run` streams a source through it.
"""

from adapter.mapping.base import Mapped, MappedResource, MappingError
from adapter.mapping.engine import MappedRecord, Mapper
from adapter.mapping.run import Summary, run
from adapter.mapping.spec import MappingSpec, load

__all__ = [
    "Mapped",
    "MappedRecord",
    "MappedResource",
    "Mapper",
    "MappingError",
    "MappingSpec",
    "Summary",
    "load",
    "run",
]
