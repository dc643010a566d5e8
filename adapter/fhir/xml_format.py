"""FHIR R4 XML: parsing to, and serialising from, the same dicts as :mod:`adapter.fhir.json_format`.

See https://hl7.org/fhir/R4/xml.html. The codec is driven by the compiled R4 model
(:mod:`adapter.fhir.model`): each element's definition says whether it is a primitive (``value``
attribute, with ``id`` and extensions going to ``_name`` in JSON,
https://hl7.org/fhir/R4/json.html#primitive), an XML attribute (``representation = xmlAttr``:
``Element.id``, ``Extension.url``), a complex element, a contained resource (wrapped in an element
named after its type) or the XHTML narrative ``div`` (a string in JSON). Elements whose ``max`` is
not 1 are always JSON arrays; output follows the order of the R4 definitions.

Parsing is hardened: lxml without entity resolution, network, DTD loading or huge-tree mode; any
DOCTYPE is refused before the parser sees the document (:class:`UnsafeXmlError`), and size and
depth are capped (:class:`InputTooLargeError`). Comments and processing instructions are ignored
in FHIR content and kept inside the narrative XHTML.

Narrative ``div`` strings are written in the style of the FHIR reference implementation's XHTML
composer (unprefixed XHTML, ``&quot;`` in text, empty elements as ``<br/>``), the form the official
JSON examples use, so that JSON -> XML -> JSON gives back the exact string. The XML parser folds
CR/LF and white space in attribute values, so :func:`dumps` writes those as character references.

:func:`dumps` writes the XML text directly (escaping each value once) rather than building an lxml
tree: element creation dominates the cost of a tree, and the output is the same.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from operator import attrgetter
from typing import Any, NoReturn

from lxml import etree

from adapter.errors import AdapterError, InputTooLargeError, ParseError, UnknownTypeError, UnsafeXmlError
from adapter.fhir.model import Child, Context, context_for, is_resource_type, type_model

__all__ = ["FHIR_NS", "MAX_BYTES", "MAX_DEPTH", "XHTML_NS", "dumps", "loads"]

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

#: Largest document accepted by :func:`loads`, in bytes (UTF-8).
MAX_BYTES = 50 * 1024 * 1024
#: Deepest element nesting accepted (FHIR content and narrative XHTML together).
MAX_DEPTH = 120

_F = "{" + FHIR_NS + "}"
_X = "{" + XHTML_NS + "}"
_XML = "{" + XML_NS + "}"
_XSI = "{" + XSI_NS + "}"
_EXTENSION_TAG = _F + "extension"
_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'

# What an element becomes in XML.
_ATTRIBUTE, _PRIMITIVE, _COMPLEX, _RESOURCE, _XHTML = range(5)

# libxml2 reports its own size and depth limits (huge_tree=False) with this error code.
_ERR_RESOURCE_LIMIT = 114


# --------------------------------------------------------------------------------------------
# The model, cached per context: XML tag / attribute / JSON key -> slot
# --------------------------------------------------------------------------------------------


class _Slot:
    """One child of a context as the codec needs it, with its content node resolved lazily."""

    __slots__ = ("_child", "_node", "ext_key", "index", "json_kind", "kind", "name", "repeats", "tag")

    def __init__(self, child: Child, index: int) -> None:
        self._child = child
        self._node: _Node | None = None
        self.name = child.name
        self.ext_key = "_" + child.name
        self.index = index
        self.repeats = child.element.repeats
        self.json_kind = ""
        if child.type_code == "xhtml":
            self.kind, self.tag = _XHTML, _X + child.name
        elif "xmlAttr" in (child.element.raw.get("representation") or ()):
            self.kind, self.tag = _ATTRIBUTE, child.name
        elif child.is_resource:
            self.kind, self.tag = _RESOURCE, _F + child.name
        elif child.is_primitive:
            self.kind, self.tag = _PRIMITIVE, _F + child.name
            self.json_kind = type_model(child.type_code).json_kind or "string"
        else:
            self.kind, self.tag = _COMPLEX, _F + child.name

    @property
    def node(self) -> _Node:
        """The content of a complex child."""
        node = self._node
        if node is None:
            node = self._node = _node_for(self._child.context())
        return node


class _Node:
    """Lookups for one context: element tags, attribute names and JSON keys to slots."""

    __slots__ = ("attributes", "by_key", "by_tag", "label")

    def __init__(self, context: Context) -> None:
        self.label = context.path
        self.by_tag: dict[str, _Slot] = {}
        self.attributes: dict[str, _Slot] = {}
        self.by_key: dict[str, _Slot] = {}
        for index, child in enumerate(context.children.values()):
            slot = _Slot(child, index)
            self.by_key[slot.name] = slot
            if slot.kind == _ATTRIBUTE:
                self.attributes[slot.tag] = slot
            else:
                self.by_tag[slot.tag] = slot
            if slot.kind in (_PRIMITIVE, _ATTRIBUTE):  # "_url" is refused by name when writing
                self.by_key[slot.ext_key] = slot


_NODES: dict[tuple[str, str], _Node] = {}
_NODES_LOCK = threading.Lock()


def _node_for(context: Context) -> _Node:
    key = (context.type.name, context.path)
    node = _NODES.get(key)
    if node is None:
        with _NODES_LOCK:
            node = _NODES.get(key)
            if node is None:
                node = _NODES[key] = _Node(context)
    return node


_RESOURCE_NODES: dict[str, _Node] = {}


def _resource_node(resource_type: str) -> _Node | None:
    """The node of a concrete R4 resource type; None for anything else (datatypes included)."""
    node = _RESOURCE_NODES.get(resource_type)
    if node is None and is_resource_type(resource_type):
        node = _RESOURCE_NODES[resource_type] = _node_for(context_for(resource_type))
    return node


def _extension_node() -> _Node:
    node = _NODES.get(("Extension", "Extension"))
    return node if node is not None else _node_for(context_for("Extension"))


_slot_index = attrgetter("index")


# --------------------------------------------------------------------------------------------
# Parsing: size, DOCTYPE and depth limits
# --------------------------------------------------------------------------------------------

_PARSERS = threading.local()
_XPATH_NS = {"f": FHIR_NS}
# Text directly inside a FHIR element (XHTML text has XHTML parents): one pass in C per document.
_HAS_TEXT = etree.XPath("boolean(//f:*/text()[normalize-space()])", namespaces=_XPATH_NS)
_FIRST_TEXT = etree.XPath("(//f:*/text()[normalize-space()])[1]", namespaces=_XPATH_NS)
_DEEPER_THAN: dict[int, etree.XPath] = {}


def _parser() -> etree.XMLParser:
    # lxml parsers must not be shared between threads.
    parser: etree.XMLParser | None = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            encoding="utf-8",
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,
            collect_ids=False,
        )
        _PARSERS.parser = parser
    return parser


def _as_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        if len(data) > MAX_BYTES:
            raise InputTooLargeError(f"XML document larger than {MAX_BYTES:,} bytes")
        try:
            data = data.removeprefix("\ufeff").encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParseError(f"XML text has an unpaired surrogate at offset {exc.start}") from exc
    elif isinstance(data, bytearray | memoryview):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise ParseError(f"XML input must be bytes or str, not {type(data).__name__}")
    if len(data) > MAX_BYTES:
        raise InputTooLargeError(f"XML document larger than {MAX_BYTES:,} bytes")
    return data


def _refuse_doctype(data: bytes) -> None:
    """Refuse a DOCTYPE (internal subset, entity declarations, external DTD) before parsing.

    A DOCTYPE can only stand in the prolog: after the XML declaration, comments, processing
    instructions and white space. Anything else there starting with ``<!`` is refused as well.
    """
    pos = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    end = len(data)
    while pos < end:
        while pos < end and data[pos] in b" \t\r\n":
            pos += 1
        if data.startswith(b"<?", pos):
            close = data.find(b"?>", pos + 2)
            pos = end if close < 0 else close + 2
        elif data.startswith(b"<!--", pos):
            close = data.find(b"-->", pos + 4)
            pos = end if close < 0 else close + 3
        elif data.startswith(b"<!", pos):
            raise UnsafeXmlError(
                "XML with a DOCTYPE is not accepted (DTDs and entity declarations are refused; "
                "nothing was expanded or fetched)"
            )
        else:
            return


def _parse(data: bytes) -> etree._Element:
    _refuse_doctype(data)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise _syntax_error(exc) from exc
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None or docinfo.doctype:
        raise UnsafeXmlError("XML with a DOCTYPE is not accepted")
    return root


def _syntax_error(exc: etree.XMLSyntaxError) -> AdapterError:
    message = (exc.msg or "unreadable XML").strip()
    line, column = exc.position
    cut = message.rfind(", line ")
    if cut > 0 and message.endswith(f"column {column}"):
        message = message[:cut]
    where = f"line {line} column {column}"
    if getattr(exc, "code", None) == _ERR_RESOURCE_LIMIT:
        return InputTooLargeError(f"XML over a parser limit: {message} at {where}")
    return ParseError(f"not well-formed XML: {message} at {where}")


def _deeper_than(el: etree._Element, levels: int) -> bool:
    """Whether ``el`` has element descendants ``levels`` below it (an XPath run in C)."""
    if levels < 1:
        return True
    xpath = _DEEPER_THAN.get(levels)
    if xpath is None:
        xpath = _DEEPER_THAN[levels] = etree.XPath("boolean(" + "/".join(["*"] * levels) + ")")
    return bool(xpath(el))


# --------------------------------------------------------------------------------------------
# XML -> JSON
# --------------------------------------------------------------------------------------------


def loads(data: bytes | str) -> dict[str, Any]:
    """Parse a FHIR XML resource into the dict that the JSON form would parse to."""
    root = _parse(_as_bytes(data))
    tag = root.tag
    if not isinstance(tag, str) or not tag.startswith(_F):
        raise ParseError(f"root element {_local(root)!r} is not in the FHIR namespace {FHIR_NS}")
    keys: list[str] = root.keys()  # type: ignore[assignment]
    for key in keys:
        if key.startswith(_XSI):  # xsi:schemaLocation on the root is common and says nothing
            del root.attrib[key]
    result = _read_resource(root, 1)
    if _HAS_TEXT(root):  # after reading, so that unknown elements are reported as such
        _refuse_text(root)
    return result


def _refuse_text(root: etree._Element) -> NoReturn:
    results: Any = _FIRST_TEXT(root)
    found = results[0]
    holder = found.getparent()
    if found.is_tail:
        holder = holder.getparent()
    _fail_at(holder, f"unexpected text {_snippet(str(found))!r}")


def _read_resource(el: etree._Element, depth: int) -> dict[str, Any]:
    tag = el.tag
    resource_type = tag[len(_F) :] if isinstance(tag, str) and tag.startswith(_F) else None
    node = _resource_node(resource_type) if resource_type else None
    if resource_type is None or node is None:
        _fail_at(el, f"unknown resource type {_local(el)!r}", UnknownTypeError, self_path=False)
    result: dict[str, Any] = {"resourceType": resource_type}
    _read_complex(el, node, result, depth)
    return result


def _read_complex(el: etree._Element, node: _Node, result: dict[str, Any], depth: int) -> None:
    """Fill ``result`` with the attributes and child elements of ``el``."""
    if depth > MAX_DEPTH:
        _too_deep(el)
    attributes: list[tuple[str, str]] = el.items()  # type: ignore[assignment]
    for key, value in attributes:
        slot = node.attributes.get(key)
        if slot is None:
            _fail_at(el, f"unknown attribute {_clark_name(key)!r}")
        result[slot.name] = value
    arrays: dict[str, tuple[list[Any], list[Any]]] | None = None
    by_tag = node.by_tag
    for child in el:
        slot = by_tag.get(child.tag)
        if slot is None:
            if isinstance(child.tag, str):
                _fail_at(el, f"unknown element {_clark_name(child.tag)!r}")
            continue  # comment or processing instruction
        kind = slot.kind
        name = slot.name
        if kind == _PRIMITIVE:
            value, extra = _read_primitive(child, slot, depth + 1)
            if slot.repeats:
                if arrays is None:
                    arrays = {}
                pair = arrays.get(name)
                if pair is None:
                    pair = arrays[name] = ([], [])
                    result[name], result[slot.ext_key] = pair
                pair[0].append(value)
                pair[1].append(extra)
                continue
            if name in result or slot.ext_key in result:
                _fail_at(child, f"element {name!r} repeated", self_path=False)
            if value is not None:
                result[name] = value
            if extra is not None:
                result[slot.ext_key] = extra
            continue
        item: dict[str, Any] | str
        if kind == _COMPLEX:
            item = {}
            _read_complex(child, slot.node, item, depth + 1)
        elif kind == _RESOURCE:
            item = _read_contained(child, depth + 1)
        else:
            item = _read_xhtml(child, depth + 1)
        if slot.repeats:
            found = result.get(name)
            if found is None:
                result[name] = [item]
            else:
                found.append(item)
        elif name in result:
            _fail_at(child, f"element {name!r} repeated", self_path=False)
        else:
            result[name] = item
    if arrays:
        _align_primitive_arrays(arrays, result)


def _align_primitive_arrays(arrays: dict[str, tuple[list[Any], list[Any]]], result: dict[str, Any]) -> None:
    # https://hl7.org/fhir/R4/json.html#primitive: each of the two arrays is written only when it
    # holds something, with null where an entry has no value (or no id/extension).
    for name, (values, extras) in arrays.items():
        if all(value is None for value in values):
            del result[name]
        if all(extra is None for extra in extras):
            del result["_" + name]


def _read_primitive(el: etree._Element, slot: _Slot, depth: int) -> tuple[Any, dict[str, Any] | None]:
    """A primitive element as its JSON value and its ``_name`` object (id, extension)."""
    value: Any = None
    extra: dict[str, Any] | None = None
    attributes: list[tuple[str, str]] = el.items()  # type: ignore[assignment]
    for key, text in attributes:
        if key == "value":
            value = text if slot.json_kind == "string" else _convert(text, slot.json_kind, el)
        elif key == "id":
            extra = {"id": text}
        else:
            _fail_at(el, f"unknown attribute {_clark_name(key)!r}")
    if len(el):
        extensions = _read_primitive_extensions(el, depth)
        if extensions:
            if extra is None:
                extra = {}
            extra["extension"] = extensions
    if value is None and extra is None:
        _fail_at(el, "element has no value, id or extension")
    return value, extra


def _read_primitive_extensions(el: etree._Element, depth: int) -> list[dict[str, Any]]:
    extensions: list[dict[str, Any]] = []
    node = _extension_node()
    for child in el:
        if child.tag == _EXTENSION_TAG:
            extension: dict[str, Any] = {}
            _read_complex(child, node, extension, depth + 1)
            extensions.append(extension)
        elif isinstance(child.tag, str):
            _fail_at(el, f"unknown element {_clark_name(child.tag)!r}")
    return extensions


def _convert(text: str, json_kind: str, el: etree._Element) -> Any:
    """A ``value`` attribute as its JSON value (https://hl7.org/fhir/R4/json.html#primitive)."""
    if json_kind == "boolean":
        if text == "true":
            return True
        if text == "false":
            return False
    elif json_kind == "integer":
        digits = text[1:] if text.startswith("-") else text
        if digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0"):
            return int(text)
    elif json_kind == "decimal":
        number = _decimal(text)
        if number is not None:
            return number
    else:
        return text
    _fail_at(el, f"value {_snippet(text)!r} is not a valid {json_kind}")


def _decimal(text: str) -> Decimal | None:
    # Decimal() alone also takes " 1", "1_000", "NaN" and "Infinity"; FHIR decimals are JSON numbers.
    if not text or text.strip("0123456789.-+eE") or text[0] == "+":
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _read_contained(el: etree._Element, depth: int) -> dict[str, Any]:
    """A wrapper element (``contained``, ``resource``, ``outcome``) holding one resource."""
    keys: list[str] = el.keys()  # type: ignore[assignment]
    if keys:
        _fail_at(el, f"unknown attribute {_clark_name(keys[0])!r}")
    found: etree._Element | None = None
    for child in el:
        if not isinstance(child.tag, str):
            continue
        if found is not None:
            _fail_at(el, "more than one resource in one element")
        found = child
    if found is None:
        _fail_at(el, "element holds no resource")
    return _read_resource(found, depth + 1)


# XHTML narrative -> string, in the style of the FHIR reference implementation's composer.

_TEXT_WITH_QUOTE = re.compile(r'>[^<"]*"[^<]*')
_FOLDED_REFERENCES = (("&#13;", "\r"), ("&#10;", "\n"), ("&#9;", "\t"))


def _read_xhtml(el: etree._Element, depth: int) -> str:
    if _deeper_than(el, MAX_DEPTH - depth):
        _too_deep(el)
    if len(el.nsmap) == 1:
        text = etree.tostring(el, encoding="unicode", with_tail=False)
        if text.count("xmlns") == 1 and "<!--" not in text and "<?" not in text:
            return _composer_style(text)
    out: list[str] = []
    try:
        _write_xhtml_element(el, out, root=True)
    except _NotPlainXhtml:
        return _xhtml_with_lxml(el)
    return "".join(out)


def _composer_style(text: str) -> str:
    """lxml's serialisation of plain XHTML, adjusted to the reference implementation's style.

    In lxml's output ``<`` and ``>`` are always markup (values and text have ``&lt;``/``&gt;``),
    so ``>...<`` runs are text: there ``"`` becomes ``&quot;``. Character references for CR, LF
    and tab (lxml writes them in attribute values, and CR in text) become the characters again.
    """
    if "&#" in text:
        for reference, char in _FOLDED_REFERENCES:
            text = text.replace(reference, char)
    if '"' in text:
        text = _TEXT_WITH_QUOTE.sub(_quote_text, text)
    return text


def _quote_text(match: re.Match[str]) -> str:
    return match.group().replace('"', "&quot;")


class _NotPlainXhtml(Exception):
    """The narrative has elements or attributes in other namespaces."""


def _write_xhtml_element(el: etree._Element, out: list[str], root: bool = False) -> None:
    """The composer style written node by node: for comments and extra namespace declarations."""
    tag = el.tag
    if not isinstance(tag, str):
        out.append(_xhtml_special(el))
    elif tag.startswith(_X):
        name = tag[len(_X) :]
        out.append(f'<{name} xmlns="{XHTML_NS}"' if root else "<" + name)
        attributes: list[tuple[str, str]] = el.items()  # type: ignore[assignment]
        for key, value in attributes:
            if key.startswith("{"):
                if not key.startswith(_XML):
                    raise _NotPlainXhtml
                key = "xml:" + key[len(_XML) :]
            out.append(f' {key}="{_escape_text(value)}"')
        text = el.text
        if not text and not len(el):
            out.append("/>")
        else:
            out.append(">")
            if text:
                out.append(_escape_text(text))
            for child in el:
                _write_xhtml_element(child, out)
            out.append("</" + name + ">")
    else:
        raise _NotPlainXhtml
    tail = el.tail
    if tail and not root:
        out.append(_escape_text(tail))


def _xhtml_special(el: etree._Element) -> str:
    if isinstance(el, etree._Comment):
        return f"<!--{el.text or ''}-->"
    if isinstance(el, etree._ProcessingInstruction):
        target = str(el.target)
        return f"<?{target} {el.text}?>" if el.text else f"<?{target}?>"
    raise _NotPlainXhtml


def _xhtml_with_lxml(el: etree._Element) -> str:
    """XHTML with other namespaces (SVG, MathML): lxml's form, without unused declarations."""
    copy = etree.fromstring(etree.tostring(el, with_tail=False), _parser())
    etree.cleanup_namespaces(copy)
    return etree.tostring(copy, encoding="unicode", with_tail=False)


def _escape_text(text: str) -> str:
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if '"' in text:
        text = text.replace('"', "&quot;")
    return text


# Error locations for XML input: a FHIRPath-like path computed only when something fails.


def _fail_at(
    el: etree._Element, message: str, error: type[AdapterError] = ParseError, *, self_path: bool = True
) -> NoReturn:
    """Raise ``error`` located at ``el`` (``self_path``) or at ``el``'s parent."""
    path = _xml_path(el if self_path else el.getparent())
    line = f" (line {el.sourceline})" if el.sourceline else ""
    if path:
        raise error(f"{message} at {path}{line}", expression=path)
    raise error(f"{message}{line}")


def _too_deep(el: etree._Element) -> NoReturn:
    raise InputTooLargeError(f"XML nested deeper than {MAX_DEPTH} levels (line {el.sourceline})")


def _xml_path(el: etree._Element | None) -> str:
    """``Patient.name[0].given[1]`` for an element, following the model from the root down."""
    if el is None:
        return ""
    chain = [el, *el.iterancestors()]
    chain.reverse()
    parts: list[str] = []
    node: _Node | None = None
    for item in chain:
        local = _local(item)
        if not parts:
            parts.append(local)
            node = _resource_node(local)
            continue
        slot = node.by_tag.get(item.tag) if node is not None else None
        if slot is None:
            if node is None and is_resource_type(local):  # the resource inside a wrapper element
                node = _resource_node(local)
            else:
                parts.append(local)
                node = None
            continue
        part = slot.name
        if slot.repeats:
            part += f"[{sum(1 for _ in item.itersiblings(item.tag, preceding=True))}]"
        parts.append(part)
        node = slot.node if slot.kind == _COMPLEX else _extension_node() if slot.kind == _PRIMITIVE else None
    return ".".join(parts)


def _local(el: etree._Element) -> str:
    tag = el.tag
    return etree.QName(tag).localname if isinstance(tag, str) else "?"


def _clark_name(key: str) -> str:
    if key.startswith(_F):
        return key[len(_F) :]
    return key


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# JSON -> XML
# --------------------------------------------------------------------------------------------


class _Fault(Exception):
    """A problem in the JSON being written; each level adds its step to the path on the way out."""

    def __init__(self, message: str, error: type[AdapterError] = ParseError) -> None:
        super().__init__(message)
        self.message = message
        self.error = error
        #: Path steps, innermost first: property names and ``[index]``.
        self.steps: list[str] = []
        #: Set while the fault comes from a primitive's ``_name`` object.
        self.in_extra = False

    def path(self) -> str:
        path = ""
        for step in reversed(self.steps):
            path += step if step.startswith("[") or not path else "." + step
        return path


def dumps(resource: dict[str, Any], *, pretty: bool = False) -> bytes:
    """Serialise a FHIR resource dict as FHIR XML (UTF-8 bytes with an XML declaration)."""
    if not isinstance(resource, dict):
        raise ParseError(f"a FHIR resource must be a JSON object, not {type(resource).__name__}")
    out = [_DECLARATION] if pretty else [_DECLARATION, "\n"]
    try:
        _write_resource(out, resource, "\n" if pretty else "", f' xmlns="{FHIR_NS}"', 1)
    except _Fault as fault:
        if not fault.steps:  # the resource itself: no resourceType, or an unknown one
            raise fault.error(fault.message) from None
        fault.steps.append(str(resource.get("resourceType")))
        path = fault.path()
        raise fault.error(f"{fault.message} at {path}", expression=path) from None
    if pretty:
        out.append("\n")
    return "".join(out).encode("utf-8")


# Each writer appends the XML of one element (with its leading indent when pretty) to ``out``.


def _write_resource(out: list[str], data: Any, indent: str, xmlns: str, depth: int) -> None:
    if not isinstance(data, dict):
        raise _Fault(f"expected a resource object, found {_json_kind(data)}")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise _Fault("resource has no resourceType")
    node = _resource_node(resource_type)
    if node is None:
        raise _Fault(f"unknown resource type {resource_type!r}", UnknownTypeError)
    _write_complex(out, resource_type, data, node, indent, depth, xmlns, skip="resourceType")


def _write_complex(
    out: list[str],
    name: str,
    data: dict[str, Any],
    node: _Node,
    indent: str,
    depth: int,
    xmlns: str = "",
    skip: str = "",
) -> None:
    """An element with the properties of ``data``, in the order of the R4 definition."""
    if depth > MAX_DEPTH:
        raise _Fault(f"nested deeper than {MAX_DEPTH} levels", InputTooLargeError)
    by_key = node.by_key
    slots: list[_Slot] = []
    for key in data:
        slot = by_key.get(key)
        if slot is None:
            if key == skip:
                continue
            raise _Fault(f"unknown property {key!r} in {node.label}")
        slots.append(slot)
    slots.sort(key=_slot_index)
    start = len(out)
    out.append("")  # the start tag, once the attributes are known
    attributes = xmlns
    inner = indent + "  " if indent else ""
    previous: _Slot | None = None
    for slot in slots:
        if slot is previous:  # "name" and "_name" of one primitive
            continue
        previous = slot
        try:
            if slot.kind == _ATTRIBUTE:
                attributes += _attribute(slot, data)
            else:
                _WRITERS[slot.kind](out, slot, data, inner, depth + 1)
        except _Fault as fault:
            fault.steps.append(slot.ext_key if fault.in_extra else slot.name)
            fault.in_extra = False
            raise
    _close(out, start, name, attributes, indent)


def _close(out: list[str], start: int, name: str, attributes: str, indent: str) -> None:
    if len(out) == start + 1:
        out[start] = f"{indent}<{name}{attributes}/>"
    else:
        out[start] = f"{indent}<{name}{attributes}>"
        out.append(f"{indent}</{name}>")


def _attribute(slot: _Slot, data: dict[str, Any]) -> str:
    if slot.ext_key in data:
        raise _Fault(f"{slot.ext_key!r} cannot be written: {slot.name!r} is an XML attribute")
    value = data.get(slot.name)
    if not isinstance(value, str):
        raise _Fault(f"expected a string, found {_json_kind(value)}")
    return f' {slot.name}="{_escape_value(value)}"'


def _write_primitive(out: list[str], slot: _Slot, data: dict[str, Any], indent: str, depth: int) -> None:
    value = data.get(slot.name)
    extra = data.get(slot.ext_key)
    if not slot.repeats:
        _write_one_primitive(out, slot, value, extra, indent, depth)
        return
    if value is not None and not isinstance(value, list):
        raise _Fault(f"expected an array, found {_json_kind(value)}")
    if extra is not None and not isinstance(extra, list):
        raise _Fault(f"expected an array in {slot.ext_key!r}, found {_json_kind(extra)}")
    if value is not None and extra is not None and len(value) != len(extra):
        raise _Fault(f"{slot.name!r} and {slot.ext_key!r} have different lengths")
    values = value if value is not None else [None] * len(extra or ())
    extras = extra if extra is not None else [None] * len(values)
    for index, (item, item_extra) in enumerate(zip(values, extras, strict=True)):
        try:
            _write_one_primitive(out, slot, item, item_extra, indent, depth)
        except _Fault as fault:
            fault.steps.append(f"[{index}]")
            raise


def _write_one_primitive(out: list[str], slot: _Slot, value: Any, extra: Any, indent: str, depth: int) -> None:
    if extra is None:
        if value is None:
            raise _Fault("null without a value, id or extension")
        out.append(f'{indent}<{slot.name} value="{_value_text(value, slot.json_kind)}"/>')
        return
    start = len(out)
    out.append("")
    try:
        attributes = _write_primitive_extra(out, slot, extra, indent, depth)
    except _Fault as fault:
        fault.in_extra = True
        raise
    if value is not None:
        attributes += f' value="{_value_text(value, slot.json_kind)}"'
    _close(out, start, slot.name, attributes, indent)


def _write_primitive_extra(out: list[str], slot: _Slot, extra: Any, indent: str, depth: int) -> str:
    """The ``_name`` object of a primitive: the ``id`` attribute it returns, and extension elements."""
    if not isinstance(extra, dict):
        raise _Fault(f"expected an object, found {_json_kind(extra)}")
    for key in extra:
        if key not in ("id", "extension"):
            raise _Fault(f"unknown property {key!r} in a primitive's {slot.ext_key!r}")
    attributes = ""
    id_ = extra.get("id")
    if id_ is not None:
        if not isinstance(id_, str):
            raise _Fault(f"expected a string id, found {_json_kind(id_)}")
        attributes = f' id="{_escape_value(id_)}"'
    extensions = extra.get("extension")
    if extensions is not None:
        try:
            _write_list(out, "extension", extensions, _extension_node(), indent + "  " if indent else "", depth)
        except _Fault as fault:
            fault.steps.append("extension")
            raise
    return attributes


def _write_list(out: list[str], name: str, items: Any, node: _Node, indent: str, depth: int) -> None:
    if not isinstance(items, list):
        raise _Fault(f"expected an array, found {_json_kind(items)}")
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise _Fault(f"expected an object, found {_json_kind(item)}")
            _write_complex(out, name, item, node, indent, depth)
        except _Fault as fault:
            fault.steps.append(f"[{index}]")
            raise


def _write_complex_slot(out: list[str], slot: _Slot, data: dict[str, Any], indent: str, depth: int) -> None:
    value = data[slot.name]
    if slot.repeats:
        _write_list(out, slot.name, value, slot.node, indent, depth)
    elif isinstance(value, dict):
        _write_complex(out, slot.name, value, slot.node, indent, depth)
    else:
        raise _Fault(f"expected an object, found {_json_kind(value)}")


def _write_resource_slot(out: list[str], slot: _Slot, data: dict[str, Any], indent: str, depth: int) -> None:
    """Resources inside a resource: each wrapped in an element named after the property."""
    value = data[slot.name]
    items = value if slot.repeats else [value]
    if slot.repeats and not isinstance(value, list):
        raise _Fault(f"expected an array, found {_json_kind(value)}")
    inner = indent + "  " if indent else ""
    for index, item in enumerate(items):
        out.append(f"{indent}<{slot.name}>")
        try:
            _write_resource(out, item, inner, "", depth + 1)
        except _Fault as fault:
            if slot.repeats:
                fault.steps.append(f"[{index}]")
            raise
        out.append(f"{indent}</{slot.name}>")


def _write_xhtml(out: list[str], slot: _Slot, data: dict[str, Any], indent: str, depth: int) -> None:
    value = data[slot.name]
    if not isinstance(value, str):
        raise _Fault(f"expected an XHTML string, found {_json_kind(value)}")
    div = _parse_xhtml(value)
    if _deeper_than(div, MAX_DEPTH - depth):
        raise _Fault(f"nested deeper than {MAX_DEPTH} levels", InputTooLargeError)
    out.append(indent + etree.tostring(div, encoding="unicode", with_tail=False))


def _parse_xhtml(text: str) -> etree._Element:
    data = _protect_whitespace(text).encode("utf-8", "surrogatepass")
    try:
        _refuse_doctype(data)
        div = etree.fromstring(data, _parser())
    except UnsafeXmlError as exc:
        raise _Fault("narrative XHTML has a DOCTYPE", UnsafeXmlError) from exc
    except etree.XMLSyntaxError as exc:
        raise _Fault(f"narrative is not well-formed XHTML: {_syntax_error(exc).message}") from exc
    if div.tag != _X + "div":
        raise _Fault(f"narrative must be an XHTML <div> in namespace {XHTML_NS}, found <{_local(div)}>")
    return div


# The XML parser turns CR (and CRLF) into LF everywhere, and tab, CR and LF inside attribute values
# into spaces; as character references they survive. Narratives holding CR, or white space inside
# an attribute value, are written with references so that XML -> JSON gives back the same string.
_ATTRIBUTE_WITH_WHITESPACE = re.compile(r"""=(\s*)("[^"<\t\r\n]*[\t\r\n][^"<]*"|'[^'<\t\r\n]*[\t\r\n][^'<]*')""")
_CR_IN_TEXT = re.compile(r"\r(?=[^<>]*(?:<|\Z))")
_CHARACTER_REFERENCES = {"\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}


def _protect_whitespace(text: str) -> str:
    if "\r" in text or (("\n" in text or "\t" in text) and "=" in text):
        text = _ATTRIBUTE_WITH_WHITESPACE.sub(_protect_attribute, text)
        if "\r" in text:
            text = _CR_IN_TEXT.sub("&#13;", text)
    return text


def _protect_attribute(match: re.Match[str]) -> str:
    value = match.group(2)
    for char, reference in _CHARACTER_REFERENCES.items():
        value = value.replace(char, reference)
    return "=" + match.group(1) + value


_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _escape_value(value: str) -> str:
    """``value`` for a double-quoted attribute; tab, CR and LF as references so that they survive."""
    if value.isprintable() and '"' not in value and "&" not in value and "<" not in value and ">" not in value:
        return value  # the common case: nothing to escape, nothing XML cannot hold
    bad = _NOT_XML_CHAR.search(value)
    if bad is not None:
        raise _Fault(f"value {_snippet(value)!r} has a character XML 1.0 cannot hold (U+{ord(bad.group()):04X})")
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return value.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")


def _value_text(value: Any, json_kind: str) -> str:
    """A JSON primitive as the text of a ``value`` attribute, escaped."""
    kind = type(value)
    if json_kind == "string":
        if kind is str:
            return _escape_value(value)
    elif json_kind == "boolean":
        if kind is bool:
            return "true" if value else "false"
    elif json_kind == "integer":
        if kind is int:
            return str(value)
    elif json_kind == "decimal":
        if (kind is Decimal and value.is_finite()) or kind is int:
            return str(value)
        if kind is float and value == value and abs(value) != float("inf"):
            return repr(value)
    raise _Fault(f"expected a {json_kind}, found {_json_kind(value)}")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {_snippet(value)!r}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_WRITERS: dict[int, Callable[[list[str], _Slot, dict[str, Any], str, int], None]] = {
    _PRIMITIVE: _write_primitive,
    _COMPLEX: _write_complex_slot,
    _RESOURCE: _write_resource_slot,
    _XHTML: _write_xhtml,
}
