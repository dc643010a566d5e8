"""Python source generated from a FHIRPath syntax tree: the fast path of ``Compiled.test``.

Why
---
The validator evaluates every R4 invariant on every node it applies to, over a million evaluations
on the official R4 examples (#2). Most invariants are a few tests such as ``pattern.empty() or
fixed.empty()``; through the closures of :mod:`adapter.fhir.fhirpath` each operator, function and
navigation step is a Python call that receives and returns a list, and those calls are most of
the time such an invariant takes. Here the Boolean compilation of an expression
(``_Compiler.compile_bool``) becomes the source of one Python function, ``compile()``-d once,
that does the same work inline: local variables instead of calls, no list where a result only
feeds a test, loops for ``where()``/``all()``/``exists(criterion)`` with their criterion in the
loop body.

How
---
:class:`_Generator` walks the tree as ``_Compiler`` does, taking the same decisions in the same
order (fused forms, fast paths), and emits statements that do what the closure chosen there does,
calling the module's own helpers (``_navigate``, ``_nav_choice``, ``_eq3``, ``_compare``, ...) for the
semantics. Only the common case of a closure is inlined (``code = 'Reference'`` on a JSON string);
its other cases call that closure: the generator compiles the same node with the same compiler
(at the same lambda depth, so loop-invariant subexpressions are memoised alike) and emits a call
to it. So every expression the compiler accepts can be generated, and each evaluation gives the
closure's result, exceptions included. ``tests/test_fhirpath_codegen.py`` compares the two.

Generated: member paths (``_name`` parts, choice types), ``exists() empty() hasValue()
isDistinct() not() all() exists(criterion) where() select() first() tail() count() children()
descendants() combine() union() trace() toInteger() iif()``, ``startsWith() endsWith()
contains() matches()``, ``and or xor implies``, ``= !=``, ``< <= > >=``, ``|``, ``&``, string,
integer and Boolean literals, ``%resource``, ``%rootResource``, ``$this``. Called as closures:
typed navigation (expressions with ``is``/``as``/``ofType``), ``~``, ``in``/``contains``,
arithmetic, indexers, the other functions and literals, other ``%`` variables.

Besides what the closures do, the generated code reuses a collection computed earlier in an
enclosing block for the same subtree, focus and $this (sdf-9 repeats ``children().element.where(...)``
three times; evaluation has no side effects but caches, except ``trace()``, the clock,
``resolve()`` and $index/$total, whose subtrees are evaluated every time), and keeps the value of
a loop-invariant subexpression in a local once computed.

Collections in generated code are list variables, or (:class:`_Coll`) a known single item: the
node under test, the current item of a loop, a literal. The code for a JSON object as the node (no
class test before its lookups) is generated first; the code for any other single item when one
is met; a list or None as the node goes to the closures. ``Compiled`` generates the code after
a few evaluations through the closures (generating costs about a millisecond).

Semantics follow https://hl7.org/fhirpath/N1/ as the closures implement them: an empty collection
propagates as empty (None) through operators (#equality, #comparison), ``and``/``or``/``xor``/
``implies`` are three-valued (#boolean-logic), a collection used as a Boolean is evaluated as a
singleton (#singleton-evaluation-of-collections).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

from adapter.fhir import fhirpath as fp
from adapter.fhir.fhirpath import AST, Env

__all__ = ["Generated", "generate", "generated_test"]

Test = Callable[[Any, Env], "bool | None"]

#: Helpers of adapter.fhir.fhirpath that generated code calls, under their own names.
_HELPERS = (
    "EMPTY",
    "TRUE",
    "FALSE",
    "Prim",
    "_B2L",
    "_bool3",
    "_child_objects",
    "_children",
    "_children_count",
    "_compare",
    "_descendant_objects",
    "_descendants",
    "_distinct",
    "_eq3",
    "_eq_item",
    "_has_value",
    "_input_str",
    "_is_distinct",
    "_nav_choice",
    "_navigate",
    "_root_resource",
    "_single",
    "_as_str",
)
#: Names (functions, $index, $total) whose subtrees are evaluated every time (see _Generator.reused).
_NOT_REUSED = ("trace", "now", "today", "timeOfDay", "resolve", "$index", "$total")
#: Comparison operators, as Python source applied to a -1/0/1 or integer difference.
_ORDER = {"<": "< 0", "<=": "<= 0", ">": "> 0", ">=": ">= 0"}
#: The other Boolean string functions, as Python source (``_string_unary``, ``_string_fn``).
_STRING_TESTS = {
    "startsWith": "{s}.startswith({k})",
    "endsWith": "{s}.endswith({k})",
    "contains": "{k} in {s}",
}


_UNSET = object()


class _Coll(NamedTuple):
    """A collection in generated code.

    ``items`` is Python source for the list, or None when only ``one`` is known; ``one`` the
    source for its only item when it has exactly one; ``kind`` what is known of that item's class:
    ``dict``, ``other`` (neither a dict nor a list) or ``any``.
    """

    items: str | None
    one: str | None = None
    kind: str = "any"

    def as_list(self) -> str:
        return self.items if self.items is not None else f"[{self.one}]"


class Generated(NamedTuple):
    """The source of a generated test, the objects it refers to, and the closures it calls."""

    source: str
    names: dict[str, Any]
    delegated: tuple[str, ...]


class _Generator:
    """Syntax tree -> statements; mirrors ``_Compiler`` (see the module docstring)."""

    def __init__(self, typed: bool) -> None:
        self.compiler = fp._Compiler(typed)
        self.typed = typed
        self.names: dict[str, Any] = {name: getattr(fp, name) for name in _HELPERS}
        self.names["_UNSET"] = _UNSET
        self.lines: list[str] = []
        self.level = 0
        self.count = 0
        self.depth = 0  # nesting of lambda bodies, as _Compiler.depth
        self.delegated: list[str] = []
        # Collections already computed, per block: (subtree, focus, $this) -> result (see coll()).
        self.scopes: list[dict[tuple[str, _Coll, _Coll], _Coll]] = [{}]
        self.memos: list[str] = []  # locals that hold a loop-invariant value once computed
        # Per block, like scopes: (JSON object variable, property) -> the local holding its .get()
        self.gets: list[dict[tuple[str, str], str]] = [{}]

    # -- emitting -------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        self.lines.append("    " * self.level + line)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        """An indented block; what is computed inside is not reused after it."""
        self.emit(header)
        self.level += 1
        self.scopes.append({})
        self.gets.append({})
        try:
            yield
        finally:
            self.gets.pop()
            self.scopes.pop()
            self.level -= 1

    def var(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: Any, prefix: str = "k") -> str:
        name = self.var(prefix)
        self.names[name] = value
        return name

    def assign(self, expression: str, prefix: str = "c") -> str:
        name = self.var(prefix)
        self.emit(f"{name} = {expression}")
        return name

    def coll_of(self, expression: str) -> _Coll:
        return _Coll(self.assign(expression))

    def body(self, ast: AST, kind: str, context: bool) -> None:
        """Statements returning the test's result for a node of ``kind`` (see :class:`_Coll`)."""
        if context:
            self.emit("env.root = [node]")  # %context defaults to the node under test
        node = _Coll(None, "node", kind)
        self.emit(f"return {self.bool_(ast, node, node)}")

    @contextmanager
    def if_nonempty(self, coll: _Coll) -> Iterator[None]:
        """Open a block run when ``coll`` has items (no test for a known single item)."""
        if coll.one is not None:
            yield
        else:
            with self.block(f"if {coll.items}:"):
                yield

    # -- delegating to closures -----------------------------------------------------------
    def closure(self, build: Callable[[], Any]) -> str:
        """Bind the closure ``build()`` makes with the compiler at the current lambda depth."""
        saved = self.compiler.depth
        self.compiler.depth = self.depth
        try:
            fn = build()
        finally:
            self.compiler.depth = saved
        name = self.const(fn, "f")
        self.delegated.append(name)
        return name

    def call(self, fn: str, focus: _Coll, this: _Coll, prefix: str = "r") -> str:
        return self.assign(f"{fn}({focus.as_list()}, {this.as_list()}, env)", prefix)

    def delegate_bool(self, node: AST, focus: _Coll, this: _Coll) -> str:
        return self.call(self.closure(lambda: self.compiler.compile_bool(node)), focus, this)

    def delegate_coll(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        return _Coll(self.call(self.closure(lambda: self.compiler.compile(node)), focus, this, "c"))

    def memo(self, fn: str, focus: _Coll, this: _Coll) -> str:
        """A loop-invariant subexpression (its closure memoised per resource, ``_memo``): called
        once per evaluation, its value kept in a local for the next items."""
        name = self.var("m")
        self.memos.append(name)
        with self.block(f"if {name} is _UNSET:"):
            self.emit(f"{name} = {fn}({focus.as_list()}, {this.as_list()}, env)")
        return name

    def delegate_invocation(self, inv: AST, coll: _Coll, this: _Coll) -> _Coll:
        return _Coll(self.call(self.closure(lambda: self.compiler.invocation(inv)), coll, this, "c"))

    # -- Boolean expressions (_Compiler.compile_bool) ---------------------------------------
    def bool_(self, node: AST, focus: _Coll, this: _Coll) -> str:
        """Source of a local variable or constant holding True/False/None."""
        kind = node["type"]
        if self.depth and fp._loop_invariant(node):
            return self.memo(self.closure(lambda: self.compiler.compile_bool(node)), focus, this)
        method = getattr(self, "b_" + kind, None)
        if method is None:
            if hasattr(fp._Compiler, "b_" + kind):
                return self.delegate_bool(node, focus, this)
            return self.bool3(self.coll(node, focus, this))
        found: str | None = method(node, focus, this)
        # None: the compiler's b_ method declines too and evaluates the collection as a Boolean.
        return found if found is not None else self.bool3(self.coll(node, focus, this))

    def bool3(self, coll: _Coll) -> str:
        """Singleton evaluation of a collection (https://hl7.org/fhirpath/N1/#singleton-evaluation-of-collections)."""
        if coll.one in ("True", "False"):
            return coll.one
        return self.assign(f"_bool3({coll.as_list()})", "r")

    def b_TermExpression(self, node: AST, focus: _Coll, this: _Coll) -> str | None:
        child = node["children"][0]
        if child["type"] == "ParenthesizedTerm":
            return self.bool_(child["children"][0], focus, this)
        if child["type"] != "InvocationTerm":
            return None
        inv = child["children"][0]
        name = fp._call_name(inv)
        if name == "iif":
            return self.iif(inv, None, focus, this)
        if fp._no_params(inv) and name in fp._INLINE_BOOL:
            return self.inline_bool(name, this)
        if not fp._is_boolean_call(inv):
            return None
        # At the start of a term the input collection is the focus ($this there).
        return self.bool_function(inv, focus, this)

    def b_InvocationExpression(self, node: AST, focus: _Coll, this: _Coll) -> str | None:
        left_node, inv = node["children"]
        name = fp._call_name(inv)
        no_params = fp._no_params(inv)
        if name == "iif":
            return self.iif(inv, left_node, focus, this)
        if name == "not" and no_params:
            return self.not3(self.bool_(left_node, focus, this))
        member = fp._term_member(left_node)
        if name in ("exists", "empty") and no_params and member is not None:
            exists = self.member_exists(member, focus, this)
            return exists if name == "exists" else self.assign(f"not {exists}", "r")
        if no_params and name in fp._INLINE_BOOL:
            return self.inline_bool(str(name), self.coll(left_node, focus, this))
        if member is not None and name in fp._STRING_FUNCTIONS and fp._FUNCTIONS[name].boolean:
            found = self.member_string_test(member, inv, focus, this)
            if found is not None:
                return found
        if not fp._is_boolean_call(inv):
            return None
        return self.bool_function(inv, self.coll(left_node, focus, this), this)

    def not3(self, value: str) -> str:
        return self.assign(f"None if {value} is None else not {value}", "r")

    def inline_bool(self, name: str, coll: _Coll) -> str:
        """exists(), empty(), hasValue(), isDistinct() on a collection (``_INLINE_BOOL``)."""
        if coll.one is not None and name in ("exists", "empty", "isDistinct"):
            return "False" if name == "empty" else "True"  # a collection of one item
        items = coll.as_list()
        if name == "exists":
            return self.assign(f"True if {items} else False", "r")
        if name == "empty":
            return self.assign(f"not {items}", "r")
        if name == "hasValue":
            return self.assign(f"_has_value({items})", "r")
        # A collection of fewer than two items is distinct: no call for the usual single item.
        return self.assign(f"True if len({items}) < 2 else _is_distinct({items})", "r")

    def member_exists(self, name: str, focus: _Coll, this: _Coll) -> str:
        """``_member_exists``: ``name.exists()`` tested on the JSON object."""
        result = self.var("r")

        def cases(item: str, v: str) -> None:
            with self.block(f"if {v} is not None and ({v}.__class__ is not list or ({v} and {v}[0] is not None)):"):
                self.emit(f"{result} = True")
            with self.block(f"elif {v} is None and {'_' + name!r} not in {item}:"):
                self.emit(f"{result} = False")
                keys = fp._choice_keys().get(name)
                if keys is not None:
                    # A choice (value[x]) is present under one of its names, never as a list.
                    k, key, value = self.const(keys), self.var("k"), self.var("v")
                    with (
                        self.block(f"if not {k}.isdisjoint({item}):"),
                        self.block(f"for {key}, {value} in {item}.items():"),
                        self.block(f"if {key} in {k} and {value}.__class__ is not list:"),
                    ):
                        self.emit(f"{result} = True")
                        self.emit("break")

        fn = self.closure(lambda: fp._member_exists(name, self.typed))
        return self.on_property(name, cases, fn, focus, this, result)

    def on_property(
        self,
        name: str,
        cases: Callable[[str, str], None],
        fn: str,
        focus: _Coll,
        this: _Coll,
        result: str,
        otherwise: Callable[[], None] | None = None,
    ) -> str:
        """A closure's fast path: when the focus is one JSON object, ``cases(item, v)`` emits the
        ``if``/``elif`` branches that set ``result`` from its property ``name`` (in ``v``); in
        any other case the closure ``fn`` sets it (or the statements ``otherwise()`` emits, when
        the focus is not one JSON object)."""
        call = f"{result} = {fn}({focus.as_list()}, {this.as_list()}, env)"
        item = self.single_dict(focus)
        if item is None:
            self.emit(call)
            return result
        with self.if_dict(item, focus) as v:
            cases(item, self.get(item, name, v))
            with self.block("else:"):
                self.emit(call)
        if focus.kind != "dict":
            with self.block("else:"):
                if otherwise is not None:
                    otherwise()
                else:
                    self.emit(call)
        return result

    def get(self, item: str, name: str, v: str) -> str:
        """A local holding ``item.get(name)``: one set earlier in this block or an enclosing one
        (eld-2 reads ``max`` four times; evaluation never changes the JSON), else ``v``, set now."""
        for scope in reversed(self.gets):
            found = scope.get((item, name))
            if found is not None:
                return found
        self.emit(f"{v} = {item}.get({name!r})")
        self.gets[-1][(item, name)] = v
        return v

    def single_dict(self, focus: _Coll) -> str | None:
        """The variable for the focus's item when it may be a single JSON object, else None."""
        if focus.kind == "other" or (focus.one is None and focus.items in ("EMPTY", "TRUE", "FALSE")):
            return None
        if focus.one is not None:
            return focus.one if focus.one.isidentifier() else None
        return self.var("x")

    @contextmanager
    def if_dict(self, item: str, focus: _Coll) -> Iterator[str]:
        """Open the block run when the focus is the single JSON object ``item``."""
        v = self.var("v")
        if focus.kind == "dict":
            yield v
        elif focus.one is not None:
            with self.block(f"if {item}.__class__ is dict:"):
                yield v
        else:
            with self.block(f"if len({focus.items}) == 1 and ({item} := {focus.items}[0]).__class__ is dict:"):
                yield v

    def member_string_test(self, member: str, inv: AST, focus: _Coll, this: _Coll) -> str | None:
        """``path.matches('...')`` on the JSON string (``_Compiler.member_string_test``)."""
        name = str(fp._call_name(inv))
        params = self.params(inv)
        consts = [fp._literal(p) for p in params]
        spec = fp._FUNCTIONS[name]
        if any(c is None for c in consts) or not spec.low <= len(params) <= spec.high:
            return None
        fn = self.closure(lambda: self.compiler.member_string_test(member, inv))
        result = self.var("r")

        def cases(item: str, v: str) -> None:
            with self.block(f"if {v}.__class__ is str:"):
                self.unary(result, name, consts, v)

        return self.on_property(member, cases, fn, focus, this, result)

    def unary(self, result: str, name: str, consts: list[Any], s: str) -> None:
        """``result = _string_unary(name, ...)(s)`` for the string ``s``."""
        if name == "matches":
            self.emit(f"{result} = {self.const(fp._regex(consts[0]), 'p')}.search({s}) is not None")
        else:
            self.emit(f"{result} = {_STRING_TESTS[name].format(s=s, k=repr(consts[0]))}")

    def params(self, inv: AST) -> list[AST]:
        return [] if fp._no_params(inv) else list(inv["children"][0]["children"][1]["children"])

    def bool_function(self, inv: AST, coll: _Coll, this: _Coll) -> str:
        """A Boolean function applied to ``coll`` (its builder's operation)."""
        name = str(fp._call_name(inv))
        params = self.params(inv)
        if not params and name in ("exists", "empty", "hasValue", "isDistinct"):
            return self.inline_bool(name, coll)
        if not params and name == "not":
            return self.not3(self.bool3(coll))
        if name in ("exists", "all") and len(params) == 1:
            return self.quantifier(name, params[0], coll)
        if name in fp._STRING_FUNCTIONS:  # the Boolean ones: startsWith, endsWith, contains, matches
            return self.string_test(inv, name, params, coll, this)
        return self.call(self.closure(lambda: self.compiler.boolean_function(inv)), coll, this)

    def quantifier(self, name: str, param: AST, coll: _Coll) -> str:
        """``exists(criterion)`` / ``all(criterion)``: the criterion evaluated per item, stopping
        at the first item that decides (https://hl7.org/fhirpath/N1/#existence)."""
        result = self.assign("False" if name == "exists" else "True", "r")
        with self.loop(coll) as item:
            got = self.bool_(param, item, item)
            test = f"{got} is True" if name == "exists" else f"{got} is not True"
            with self.block(f"if {test}:"):
                self.emit(f"{result} = {name == 'exists'}")
                self.emit("break")
        return result

    @contextmanager
    def loop(self, coll: _Coll) -> Iterator[_Coll]:
        """A loop over the items of ``coll`` with ``$index`` set, as the lambda functions do;
        its body is a lambda body (one level deeper) whose focus and $this are the item."""
        i, x = self.var("i"), self.var("x")
        with self.block(f"for {i}, {x} in enumerate({coll.as_list()}):"):
            self.emit(f"env.index = {i}")
            self.depth += 1
            try:
                yield _Coll(None, x)
            finally:
                self.depth -= 1

    def string_test(self, inv: AST, name: str, params: list[AST], coll: _Coll, this: _Coll) -> str:
        """startsWith(), endsWith(), contains(), matches() on a collection (``_string_fn``)."""
        consts = [fp._literal(p) for p in params]
        result = self.var("r")
        if all(c is not None for c in consts):
            # _string_call: one string tested with the bound arguments; anything else calls it.
            fn = self.closure(lambda: self.compiler.boolean_function(inv))
            s = coll.one if coll.one is not None and coll.one.isidentifier() else self.var("s")
            if s == coll.one:
                check = f"{s}.__class__ is str"
            else:
                check = f"len({coll.as_list()}) == 1 and ({s} := {coll.as_list()}[0]).__class__ is str"
            with self.block(f"if {check}:"):
                self.unary(result, name, consts, s)
            with self.block("else:"):
                self.emit(f"{result} = {fn}({coll.as_list()}, {this.as_list()}, env)")
            return result
        items = coll.as_list()
        if coll.one is not None:
            s = self.assign(f"{coll.one} if {coll.one}.__class__ is str else _input_str({items}, {name!r})", "s")
        else:
            first = f"{items}[0] if len({items}) == 1 and {items}[0].__class__ is str"
            s = self.assign(f"{first} else _input_str({items}, {name!r})", "s")
        self.emit(f"{result} = None")
        with self.block(f"if {s} is not None:"):
            arg = self.coll(params[0], this, this).as_list()  # arguments are evaluated on $this
            v = self.assign(f"{arg}[0] if len({arg}) == 1 and {arg}[0].__class__ is str else _single({arg})", "v")
            if name in _STRING_TESTS:
                test = _STRING_TESTS[name].format(s=s, k=v)
            else:
                test = f"{self.const(fp._STRING_FUNCTIONS[name], 'f')}({s}, {v})"
            self.emit(f"{result} = None if {v} is None else {test}")
        return result

    def iif(self, inv: AST, left_node: AST | None, focus: _Coll, this: _Coll) -> str:
        """``_Compiler.iif_bool``: criterion and branches evaluated on the input collection."""
        params = self.params(inv)
        coll = self.coll(left_node, focus, this) if left_node is not None else focus
        crit = self.bool_(params[0], coll, coll)
        result = self.var("r")
        with self.block(f"if {crit} is True:"):
            self.emit(f"{result} = {self.bool_(params[1], coll, coll)}")
        with self.block("else:"):
            self.emit(f"{result} = {self.bool_(params[2], coll, coll) if len(params) > 2 else None}")
        return result

    # -- logic (https://hl7.org/fhirpath/N1/#boolean-logic) --------------------------------
    def b_AndExpression(self, node: AST, focus: _Coll, this: _Coll) -> str:
        return self.junction(fp._bool_operands(node, "AndExpression", "and"), False, focus, this)

    def b_OrExpression(self, node: AST, focus: _Coll, this: _Coll) -> str:
        if node["terminalNodeText"][0] == "xor":
            left, right = node["children"]
            return self.binary(left, right, focus, this, "None", "is not None", "None if {b} is None else {a} != {b}")
        return self.junction(fp._bool_operands(node, "OrExpression", "or"), True, focus, this)

    def junction(self, operands: list[AST], decisive: bool, focus: _Coll, this: _Coll) -> str:
        """``or`` (``decisive`` True) / ``and`` (False) over operands evaluated left to right up
        to the first decisive one; otherwise empty when one was empty, else not ``decisive``."""
        result = self.var("r")
        seen: list[str] = []
        with ExitStack() as nested:
            for operand in operands:
                got = self.bool_(operand, focus, this)
                seen.append(got)
                with self.block(f"if {got} is {decisive}:"):
                    self.emit(f"{result} = {decisive}")
                nested.enter_context(self.block("else:"))
            unknown = " or ".join(f"{r} is None" for r in seen)
            self.emit(f"{result} = None if {unknown} else {not decisive}")
        return result

    def b_ImpliesExpression(self, node: AST, focus: _Coll, this: _Coll) -> str:
        left, right = node["children"]
        combine = "True if {b} is True else (False if {a} is True and {b} is False else None)"
        return self.binary(left, right, focus, this, "True", "is not False", combine)

    def binary(self, left: AST, right: AST, focus: _Coll, this: _Coll, initial: str, test: str, combine: str) -> str:
        """A Boolean operator that is ``initial`` unless its left operand ``a`` passes ``test``;
        then it evaluates the right operand ``b`` and is ``combine``."""
        a = self.bool_(left, focus, this)
        result = self.assign(initial, "r")
        with self.block(f"if {a} {test}:"):
            b = self.bool_(right, focus, this)
            self.emit(f"{result} = " + combine.format(a=a, b=b))
        return result

    # -- equality and comparison (https://hl7.org/fhirpath/N1/#equality) -------------------
    def b_EqualityExpression(self, node: AST, focus: _Coll, this: _Coll) -> str:
        op = node["terminalNodeText"][0]
        left_node, right_node = node["children"]
        if op not in ("=", "!="):
            return self.delegate_bool(node, focus, this)
        negate = op == "!="
        if all(self.compiler.is_boolean(n) for n in node["children"]):  # _op_eq_bool (ext-1)
            combine = f"None if {{b}} is None else ({{a}} == {{b}}) != {negate}"
            return self.binary(left_node, right_node, focus, this, "None", "is not None", combine)
        name, const = fp._term_member(left_node), fp._literal(right_node)
        if name is not None and isinstance(const, str):
            return self.member_equals(node, name, const, negate, focus, this)
        a = self.coll(left_node, focus, this)
        result = self.assign("None", "r")
        with self.if_nonempty(a):
            b = self.coll(right_node, focus, this)
            self.emit(f"{result} = {self.eq3(a, b)}")
            if negate:
                self.emit(f"{result} = None if {result} is None else not {result}")
        return result

    def eq3(self, a: _Coll, b: _Coll) -> str:
        """Source for ``_eq3(a, b)``, with one item compared to a string literal inline."""
        if b.one is not None and b.one[:1] in ("'", '"') and a.one is not None:
            return f"{a.one} == {b.one} if {a.one}.__class__ is str else _eq_item({a.one}, {b.one})"
        return f"_eq3({a.as_list()}, {b.as_list()})"

    def member_equals(self, node: AST, name: str, const: str, negate: bool, focus: _Coll, this: _Coll) -> str:
        """``code = 'Reference'`` on the JSON string (``_op_eq_member_literal``)."""
        fn = self.closure(lambda: self.compiler.compile_bool(node))
        result = self.var("r")

        def cases(item: str, v: str) -> None:
            with self.block(f"if {v}.__class__ is str:"):
                self.emit(f"{result} = {v} {'!=' if negate else '=='} {const!r}")

        return self.on_property(name, cases, fn, focus, this, result)

    def b_InequalityExpression(self, node: AST, focus: _Coll, this: _Coll) -> str:
        """``_op_compare``: empty if either side is empty (https://hl7.org/fhirpath/N1/#comparison)."""
        order = _ORDER[node["terminalNodeText"][0]]
        left_node, right_node = node["children"]
        result = self.assign("None", "r")
        a = self.coll(left_node, focus, this)
        with self.if_nonempty(a):
            b = self.coll(right_node, focus, this)
            la, lb = a.as_list(), b.as_list()
            with self.if_nonempty(b):
                ints = f"len({la}) == 1 and len({lb}) == 1 and {la}[0].__class__ is int and {lb}[0].__class__ is int"
                with self.block(f"if {ints}:"):
                    self.emit(f"{result} = {la}[0] - {lb}[0] {order}")
                with self.block("else:"):
                    c = self.assign(f"_compare({la}, {lb})", "v")
                    self.emit(f"{result} = None if {c} is None else {c} {order}")
        return result

    # -- collections (_Compiler.compile) ----------------------------------------------------
    def coll(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        if self.depth and fp._loop_invariant(node):
            return _Coll(self.memo(self.closure(lambda: self.compiler.compile(node)), focus, this))
        return self.reused(node, focus, this, self.coll_uncached)

    def coll_uncached(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        kind = node["type"]
        method = getattr(self, "c_" + kind, None)
        if method is not None:
            found: _Coll = method(node, focus, this)
            return found
        if hasattr(fp._Compiler, "c_" + kind):
            return self.delegate_coll(node, focus, this)
        return self.coll_of(f"_B2L[{self.bool_(node, focus, this)}]")

    def reused(self, node: AST, focus: _Coll, this: _Coll, compute: Callable[[AST, _Coll, _Coll], _Coll]) -> _Coll:
        """The collection of a subtree met before on the same focus and $this in a block that
        encloses this one (sdf-9 repeats ``children().element.where(...)`` three times), else
        ``compute``-d. Evaluation has no side effects other than caches, except trace(), the
        functions of the clock, resolve() (a hook) and $index/$total (state of the lambda
        functions), whose subtrees are not reused; nor are the typed ones (types recorded)."""
        text = node.get("text")  # the subtree's source (without spaces): equal texts, equal trees
        if text is None or self.typed or any(name in text for name in _NOT_REUSED):
            return compute(node, focus, this)
        key = (node["type"] + text, focus, this)
        for scope in reversed(self.scopes):
            if key in scope:
                return scope[key]
        found = compute(node, focus, this)
        self.scopes[-1][key] = found
        return found

    def c_TermExpression(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        return self.coll(node["children"][0], focus, this)

    c_ParenthesizedTerm = c_TermExpression
    c_LiteralTerm = c_TermExpression

    def c_StringLiteral(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        value = fp._unescape(node["text"][1:-1])
        return _Coll(self.const([value]), repr(value), "other")

    def c_NumberLiteral(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        if "." in node["text"]:
            return self.delegate_coll(node, focus, this)
        value = int(node["text"])
        return _Coll(self.const([value]), repr(value), "other")

    def c_BooleanLiteral(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        return _Coll("TRUE", "True", "other") if node["text"] == "true" else _Coll("FALSE", "False", "other")

    def c_NullLiteral(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        return _Coll("EMPTY")

    def c_ExternalConstantTerm(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        ident = node["children"][0]["children"][0]
        text = ident.get("text") or ident["terminalNodeText"][0]
        name = fp._unescape(text[1:-1]) if text[:1] in ("`", "'") else text
        if name == "resource":
            return self.coll_of("[env.resource] if env.resource is not None else EMPTY")
        if name == "rootResource":
            return self.coll_of("_root_resource(env)")
        return self.delegate_coll(node, focus, this)

    def c_InvocationTerm(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        inv = node["children"][0]
        if inv["type"] == "MemberInvocation" and fp._identifier(inv["children"][0]["text"])[:1].isupper():
            return self.delegate_coll(node, focus, this)  # a type name (Appointment.status)
        return self.apply(inv, focus, this)

    def c_InvocationExpression(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        """``_Compiler.invocations``: the source, then the invocation applied to it."""
        left_node, inv = node["children"]
        fused = self.fused(left_node, inv, focus, this)
        if fused is not None:
            return fused
        names = fp._member_path(node)
        if names is not None:
            return self.path(names, focus, this)
        if left_node["type"] == "InvocationExpression" and not (self.depth and fp._loop_invariant(left_node)):
            source = self.reused(left_node, focus, this, self.c_InvocationExpression)
        else:
            source = self.coll(left_node, focus, this)
        if fp._call_name(inv) == "count" and fp._no_params(inv):
            return self.coll_of(f"[len({source.as_list()})]")
        return self.apply(inv, source, this)

    def fused(self, left_node: AST, inv: AST, focus: _Coll, this: _Coll) -> _Coll | None:
        """``_Compiler.fused``: ``children().count()``, ``children().x``, ``descendants().x``."""
        last = fp._last_invocation(left_node)
        source_name = fp._call_name(last) if last is not None else None
        if source_name not in ("children", "descendants"):
            return None
        count = source_name == "children" and fp._call_name(inv) == "count" and fp._no_params(inv)
        if not count:
            if inv["type"] != "MemberInvocation":
                return None
            name = fp._identifier(inv["children"][0]["text"])
            if name in ("id", "extension") or self.typed:
                return None
        # children() as a term applies to $this, else to what precedes it
        source = this if left_node["type"] == "TermExpression" else self.coll(left_node["children"][0], focus, this)
        if count:
            return self.coll_of(f"_children_count({source.as_list()})")
        objects = "_child_objects" if source_name == "children" else "_descendant_objects"
        return self.nav(name, self.coll_of(f"{objects}({source.as_list()}, env)"), this)

    def c_UnionExpression(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        """``_op_union``: both sides, duplicates removed (https://hl7.org/fhirpath/N1/#union-collections)."""
        a = self.coll(node["children"][0], focus, this)
        b = self.coll(node["children"][1], focus, this)
        return self.coll_of(f"_distinct({a.as_list()} + {b.as_list()})")

    def c_AdditiveExpression(self, node: AST, focus: _Coll, this: _Coll) -> _Coll:
        if node["terminalNodeText"][0] != "&":
            return self.delegate_coll(node, focus, this)
        # _op_concat: each side a single String, empty as '' (https://hl7.org/fhirpath/N1/#string-concatenation)
        a = self.assign(f"_single({self.coll(node['children'][0], focus, this).as_list()})", "v")
        b = self.assign(f"_single({self.coll(node['children'][1], focus, this).as_list()})", "v")
        return self.coll_of(f"[_as_str({a}, '&') + _as_str({b}, '&')]")

    # -- invocations ------------------------------------------------------------------------
    def apply(self, inv: AST, coll: _Coll, this: _Coll) -> _Coll:
        """``_Compiler.invocation`` applied to ``coll``."""
        kind = inv["type"]
        if kind == "MemberInvocation":
            return self.nav(fp._identifier(inv["children"][0]["text"]), coll, this)
        if kind == "ThisInvocation":
            return this
        if kind != "FunctionInvocation":
            return self.delegate_invocation(inv, coll, this)
        name = str(fp._call_name(inv))
        if fp._FUNCTIONS[name].boolean:
            return self.coll_of(f"_B2L[{self.bool_function(inv, coll, this)}]")
        method = getattr(self, "f_" + name, None)
        found: _Coll | None = method(self.params(inv), coll, this) if method is not None else None
        return found if found is not None else self.delegate_invocation(inv, coll, this)

    def nav(self, name: str, coll: _Coll, this: _Coll) -> _Coll:
        """Member navigation (``_plain_member``): the JSON object's property, with its ``_name``
        part (https://hl7.org/fhir/R4/json.html#primitive) and choice types (``_nav_choice``);
        over other items as ``_navigate``. Typed navigation calls the closure."""
        fn = self.closure(lambda: fp._member(name, self.typed))
        if self.typed:
            return _Coll(self.call(fn, coll, this, "c"))
        if self.single_dict(coll) is None:
            return self.coll_of(f"_navigate({coll.as_list()}, {name!r}, env, False)")
        uname, result = "_" + name, self.var("c")

        def cases(item: str, v: str) -> None:
            self.found_cases(item, v, uname, f"{result} = {{}}", f"{result} = [{{}}]")
            with self.block(f"elif {v} is None and {uname!r} not in {item}:"):
                keys = fp._choice_keys().get(name)
                if keys is None:
                    self.emit(f"{result} = EMPTY")
                else:
                    k, suffixes = self.const(keys), self.const(fp._choice_suffixes()[name])
                    choice = f"_nav_choice({item}, {name!r}, {suffixes}, env, False)"
                    self.emit(f"{result} = EMPTY if {k}.isdisjoint({item}) else {choice}")

        return _Coll(self.on_property(name, cases, fn, coll, this, result, lambda: self.nav_items(name, coll, result)))

    def found_cases(self, item: str, v: str, uname: str, objects: str, one: str) -> None:
        """The branches of navigation for the property ``v`` of ``item`` when it holds a list of
        JSON objects (``objects`` formatted with it), an object or a primitive value (``one``
        formatted with the item, a :class:`Prim` when ``uname`` holds its extensions)."""
        with self.block(f"if {v}.__class__ is list and {v} and {v}[0].__class__ is dict:"):
            self.emit(objects.format(v))
        with self.block(f"elif {v}.__class__ is dict:"):
            self.emit(one.format(v))
        with self.block(f"elif {v} is not None and {v}.__class__ is not list:"):
            e = self.assign(f"{item}.get({uname!r})", "e")
            self.emit(one.format(f"{v} if {e} is None else Prim({v}, {e})"))

    def nav_items(self, name: str, coll: _Coll, result: str) -> None:
        """``result = _navigate(coll, name, env, False)`` for a focus that is not one JSON object
        (``children().element``, ``snapshot.element.type``): a loop whose JSON objects with a
        list of objects, an object or a primitive under ``name`` are navigated inline, the others
        as ``_navigate`` does (an item other than a JSON object or a Prim gives nothing)."""
        if coll.one is not None:  # a single item that is not a JSON object
            self.emit(f"{result} = _navigate([{coll.one}], {name!r}, env, False)")
            return
        uname, x, v = "_" + name, self.var("x"), self.var("v")
        keys = fp._choice_keys().get(name)
        self.emit(f"{result} = []")
        with self.block(f"for {x} in {coll.as_list()}:"):
            with self.block(f"if {x}.__class__ is dict:"):
                self.emit(f"{v} = {x}.get({name!r})")
                self.found_cases(x, v, uname, f"{result} += {{}}", f"{result}.append({{}})")
                absent = f"{v} is None and {uname!r} not in {x}"
                if keys is not None:
                    absent += f" and {self.const(keys)}.isdisjoint({x})"
                with self.block(f"elif not ({absent}):"):
                    self.emit(f"{result} += _navigate([{x}], {name!r}, env, False)")
            with self.block(f"elif {x}.__class__ is Prim:"):
                self.emit(f"{result} += _navigate([{x}], {name!r}, env, False)")

    def path(self, names: list[str], focus: _Coll, this: _Coll) -> _Coll:
        """``_path``: ``a.b.c``, stopping at the first empty step."""
        coll = self.nav(names[0], focus, this)
        with ExitStack() as nested:
            for name in names[1:]:
                nested.enter_context(self.block(f"if {coll.items}:"))
                step = self.nav(name, coll, this)
                self.emit(f"{coll.items} = {step.items}")
        return coll

    def f_where(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        """``where(criterion)``: the items for which it is true (https://hl7.org/fhirpath/N1/#filtering-and-projection)."""
        result = self.assign("[]", "c")
        with self.loop(coll) as item:
            got = self.bool_(params[0], item, item)
            with self.block(f"if {got} is True:"):
                self.emit(f"{result}.append({item.one})")
        return _Coll(result)

    def f_select(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        names = fp._member_path(params[0])
        if names is not None:  # select(code) is navigation, as compiled
            return self.path(names, coll, this)
        result = self.assign("[]", "c")
        with self.loop(coll) as item:
            got = self.coll(params[0], item, item)
            self.emit(f"{result}.extend({got.as_list()})")
        return _Coll(result)

    def f_combine(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        """``combine(other)``: both collections, ``other`` evaluated on $this (``_collection_op``)."""
        other = self.coll(params[0], this, this)
        return self.coll_of(f"{coll.as_list()} + {other.as_list()}")

    def f_union(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        other = self.coll(params[0], this, this)
        return self.coll_of(f"_distinct({coll.as_list()} + {other.as_list()})")

    def f_first(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        return coll if coll.one is not None else self.coll_of(f"{coll.as_list()}[:1]")

    def f_tail(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        return self.coll_of(f"{coll.as_list()}[1:]")

    def f_count(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        return self.coll_of(f"[len({coll.as_list()})]")

    def f_children(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        return self.coll_of(f"_children({coll.as_list()}, env, {self.typed})")

    def f_descendants(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        return self.coll_of(f"_descendants({coll.as_list()}, env, {self.typed})")

    def f_trace(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll | None:
        """``trace()`` gives its input; the closure only runs (for its output) when tracing."""
        if coll.items is None:
            return None
        fn = self.closure(lambda: fp._FUNCTIONS["trace"].builder(self.compiler, params))
        with self.block("if env.trace is not None:"):
            self.emit(f"{fn}({coll.items}, {this.as_list()}, env)")
        return coll

    def f_toInteger(self, params: list[AST], coll: _Coll, this: _Coll) -> _Coll:
        """``_converter(_to_integer)``: the single item's value converted, empty when it does not."""
        convert = self.const(fp._CONVERSIONS["Integer"], "t")
        v = self.var("v")
        if coll.one is not None:
            self.emit(f"{v} = {coll.one}.value if {coll.one}.__class__ is Prim else {coll.one}")
        else:
            self.emit(f"{v} = {coll.items}[0] if len({coll.items}) == 1 else _single({coll.items})")
            self.emit(f"{v} = {v}.value if {v}.__class__ is Prim else {v}")
        result = self.assign("EMPTY", "c")
        with self.block(f"if {v} is not None:"):
            self.emit(f"{v} = {convert}({v})")
            self.emit(f"{result} = EMPTY if {v} is None else [{v}]")
        return _Coll(result)


def generate(expression: str, ast: AST, typed: bool, context: bool, kind: str) -> Generated:
    """The source of ``test(node, env)`` for a node of ``kind``: ``dict`` (a JSON object; other
    nodes go to ``_other``), or ``other`` (a single other item; a list or None goes to ``_slow``,
    the closures)."""
    gen = _Generator(typed)
    gen.level = 1
    if kind == "dict":
        with gen.block("if node.__class__ is dict:"):
            gen.body(ast, "dict", context)
        gen.emit("return _other(node, env)")
    else:
        with gen.block("if node.__class__ is list or node is None:"):
            gen.emit("return _slow(node, env)")
        gen.body(ast, "other", context)
    prologue = [f"    {name} = _UNSET" for name in gen.memos]
    lines = [f"# {expression}", "def test(node, env):", *prologue, *gen.lines]
    return Generated("\n".join(lines) + "\n", gen.names, tuple(gen.delegated))


def generated_test(compiled: fp.Compiled) -> Test:
    """The generated ``test(node, env)`` of ``compiled``: the code for a JSON object is generated
    now, the code for other nodes on the first such node; ``compiled.closure_test`` evaluates a
    list or None, and anything whose generated source does not compile (a nesting deeper than
    Python's parser takes)."""
    slow = compiled.closure_test
    source = (compiled.expression, compiled._ast, compiled.typed, compiled.context)
    namespace: dict[str, Any] = {"_slow": slow}

    def other(node: Any, env: Env) -> bool | None:
        namespace["_other"] = _compiled(generate(*source, kind="other"), namespace) or slow
        return namespace["_other"](node, env)  # type: ignore[no-any-return]

    namespace["_other"] = other
    return _compiled(generate(*source, kind="dict"), namespace) or slow


def _compiled(generated: Generated, namespace: dict[str, Any]) -> Test | None:
    try:
        code = compile(generated.source, f"<fhirpath {generated.source[2:62]}>", "exec")
    except (SyntaxError, RecursionError, MemoryError):
        return None
    namespace.update(generated.names)
    exec(code, namespace)
    test: Test = namespace.pop("test")
    return test
