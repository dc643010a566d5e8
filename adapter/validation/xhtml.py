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
    data = text.encode("utf-8")
    if b"<!" in data:  # one scan where most divs have none; the quick path takes none of these
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            return "DOCTYPE and entity declarations are not allowed"
    elif _passes(data):
        return None
    return _problem(data)


class _NoTree:
    """A parser target with no callbacks: libxml2 checks the text is well-formed, builds nothing."""

    def close(self) -> None:
        return None


# lxml-stubs' ParserTarget lists every callback; lxml calls only those the target has
# (https://lxml.de/parsing.html#the-target-parser-interface).
_CHECK_ONLY = etree.XMLParser(
    target=_NoTree(),  # type: ignore[arg-type]
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    huge_tree=False,
    collect_ids=False,
)
# In a well-formed document every "<" starts markup ("<" is not allowed in text or attribute
# values), so these find every start tag's name (end tags start "</"; processing instructions
# give names that start "?", which are not allowed names).
_START_NAMES = re.compile(rb"<([^\s/>]+)")
# A whole tag, with ">" allowed inside its quoted attribute values.
_TAG = re.compile(rb"""<(?:[^>"']|"[^"]*"|'[^']*')*>""")
_XHTML_DEFAULT = re.compile(rb"""\sxmlns\s*=\s*(["'])http://www\.w3\.org/1999/xhtml\1""")
_CHARACTER_REFERENCE = re.compile(r"&(#[0-9]+|#x[0-9a-fA-F]+|lt|gt|amp|quot|apos);")
_ALLOWED_NAMES = frozenset(name.encode("ascii") for name in _ALLOWED)


def _passes(data: bytes) -> bool:
    """Whether the div (UTF-8, without ``<!``) certainly satisfies txt-1 and txt-2, decided
    without building a tree: libxml2 checks that it is well-formed and the text itself gives the
    rest. False hands it to :func:`_problem`, which decides with lxml's tree and says what is
    wrong. On the 58 MB of narrative in the R4 examples this takes 0.4 s, the tree and the tags
    read from it 0.8 s (#2). The text is scanned as bytes, a little faster than as str, and as few
    times as can be: these scans took as long as the parse.

    Certain only for the plain case: no prefixed element, one namespace declaration (the root's,
    ``xmlns="http://www.w3.org/1999/xhtml"``, so every element is in it), no comment, CDATA
    section (``<!``, left out by the caller) or processing instruction (so everything outside
    tags is text), no ``xml:id`` (only the tree path checks their values), nothing that looks
    like an event attribute, and nothing that looks like a prefixed attribute (``x:y="1"``):
    without a tree libxml2 reports neither a prefix that is not declared nor a malformed
    qualified name, which the tree path refuses ("Namespace prefix x for y on td is not
    defined", "Failed to parse QName 'class:'")."""
    if data.count(b"xml") != 1 and (data.count(b"xmlns") != 1 or b"xml:id" in data):
        return False
    if _EVENT.search(data) or _PREFIXED_ATTRIBUTE.search(data):
        return False
    names = _START_NAMES.findall(data)
    if not names or names[0] != b"div" or not _ALLOWED_NAMES.issuperset(names):
        return False
    root = _TAG.match(data, data.index(b"<"))
    if root is None or _XHTML_DEFAULT.search(root.group()) is None:
        return False
    try:
        etree.fromstring(data, _CHECK_ONLY)
    except etree.XMLSyntaxError:
        return False
    return _has_text(data, root.end())


def _has_text(data: bytes, start: int) -> bool:
    """txt-2 on a well-formed div without comments, CDATA or processing instructions: whether some
    text between its tags is not whitespace (str.strip(), as the tree path: a no-break space is
    blank). Stops at the first such text, which is nearly always in the first few tags."""
    for tag in _TAG.finditer(data, start):
        between = data[start : tag.start()].decode("utf-8")
        if "&" in between:
            between = _CHARACTER_REFERENCE.sub(_character, between)
        if between.strip():
            return True
        start = tag.end()
    return False


_PREDEFINED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


def _character(match: re.Match[str]) -> str:
    name = match.group(1)
    if name[0] != "#":
        return _PREDEFINED[name]
    code = int(name[2:], 16) if name[1] == "x" else int(name[1:])
    return chr(code)


def _problem(data: bytes) -> str | None:
    """What is wrong with the div (UTF-8), from lxml's tree (None: nothing)."""
    try:
        root = etree.fromstring(data, _PARSER if b"xml:id" in data else _PARSER_NO_IDS)
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
    if _EVENT.search(data):
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
_EVENT = re.compile(rb"on[a-z]*\s*=")
# A prefixed attribute name and its "=", the name after the colon possibly empty ("class:=", which
# the tree path refuses as a QName). Text such as "weight:BSA =" matches too: a hint, the tree
# decides. Starting with ":" lets the regex engine scan at C speed (0.04 s over the 58 MB).
_PREFIXED_ATTRIBUTE = re.compile(rb":[\w.\-]*\s*=")
