"""The mapping engine: declarative specs in ``mappings/`` turn source records into FHIR R4 resources.

Seam (``../shared/architecture.md``): :class:`Mapper` maps one record to validated resources and a
trace, pure and without I/O; :func:`load` reads a spec; :func:`run` streams a source through it.
"""

from adapter.native import prefer_compiled

# Before any submodule is imported: its compiled form when it is built (decision 0006).
prefer_compiled(__name__, __path__)

from adapter.mapping.base import Mapped, MappedResource, MappingError  # noqa: E402
from adapter.mapping.engine import MappedRecord, Mapper  # noqa: E402
from adapter.mapping.run import Summary, run  # noqa: E402
from adapter.mapping.spec import MappingSpec, load  # noqa: E402

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
