"""Deterministic resource ids: the same business identity always gives the same id.

Ids are uuid5 (RFC 9562 section 5.5) of the resource type and its business identity, the search that
finds it by identifier (``identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018``). So mapping the
same record twice, or the same person from two mappings (a referral export and a GP Connect record),
gives the same ``Patient`` id, and re-ingesting changes nothing (``../shared/style.md`` rule 5, after
Microsoft FHIR-Converter's ``generate_uuid``).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from urllib.parse import quote

from adapter.search.query import escape

__all__ = ["NAMESPACE", "deterministic_id", "identity"]

#: The namespace of every id the mappings make (uuid5 of the project's canonical URL).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://sp-fhir-adapter.org/fhir")
_NAMESPACE_BYTES = NAMESPACE.bytes
# Text that neither the search escapes nor percent-encoding change (urllib's always-safe characters,
# none of them special to a search): most systems and values (URLs, NHS numbers, ODS codes).
_PLAIN_SYSTEM = re.compile(r"[A-Za-z0-9_.~:/-]*")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.~-]*")
# Plain text with slashes and spaces: only these two change, percent-encoded.
_PATH_VALUE = re.compile(r"[A-Za-z0-9_.~/ -]*")
# The first hex digit of a UUID's clock_seq_hi_and_reserved with the variant bits set to 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def identity(system: str, value: str) -> str:
    """The business identity of a resource with this identifier, as an ``identifier`` search
    (https://hl7.org/fhir/R4/search.html#token); also the resource's ``If-None-Exist``. Both parts
    are escaped for the search (a ``,`` in a value is not a second value) and percent-encoded for
    the query string (an ``&`` or ``+`` cannot change it)."""
    if not _PLAIN_SYSTEM.fullmatch(system):
        system = quote(escape(system), safe=":/")
    if not _PLAIN_VALUE.fullmatch(value):
        if _PATH_VALUE.fullmatch(value):
            # What quote(escape(value), safe="") gives for local ids such as "REF-1/consent".
            value = value.replace("/", "%2F").replace(" ", "%20")
        else:
            value = quote(escape(value), safe="")
    return f"identifier={system}|{value}"


def deterministic_id(type: str, key: str) -> str:
    """The id of the ``type`` resource whose business identity is ``key`` (usually :func:`identity`)."""
    # str(uuid.uuid5(NAMESPACE, name)) written from the SHA-1 digest's hex (RFC 9562 section 5.5):
    # the first 128 bits, the version nibble set to 5 and the variant's two top bits to 10, without
    # a UUID object or the namespace's bytes worked out on every call.
    hex = hashlib.sha1(_NAMESPACE_BYTES + f"{type}?{key}".encode()).hexdigest()
    variant = _VARIANT[hex[16]]
    return f"{hex[:8]}-{hex[8:12]}-5{hex[13:16]}-{variant}{hex[17:20]}-{hex[20:32]}"
