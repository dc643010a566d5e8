"""Deterministic resource ids: the same business identity always gives the same id.

Ids are uuid5 (RFC 9562 section 5.5) of the resource type and its business identity, the search that
finds it by identifier (``identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018``). So mapping the
same record twice, or the same person from two mappings (a referral export and a GP Connect record),
gives the same ``Patient`` id, and re-ingesting changes nothing (``../shared/style.md`` rule 5, after
Microsoft FHIR-Converter's ``generate_uuid``).
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

from adapter.search.query import escape

__all__ = ["NAMESPACE", "deterministic_id", "identity"]

#: The namespace of every id the mappings make (uuid5 of the project's canonical URL).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://sp-fhir-adapter.org/fhir")


def identity(system: str, value: str) -> str:
    """The business identity of a resource with this identifier, as an ``identifier`` search
    (https://hl7.org/fhir/R4/search.html#token); also the resource's ``If-None-Exist``. Both parts
    are escaped for the search (a ``,`` in a value is not a second value) and percent-encoded for
    the query string (an ``&`` or ``+`` cannot change it)."""
    return f"identifier={quote(escape(system), safe=':/')}|{quote(escape(value), safe='')}"


def deterministic_id(type: str, key: str) -> str:
    """The id of the ``type`` resource whose business identity is ``key`` (usually :func:`identity`)."""
    return str(uuid.uuid5(NAMESPACE, f"{type}?{key}"))
