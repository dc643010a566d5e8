"""Structural validation of R4 resources against the compiled R4 model.

One recursive walk over the parsed JSON checks, per https://hl7.org/fhir/R4/validation.html:
unknown elements, JSON shape (arrays exactly where ``max`` > 1, no empty arrays or objects),
cardinality, primitive types and formats (the regexes of the R4 primitive StructureDefinitions),
choice types (one ``value[x]`` at most), ``resourceType``, contained resources and Bundle entries
(each validated as a resource, with issue paths such as ``Bundle.entry[3].resource.subject``),
reference format and target types, required bindings to ValueSets expanded from the R4 package,
and the R4 invariants of each element (FHIRPath; see :mod:`adapter.validation.invariants`).

Speed: each context (a type, or a backbone element inside one) is compiled once into a table of
:class:`_Spec` (one per JSON property name) so the walk does one dict lookup per property; issue
paths are kept as cheap ``(parent, segment)`` tuples and rendered only when an issue is raised.
Expressions are FHIRPath with indexes on repeating elements; choice elements are written
``Observation.value.ofType(Quantity)`` (https://hl7.org/fhir/R4/fhirpath.html#types).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import cache
from typing import Any

from adapter.fhir import model
from adapter.fhir.fhirpath import Env
from adapter.fhir.model import Child, Context, ElementDef
from adapter.validation.base import Issue
from adapter.validation.invariants import (
    Runner,
    checks_for,
    clear_memos,
    elements_for,
    elements_for_primitive,
    runner_for,
)
from adapter.validation.paths import Path, indexes, render
from adapter.validation.paths import index as at
from adapter.validation.xhtml import check_xhtml

__all__ = ["StructuralValidator"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_COMMENTS = "fhir_comments (comments in the pre-R4 JSON form) is not R4 content and is ignored"
PRIMITIVE, COMPLEX, RESOURCE = 0, 1, 2
#: Deepest nesting of JSON objects walked. Compiled (decision 0006), the walk's recursion is C
#: calls that Python's recursion limit does not count, and a dict nested 20,000 deep overflowed
#: the C stack: this limit stops the walk first, compiled or not, with the same issue. Real
#: resources nest a few dozen objects deep at most; the XML parser stops at 120 elements.
MAX_DEPTH = 200

# https://hl7.org/fhir/R4/references.html#literal
_RESOURCE_TYPE = r"[A-Z][A-Za-z]+"
_REFERENCE = re.compile(
    rf"(?:(?:https?://\S+/)?(?P<type>{_RESOURCE_TYPE})/[A-Za-z0-9\-.]{{1,64}}(?:/_history/[A-Za-z0-9\-.]{{1,64}})?"
    r"|#[A-Za-z0-9\-.]{0,64}|urn:uuid:[0-9a-fA-F-]{36}|urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+"
    r"|[a-z][a-z0-9+.-]*:\S+)"
)


# A subset of the valid codes: printable ASCII words joined by single spaces match R4's code regex
# and have no leading or trailing whitespace.
_CODE_FAST = re.compile(r"[!-~]+(?: [!-~]+)*")


# The same tests as the commonest R4 regexes, with str methods: a regex call costs 0.2-1 us on a
# typical value, these a tenth of that. With re.ASCII (see _regex), \s is [ \t\n\r\f\v], so
# "[ \r\n\t\S]+" (string, markdown) is "one or more characters, none \v or \f" and "\S*" (uri,
# url, canonical) is "no ASCII whitespace". tests/test_structure.py checks them against the regexes.
def _text_ok(value: str) -> bool:
    return value != "" and "\x0b" not in value and "\x0c" not in value


def _no_space_ok(value: str) -> bool:
    return (
        " " not in value
        and "\n" not in value
        and "\t" not in value
        and "\r" not in value
        and "\x0b" not in value
        and "\x0c" not in value
    )


def _code_ok(value: str) -> bool:
    """A subset of what _CODE_FAST matches: printable ASCII without spaces."""
    return value != "" and value.isascii() and value.isprintable() and " " not in value


_BASE64 = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/="
_ASCII_SPACE = b" \t\n\r\x0b\x0c"  # bytes.split() and re.ASCII's \s: the same six


def _base64_ok(value: str) -> bool:
    """R4's base64Binary regex, "(\\s*([0-9a-zA-Z\\+/=]){4}\\s*)+": groups of 4 alphabet characters,
    ASCII whitespace only between groups. On an attachment's data (tens of kilobytes) the regex
    takes milliseconds: 0.3 s of a 4.5 s pass over the R4 examples, for 47 values (#2)."""
    if not value.isascii():
        return False
    data = value.encode("ascii")
    rest = data.translate(None, _BASE64)
    if not rest:  # alphabet characters only, the common case
        return data != b"" and len(data) % 4 == 0
    if rest.translate(None, _ASCII_SPACE):
        return False  # a character that is neither
    runs = data.split()
    return bool(runs) and all(len(run) % 4 == 0 for run in runs)


#: R4 regex -> a test that accepts exactly the values it matches.
_STR_TESTS: dict[str, Callable[[str], bool]] = {
    r"[ \r\n\t\S]+": _text_ok,
    r"\S*": _no_space_ok,
    r"(\s*([0-9a-zA-Z\+/=]){4}\s*)+": _base64_ok,
}
# Primitive types whose required binding is checked on the string itself.
_CODED_STRINGS = ("code", "string", "uri")


@cache
def _regex(type_code: str) -> re.Pattern[str] | None:
    pattern = model.type_model(type_code).regex
    # FHIR's regexes follow XML Schema / Java, where \s and \S are ASCII-only: a no-break space
    # inside a string is text, not whitespace (https://hl7.org/fhir/R4/datatypes.html#string).
    return re.compile(pattern, re.ASCII) if pattern else None


class _Spec:
    """What the walk needs to know about one JSON property of a context."""

    __slots__ = (
        "binding",
        "checks",
        "child",
        "choice",
        "element",
        "fast",
        "fast_class",
        "json_kind",
        "key",
        "kind",
        "low",
        "max",
        "name",
        "plain",
        "prim_checks",
        "regex",
        "repeats",
        "segment",
        "table",
        "targets",
        "type_code",
        "value_set",
    )

    def __init__(self, child: Child) -> None:
        element = child.element
        self.child = child
        self.element = element
        self.key = child.name
        self.name = element.name
        self.choice = element.is_choice
        self.repeats = element.repeats
        self.max = element.max
        self.type_code = child.type_code
        self.segment = f".{element.name}.ofType({child.type_code})" if element.is_choice else f".{child.name}"
        if child.is_resource:
            self.kind = RESOURCE
        elif child.is_primitive:
            self.kind = PRIMITIVE
        else:
            self.kind = COMPLEX
        primitive = self.kind == PRIMITIVE
        self.json_kind = model.type_model(child.type_code).json_kind if primitive else None
        self.regex = _regex(child.type_code) if primitive else None
        binding = element.raw.get("binding")
        self.value_set: str | None = None
        self.binding: dict[str, frozenset[str]] | None = None
        if binding and binding["strength"] == "required":
            self.binding = model.value_set_codes(binding["valueSet"])
            self.value_set = binding["valueSet"]
        self.targets = _target_types(element) if child.type_code == "Reference" else None
        code = child.type_code
        self.low = 1 if code == "positiveInt" else 0 if code == "unsignedInt" else INT32_MIN
        # Invariants on a primitive element (eld-3) see the value, not an object: no absent-element
        # shortcut, but a memo per string value (see adapter.validation.invariants).
        self.prim_checks = (
            runner_for(checks_for(elements_for_primitive(element), None, primitive=True)) if primitive else None
        )
        # Of a complex element: its table (the context it holds) and its invariants, on first use.
        self.table: _Table | None = None
        self.checks: Runner | None = None
        # Fast path for the commonest values, a test that only accepts values the full path passes
        # without an issue (a value it rejects takes the full path): for a string primitive whose
        # only check is its regex (no invariant, not xhtml), the regex, or for codes (which also get
        # a whitespace check) a stricter one; for a string bound to a required ValueSet, membership
        # in the codes that also pass those checks; for a boolean or integer without invariants or
        # binding, its JSON type (and range). The test applies to values of class ``fast_class``.
        self.fast: Callable[[Any], object] | None = None
        self.fast_class: type = str
        regex = _CODE_FAST if code == "code" else self.regex
        if primitive and self.json_kind == "string" and code != "xhtml" and self.prim_checks is None and regex:
            if self.binding is None:
                self.fast = _code_ok if code == "code" else _STR_TESTS.get(regex.pattern, regex.fullmatch)
            elif code in _CODED_STRINGS:
                self.fast = frozenset(
                    c for codes in self.binding.values() for c in codes if regex.fullmatch(c)
                ).__contains__
        elif primitive and self.prim_checks is None and self.binding is None:
            if self.json_kind == "boolean":
                self.fast, self.fast_class = (True, False).__contains__, bool
            elif self.json_kind == "integer":
                self.fast, self.fast_class = range(self.low, INT32_MAX + 1).__contains__, int
        # A complex element with nothing to check but its content: the walk goes straight to it.
        self.plain = self.kind == COMPLEX and self.targets is None and self.binding is None

    def context(self) -> _Table:
        if self.table is None:
            ctx = self.child.context()
            table = _table(ctx)
            self.checks = runner_for(checks_for(elements_for(ctx, self.element), table.names))
            self.table = table  # set last: a spec with a table is complete
        return self.table


class _Table:
    """A compiled context: specs by JSON name, required elements, and context facts."""

    __slots__ = ("checks", "ctx", "is_extension", "names", "required", "specs")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.specs = {name: _Spec(child) for name, child in ctx.children.items()}
        # JSON property (also its _name part) -> element name: valueQuantity -> value
        self.names: dict[str, str] = {key: spec.name for key, spec in self.specs.items()}
        self.names.update({"_" + key: spec.name for key, spec in self.specs.items()})
        required: dict[str, list[str]] = {}
        for name, child in ctx.children.items():
            if child.element.min > 0:
                required.setdefault(child.element.name, []).append(name)
        self.required = tuple(
            (element, tuple(names) + tuple("_" + n for n in names), ctx.children[names[0]].element.min)
            for element, names in required.items()
        )
        self.is_extension = ctx.path == "Extension"
        self.checks = runner_for(checks_for(elements_for(ctx, None), self.names))


@cache
def _table(ctx: Context) -> _Table:
    return _Table(ctx)


def _target_types(element: ElementDef) -> frozenset[str] | None:
    """Resource types a Reference element may point to; None when any type is allowed."""
    targets: set[str] = set()
    for type_ in element.types:
        if type_["code"] == "Reference":
            for url in type_.get("targetProfile", []):
                name = url.rsplit("/", 1)[-1]
                if name == "Resource":
                    return None
                targets.add(name)
    return frozenset(targets) or None


class _Walk:
    """One validation run: collects issues while walking a resource."""

    __slots__ = ("depth", "env", "extended", "issues")

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.env: Env | None = None
        self.extended = False  # whether an Extension was walked
        self.depth = 0  # JSON objects being walked, this one included (MAX_DEPTH)

    def error(self, code: str, message: str, path: Path) -> None:
        self.issues.append(Issue("error", code, message, render(path)))

    # -- resources -------------------------------------------------------------------------
    def resource(self, node: Any, path: Path | None, root: Any) -> None:
        if not isinstance(node, dict):
            self.error("structure", "A resource must be a JSON object", path or "Resource")
            return
        rtype = node.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            self.error("required", "Missing resourceType: every resource names its type", path or "Resource")
            return
        if not model.is_resource_type(rtype):
            hint = " (abstract type)" if model.has_type(rtype) else ""
            self.error("structure", f"Unknown resource type '{rtype}'{hint}", path or rtype)
            return
        outer = self.env
        # %rootResource is the container for contained resources, else the resource itself
        # (https://hl7.org/fhir/R4/fhirpath.html#variables).
        self.env = Env(resource=node, root_resource=root if root is not None else node, resolve=_resolver(node))
        try:
            table = _table(model.context_for(rtype))
            self.complex(node, table, path or rtype, table.checks, True)
        finally:
            self.env = outer

    # -- complex elements ------------------------------------------------------------------
    def complex(
        self,
        node: Any,
        table: _Table,
        path: Path,
        checks: Runner | None,
        resource_root: bool = False,
    ) -> None:
        if node.__class__ is not dict:
            self.error("structure", f"Expected a JSON object for {table.ctx.type.name}", path)
            return
        if not node:
            self.error("structure", "Empty objects are not allowed in FHIR JSON", path)
            return
        if self.depth == MAX_DEPTH:
            raise RecursionError("nested deeper than MAX_DEPTH")  # reported by examine()
        self.depth += 1
        specs = table.specs
        choices: dict[str, str] | None = None
        extensions = False  # whether a _name property is present (see Runner.run_plain)
        for key, value in node.items():
            spec = specs.get(key)
            if spec is None:
                if key[:1] == "_":  # not key[0]: a JSON key may be empty
                    extensions = True
                    self.primitive_extras(key, value, specs, node, path)
                elif key == "fhir_comments":
                    # XML comments as JSON, a DSTU2 convention that converters still emit: no data, so
                    # a warning rather than an unknown element (HAPI's parser skips it too).
                    self.issues.append(Issue("warning", "informational", _COMMENTS, render((path, ".fhir_comments"))))
                    self.extended = True  # not walked: may hold anything
                elif not (resource_root and key == "resourceType"):
                    self.error("structure", f"Unknown element '{key}' in {table.ctx.path}", (path, "." + key))
                continue
            if spec.choice:
                if choices is None:
                    choices = {}
                other = choices.get(spec.name)
                if other is not None:
                    self.error(
                        "structure",
                        f"Only one of {other} and {key} may be present ({spec.name}[x] is a choice)",
                        (path, "." + spec.name),
                    )
                choices[spec.name] = key
            fast = spec.fast
            if fast is not None and value.__class__ is spec.fast_class and fast(value):
                if spec.repeats:
                    self.repeating(value, spec, (path, spec.segment))
                continue
            if spec.repeats:
                self.repeating(value, spec, (path, spec.segment))
                # null stands in an array only to align with the _name part that carries extensions
                if spec.kind == PRIMITIVE and value.__class__ is list and None in value and "_" + key not in node:
                    self.error("required", f"null in '{key}' without extensions in '_{key}'", (path, spec.segment))
            elif value is None:
                self.error("structure", f"null is not allowed for '{key}': omit the element", (path, spec.segment))
            elif value.__class__ is list:
                self.error("structure", f"'{key}' does not repeat: it must not be an array", (path, spec.segment))
            elif spec.plain:
                self.complex(value, spec.table or spec.context(), (path, spec.segment), spec.checks)
            else:
                self.item(value, spec, (path, spec.segment))
        for element_name, names, minimum in table.required:
            for name in names:
                if name in node:
                    break
            else:
                self.error(
                    "required",
                    f"Missing required element '{element_name}' (minimum cardinality {minimum})",
                    (path, "." + element_name),
                )
        if table.is_extension:
            self.extended = True
            has_value = False
            for key in node:  # a loop, not any() over a generator: half the time (#2)
                if key.startswith(("value", "_value")):
                    has_value = True
                    break
            if has_value == ("extension" in node):
                self.error("invariant", "ext-1: Must have either extensions or value[x], not both", path)
        elif len(node) == 1 and "id" in node:
            self.error("invariant", "ele-1: All FHIR elements must have a @value or children", path)
        self.depth -= 1
        if checks is not None and self.env is not None:
            (checks.run if extensions else checks.run_plain)(node, path, self.env, self.issues)

    def repeating(self, value: Any, spec: _Spec, path: Path) -> None:
        if value.__class__ is not list:
            self.error("structure", f"'{spec.key}' repeats: it must be a JSON array", path)
            return
        if not value:
            self.error("structure", f"Empty array for '{spec.key}': omit the element instead", path)
            return
        if spec.max is not None and len(value) > spec.max:
            self.error("structure", f"Too many '{spec.key}': {len(value)}, at most {spec.max}", path)
        fast = spec.fast
        fast_class = spec.fast_class
        if spec.plain:
            table = spec.table or spec.context()
            checks = spec.checks
            for segment, item in zip(indexes(len(value)), value, strict=False):
                self.complex(item, table, (path, segment), checks)
            return
        for segment, item in zip(indexes(len(value)), value, strict=False):
            if fast is not None and item.__class__ is fast_class and fast(item):
                continue
            self.item(item, spec, (path, segment))

    def item(self, value: Any, spec: _Spec, path: Path) -> None:
        kind = spec.kind
        if kind == PRIMITIVE:
            if value is not None:  # a null stands for "extension only"; checked with the _ part
                self.primitive(value, spec, path)
                if spec.prim_checks is not None and self.env is not None:  # on a primitive element (eld-3)
                    spec.prim_checks.run(value, path, self.env, self.issues)
        elif kind == COMPLEX:
            self.complex(value, spec.table or spec.context(), path, spec.checks)
            if spec.targets is not None and value.__class__ is dict:
                self.reference(value, spec, path)
        else:
            contained = spec.element.path.endswith(".contained")
            self.resource(value, path, self.env.resource if contained and self.env else None)
            return
        if spec.binding is not None:
            self.coded(value, spec, path)

    # -- primitives ------------------------------------------------------------------------
    def primitive(self, value: Any, spec: _Spec, path: Path) -> None:
        kind = spec.json_kind
        type_code = spec.type_code
        if kind == "string":
            if value.__class__ is not str:
                self.error("structure", f"Expected a JSON string for {type_code}, got {_show(value)}", path)
                return
            if type_code == "xhtml":
                self.xhtml(value, path)
                return
            regex = spec.regex
            if regex is not None and regex.fullmatch(value) is None:
                self.error("value", f"Invalid {type_code} value {_show(value)}", path)
            elif type_code == "code" and value != value.strip():
                self.error("value", f"Code {_show(value)} has leading or trailing whitespace", path)
        elif kind == "boolean":
            if value.__class__ is not bool:
                self.error("structure", f"Expected true or false for boolean, got {_show(value)}", path)
        elif kind == "integer":
            if value.__class__ is not int:
                self.error("structure", f"Expected a JSON integer for {type_code}, got {_show(value)}", path)
                return
            if not spec.low <= value <= INT32_MAX:
                self.error("value", f"{type_code} value {value} is out of range", path)
        elif value.__class__ is not Decimal and value.__class__ is not int:
            self.error("structure", f"Expected a JSON number for decimal, got {_show(value)}", path)

    def xhtml(self, value: str, path: Path) -> None:
        problem = check_xhtml(value)
        if problem:
            self.error("value", f"Invalid narrative xhtml: {problem}", path)

    def primitive_extras(self, key: str, value: Any, specs: dict[str, _Spec], node: Any, parent: Path) -> None:
        """The ``_name`` part of a primitive: id and extensions (https://hl7.org/fhir/R4/json.html#primitive)."""
        name = key[1:]
        spec = specs.get(name)
        if spec is None or spec.kind != PRIMITIVE:
            self.error("structure", f"Unknown element '{key}'", (parent, "." + key))
            return
        if spec.type_code == "xhtml":
            # The div's id is an attribute inside the xhtml, and xhtml has no extensions (max 0).
            self.error("structure", f"Unknown element '{key}': narrative xhtml has no '_' part", (parent, "." + key))
            return
        table = _table(model.context_for(spec.type_code))
        path: Path = (parent, spec.segment)
        main = node.get(name)
        if not spec.repeats:
            if value.__class__ is list:
                self.error("structure", f"'{key}' does not repeat: it must not be an array", path)
            else:
                self.extras(value, table, path)
            return
        if value.__class__ is not list:
            self.error("structure", f"'{key}' must be an array aligned with '{name}'", path)
            return
        if main is not None and (main.__class__ is not list or len(main) != len(value)):
            self.error("structure", f"'{key}' and '{name}' must be arrays of the same length", path)
            return
        for index, extra in enumerate(value):
            if extra is not None:
                self.extras(extra, table, (path, at(index)))
            elif main is None or main[index] is None:
                self.error("required", "Primitive has neither a value nor extensions (ele-1)", (path, at(index)))

    def extras(self, value: Any, table: _Table, path: Path) -> None:
        if value.__class__ is not dict:
            self.error("structure", "Expected a JSON object with id and/or extension", path)
            return
        if "value" in value:
            self.error("structure", "The value of a primitive goes in the property without '_'", (path, ".value"))
            value = {k: v for k, v in value.items() if k != "value"}
        self.complex(value, table, path, None)

    # -- references and codes ----------------------------------------------------------------
    def reference(self, node: dict[str, Any], spec: _Spec, path: Path) -> None:
        ref = node.get("reference")
        if ref.__class__ is not str:
            return
        match = _REFERENCE.fullmatch(ref)
        where: Path = (path, ".reference")
        if match is None:
            self.error(
                "value",
                f"Invalid reference {ref!r}: expected Type/id, an absolute URL, #id or urn:uuid:/urn:oid:",
                where,
            )
            return
        rtype = match.group("type")
        if rtype is None:
            return
        if not model.is_resource_type(rtype):
            if not ref.startswith(("http://", "https://")):
                self.error("value", f"Reference to unknown resource type '{rtype}'", where)
            return
        targets = spec.targets
        if targets is not None and rtype not in targets:
            allowed = ", ".join(sorted(targets))
            self.error("value", f"Reference to {rtype} is not allowed here (allowed: {allowed})", where)

    def coded(self, value: Any, spec: _Spec, path: Path) -> None:
        codes = spec.binding
        assert codes is not None
        vs = spec.value_set
        type_code = spec.type_code
        if type_code in _CODED_STRINGS:
            if value.__class__ is str and not any(value in c for c in codes.values()):
                self.error("code-invalid", f"Code {value!r} is not in the required ValueSet {vs}", path)
        elif type_code == "Coding":
            if value.__class__ is dict and "code" in value and not _in_value_set(value, codes):
                self.error("code-invalid", f"Coding {_show_coding(value)} is not in the required ValueSet {vs}", path)
        elif type_code == "CodeableConcept" and value.__class__ is dict:
            codings = value.get("coding")
            if codings.__class__ is not list or not codings:
                return  # text only: nothing coded to check
            if any(c.__class__ is dict and _in_value_set(c, codes) for c in codings):
                return
            first = codings[0] if codings[0].__class__ is dict else {}
            self.error(
                "code-invalid",
                f"None of the codings ({_show_coding(first)}...) is in the required ValueSet {vs}",
                (path, ".coding"),
            )


def _in_value_set(coding: dict[str, Any], codes: dict[str, frozenset[str]]) -> bool:
    system = coding.get("system")
    found = codes.get(system) if system.__class__ is str else None
    # A code that is not a string (an array or object, reported as such by the walk) is in no
    # value set; a set lookup of it would raise TypeError (unhashable).
    code = coding.get("code")
    return found is not None and code.__class__ is str and code in found


def _show_coding(coding: dict[str, Any]) -> str:
    return f"{coding.get('system', '(no system)')}#{coding.get('code', '(no code)')}"


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, Decimal) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolver(resource: dict[str, Any]) -> Any:
    """``resolve()`` inside a Bundle (fullUrl or Type/id) or to a contained resource (#id).

    The index is built on the first call: few invariants resolve anything, and the R4 examples'
    definition Bundles (``Bundle-dataelements.json``: 6,781 entries) were indexed for none (#2).
    """
    is_bundle = resource.get("resourceType") == "Bundle"
    contained = resource.get("contained")
    if not is_bundle and not contained:
        return None
    index: dict[str, Any] | None = None

    def resolve(reference: str) -> Any:
        nonlocal index
        if index is None:
            index = _resolver_index(resource, is_bundle, contained)
        return index.get(reference)

    return resolve


