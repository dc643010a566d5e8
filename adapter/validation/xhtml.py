"""Narrative XHTML checks: the R4 invariants txt-1 and txt-2 on ``Narrative.div``.

https://hl7.org/fhir/R4/narrative.html#xhtml: the div contains only basic HTML formatting
elements and attributes (HTML 4.0 chapters 7-11 and 15, ``<a>``, images, internal ``style``),
no active content (scripts, forms, event attributes), and some non-whitespace content.
fhirpathpy has no ``htmlChecks()``, so these two invariants are evaluated here, natively.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lxml import etree

XHTML = "http://www.w3.org/1999/xhtml"
_ALLOWED = frozenset(
    [
        "a",
        "abbr",
        "acronym",
        "address",
        "b",
        "bdo",
        "big",
        "blockquote",
        "br",
        "caption",
        "cite",
        "code",
        "col",
        "colgroup",
        "dd",
        "del",
        "dfn",
        "div",
        "dl",
        "dt",
        "em",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "i",
        "img",
        "ins",
        "kbd",
        "li",
        "map",
        "area",
        "ol",
        "p",
        "pre",
        "q",
        "s",
        "samp",
        "small",
        "span",
        "strike",
        "strong",
        "sub",
        "sup",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "tt",
        "u",
        "ul",
        "var",
        "font",
        "center",
        "dir",
        "menu",
    ]
)
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
# The same without the table of xml:id values, which costs a third of the parse on the R4 narratives
# (#2). Without a DTD only xml:id attributes are IDs, and libxml2 checks their values only when it
# collects them ("xml:id : attribute value 1 2 is not an NCName"), so a div that mentions xml:id
# goes to _PARSER.
_PARSER_NO_IDS = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, collect_ids=False
)


@lru_cache(maxsize=4096)
def check_xhtml(text: str) -> str | None:
    """Return a one-line problem, or None when the div satisfies txt-1 and txt-2."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        return "DOCTYPE and entity declarations are not allowed"
    try:
        root = etree.fromstring(text.encode("utf-8"), _PARSER if "xml:id" in text else _PARSER_NO_IDS)
    except etree.XMLSyntaxError as exc:
        return f"not well-formed XHTML ({exc.msg})"
    if root.tag != f"{{{XHTML}}}div":
        return 'the root element must be an xhtml div (xmlns="http://www.w3.org/1999/xhtml")'
    # Collect the distinct tags in one C-level pass; look for event attributes in the text first
    # (cheap), confirming on the tree only when the text suggests one.
    tags = {element.tag for element in root.iter(etree.Element)}
    bad = tags - _ALLOWED_TAGS
    if bad:
        return f"element <{etree.QName(min(bad)).localname}> is not allowed in narrative (txt-1)"
    if _EVENT_TEXT.search(text):
        for element in root.iter(etree.Element):
            for name in element.attrib:
                if etree.QName(name).localname.lower().startswith("on"):
                    return f"event attribute '{etree.QName(name).localname}' is not allowed in narrative (txt-1)"
    if not any(part.strip() for part in root.itertext()) and f"{{{XHTML}}}img" not in tags:
        return "the narrative has no content (txt-2)"
    return None


_ALLOWED_TAGS = frozenset(f"{{{XHTML}}}{name}" for name in _ALLOWED)
# Starts with a literal so that the regex engine scans for "on" at C speed; XHTML attribute names
# are lower case. A match is only a hint: the tree decides.
_EVENT_TEXT = re.compile(r"on[a-z]*\s*=")