def _resolver_index(resource: dict[str, Any], is_bundle: bool, contained: Any) -> dict[str, Any]:
    index: dict[str, Any] = {}
    entries = resource.get("entry") if is_bundle else None
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        found = entry["resource"]
        if isinstance(entry.get("fullUrl"), str):
            index[entry["fullUrl"]] = found
        if isinstance(found.get("id"), str):
            index[f"{found.get('resourceType')}/{found['id']}"] = found
    for item in contained if isinstance(contained, list) else ():
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            index["#" + item["id"]] = item
    return index


class StructuralValidator:
    """Validates R4 resources structurally (the ``Validator`` seam, no profiles)."""

    def validate(self, resource: Any, profiles: Sequence[str] = ()) -> list[Issue]:
        return self.examine(resource)[0]

    def examine(self, resource: Any) -> tuple[list[Issue], bool]:
        """The issues of ``resource``, and whether it may hold an extension anywhere (contained
        resources and Bundle entries included): False only when the walk met no Extension and
        went through every element (it leaves out only what it reports as an error, and
        ``fhir_comments``)."""
        walk = _Walk()
        try:
            walk.resource(resource, None, None)
        except RecursionError:
            return [Issue("error", "too-costly", "The resource is nested too deeply to validate", "Resource")], True
        finally:
            clear_memos()
        issues = list(dict.fromkeys(walk.issues))
        return issues, walk.extended or any(issue.is_error for issue in issues)
