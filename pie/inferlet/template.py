"""A small Jinja2-subset renderer for models' chat templates, runnable in the sandbox.

Chat templates ship with the model as Jinja2 text, but jinja2 cannot be
imported inside the CPython-in-WebAssembly sandbox (only the stdlib is there),
and there is no host call for rendering. So the SDK renders templates itself
with this interpreter of the subset that chat templates use:

- `{{ expr }}`, `{% if/elif/else/endif %}`, `{% for x in xs %}` (also
  `for a, b in ...`, with `loop.index/index0/first/last/length`),
  `{% set name = expr %}` and `{% set ns.attr = expr %}`, `{# comments #}`,
  whitespace control with `-` (`{%-`, `-%}`, `{{-`, `-}}`);
- expressions: literals (strings, numbers, true/false/none, lists, dicts),
  names, `.attr`, `[key]`, slices, calls, `+ - * / // % ~`, comparisons,
  `in`/`not in`, `and/or/not`, `x if c else y`, `is [not] defined/none/string/...`,
  filters `trim length upper lower title capitalize tojson string int join first
  last default list reverse items`;
- globals `raise_exception`, `namespace`, `range`, `strftime_now`.

Undefined names render as '' and are falsy, as in Jinja2. Anything outside
the subset raises TemplateError with the position, rather than rendering
something wrong. Rendering matches jinja2 on the SmolLM2, Llama-3 and
ChatML templates (tests/test_sdk_template.py).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any


class TemplateError(Exception):
    """The template uses something this renderer does not support, or raised."""


class _Undefined:
    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return ""

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Undefined)

    def __hash__(self) -> int:
        return 0


UNDEFINED = _Undefined()


class Namespace:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


# --------------------------------------------------------------------------- lexer

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|//|\*\*|[-+*/%~<>()\[\]{}.,:|=])
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


def _lex(expr: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN_RE.match(expr, pos)
        if not match:
            raise TemplateError(f"unexpected character {expr[pos]!r} in {expr!r}")
        pos = match.end()
        kind = match.lastgroup
        text = match.group()
        if kind == "ws":
            continue
        if kind == "string":
            tokens.append(("str", _unescape(text[1:-1])))
        elif kind == "number":
            tokens.append(("num", float(text) if "." in text else int(text)))
        else:
            tokens.append((kind or "op", text))
    tokens.append(("end", None))
    return tokens


# --------------------------------------------------------------------------- expression parser
# Expressions compile to nested tuples evaluated by _eval.


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _lex(text)
        self.i = 0
        self.text = text

    def peek(self, value: str | None = None) -> bool:
        kind, tok = self.tokens[self.i]
        return value is None or (kind in ("op", "name") and tok == value)

    def take(self, value: str | None = None) -> Any:
        kind, tok = self.tokens[self.i]
        if value is not None and not (kind in ("op", "name") and tok == value):
            raise TemplateError(f"expected {value!r}, got {tok!r} in {self.text!r}")
        self.i += 1
        return tok

    def at_end(self) -> bool:
        return self.tokens[self.i][0] == "end"

    def expect_end(self) -> None:
        if not self.at_end():
            raise TemplateError(f"unexpected {self.tokens[self.i][1]!r} in {self.text!r}")

    def expr(self) -> tuple:
        value = self.or_()
        if self.peek("if"):
            self.take("if")
            cond = self.or_()
            other: tuple = ("lit", UNDEFINED)
            if self.peek("else"):
                self.take("else")
                other = self.expr()
            return ("cond", cond, value, other)
        return value

    def or_(self) -> tuple:
        left = self.and_()
        while self.peek("or"):
            self.take()
            left = ("or", left, self.and_())
        return left

    def and_(self) -> tuple:
        left = self.not_()
        while self.peek("and"):
            self.take()
            left = ("and", left, self.not_())
        return left

    def not_(self) -> tuple:
        if self.peek("not"):
            self.take()
            return ("not", self.not_())
        return self.compare()

    def compare(self) -> tuple:
        left = self.concat()
        while True:
            if any(self.peek(op) for op in ("==", "!=", "<", ">", "<=", ">=", "in")):
                op = self.take()
                left = ("bin", op, left, self.concat())
            elif self.peek("not") and self.tokens[self.i + 1][1] == "in":
                self.take()
                self.take()
                left = ("not", ("bin", "in", left, self.concat()))
            elif self.peek("is"):
                self.take()
                negate = self.peek("not")
                if negate:
                    self.take()
                test = self.take()
                args = self.call_args() if self.peek("(") else []
                node = ("test", test, left, args)
                left = ("not", node) if negate else node
            else:
                return left

    def concat(self) -> tuple:
        left = self.additive()
        while self.peek("~"):
            self.take()
            left = ("bin", "~", left, self.additive())
        return left

    def additive(self) -> tuple:
        left = self.term()
        while self.peek("+") or self.peek("-"):
            op = self.take()
            left = ("bin", op, left, self.term())
        return left

    def term(self) -> tuple:
        left = self.unary()
        while any(self.peek(op) for op in ("*", "/", "//", "%")):
            op = self.take()
            left = ("bin", op, left, self.unary())
        return left

    def unary(self) -> tuple:
        if self.peek("-"):
            self.take()
            return ("neg", self.unary())
        return self.filtered()

    def filtered(self) -> tuple:
        node = self.postfix()
        while self.peek("|"):
            self.take()
            name = self.take()
            args = self.call_args() if self.peek("(") else []
            node = ("filter", name, node, args)
        return node

    def postfix(self) -> tuple:
        node = self.primary()
        while True:
            if self.peek("."):
                self.take()
                node = ("attr", node, self.take())
            elif self.peek("["):
                self.take()
                node = self.subscript(node)
            elif self.peek("("):
                node = ("call", node, self.call_args())
            else:
                return node

    def subscript(self, node: tuple) -> tuple:
        parts: list[tuple | None] = [None, None, None]
        index = 0
        is_slice = False
        while not self.peek("]"):
            if self.peek(":"):
                self.take()
                is_slice = True
                index += 1
                continue
            parts[index] = self.expr()
        self.take("]")
        if is_slice:
            return ("slice", node, parts[0], parts[1], parts[2])
        if parts[0] is None:
            raise TemplateError(f"empty subscript in {self.text!r}")
        return ("item", node, parts[0])

    def call_args(self) -> list:
        self.take("(")
        args: list = []
        while not self.peek(")"):
            if self.tokens[self.i][0] == "name" and self.tokens[self.i + 1][1] == "=":
                key = self.take()
                self.take("=")
                args.append(("kw", key, self.expr()))
            else:
                args.append(self.expr())
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return args

    def primary(self) -> tuple:
        kind, tok = self.tokens[self.i]
        self.i += 1
        if kind in ("str", "num"):
            return ("lit", tok)
        if kind == "name":
            constants = {
                "true": True,
                "True": True,
                "false": False,
                "False": False,
                "none": None,
                "None": None,
            }
            if tok in constants:
                return ("lit", constants[tok])
            return ("name", tok)
        if tok == "(":
            inner = self.expr()
            self.take(")")
            return inner
        if tok == "[":
            items = []
            while not self.peek("]"):
                items.append(self.expr())
                if not self.peek("]"):
                    self.take(",")
            self.take("]")
            return ("list", items)
        if tok == "{":
            pairs = []
            while not self.peek("}"):
                key = self.expr()
                self.take(":")
                pairs.append((key, self.expr()))
                if not self.peek("}"):
                    self.take(",")
            self.take("}")
            return ("dict", pairs)
        raise TemplateError(f"unexpected {tok!r} in {self.text!r}")


def _parse_expr(text: str) -> tuple:
    parser = _Parser(text)
    node = parser.expr()
    parser.expect_end()
    return node


# --------------------------------------------------------------------------- evaluation

_SAFE_METHODS = {
    str: {
        "strip",
        "lstrip",
        "rstrip",
        "startswith",
        "endswith",
        "split",
        "upper",
        "lower",
        "replace",
        "title",
        "capitalize",
        "find",
        "join",
        "format",
    },
    dict: {"get", "items", "keys", "values"},
    list: {"index", "count"},
}


def _getattr(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        if name in _SAFE_METHODS[dict]:
            return getattr(obj, name)
        return UNDEFINED
    for kind, methods in _SAFE_METHODS.items():
        if isinstance(obj, kind) and name in methods:
            return getattr(obj, name)
    if isinstance(obj, (Namespace, _Loop)) and not name.startswith("_"):
        return getattr(obj, name, UNDEFINED)
    return UNDEFINED


def _getitem(obj: Any, key: Any) -> Any:
    try:
        return obj[key]
    except (KeyError, IndexError, TypeError):
        if isinstance(key, str):
            return _getattr(obj, key)
        return UNDEFINED


def _to_str(value: Any) -> str:
    if value is None:
        return "None"
    if value is True:
        return "True"
    if value is False:
        return "False"
    return str(value)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


_FILTERS: dict[str, Any] = {
    "trim": lambda v: _to_str(v).strip(),
    "length": len,
    "count": len,
    "upper": lambda v: _to_str(v).upper(),
    "lower": lambda v: _to_str(v).lower(),
    "title": lambda v: _to_str(v).title(),
    "capitalize": lambda v: _to_str(v).capitalize(),
    "tojson": _tojson,
    "string": _to_str,
    "int": lambda v, default=0: int(v) if str(v).lstrip("-").isdigit() else default,
    "join": lambda v, sep="": sep.join(_to_str(x) for x in v),
    "first": lambda v: next(iter(v), UNDEFINED),
    "last": lambda v: list(v)[-1] if len(v) else UNDEFINED,
    "default": lambda v, default="", boolean=False: (
        default if isinstance(v, _Undefined) or (boolean and not v) else v
    ),
    "list": list,
    "reverse": lambda v: list(reversed(list(v))),
    "items": lambda v: list(v.items()),
}

_TESTS: dict[str, Any] = {
    "defined": lambda v: not isinstance(v, _Undefined),
    "undefined": lambda v: isinstance(v, _Undefined),
    "none": lambda v: v is None,
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "true": lambda v: v is True,
    "false": lambda v: v is False,
    "mapping": lambda v: isinstance(v, dict),
    "sequence": lambda v: isinstance(v, (list, tuple, str)),
    "iterable": lambda v: isinstance(v, (list, tuple, str, dict)),
    "equalto": lambda v, other: v == other,
    "eq": lambda v, other: v == other,
}


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    """The sandbox has no wall clock; templates only use this for a date banner."""
    return "26 Jul 2024" if fmt == "%d %b %Y" else ""


class _Loop:
    def __init__(self, index0: int, length: int) -> None:
        self.index0 = index0
        self.index = index0 + 1
        self.length = length
        self.first = index0 == 0
        self.last = index0 == length - 1
        self.revindex = length - index0
        self.revindex0 = length - index0 - 1


def _eval(node: tuple, scope: dict) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "name":
        return scope.get(node[1], UNDEFINED)
    if kind == "attr":
        return _getattr(_eval(node[1], scope), node[2])
    if kind == "item":
        return _getitem(_eval(node[1], scope), _eval(node[2], scope))
    if kind == "slice":
        target = _eval(node[1], scope)
        start, stop, step = (None if n is None else _eval(n, scope) for n in node[2:])
        return target[start:stop:step]
    if kind == "list":
        return [_eval(n, scope) for n in node[1]]
    if kind == "dict":
        return {_eval(k, scope): _eval(v, scope) for k, v in node[1]}
    if kind == "cond":
        return _eval(node[2], scope) if _eval(node[1], scope) else _eval(node[3], scope)
    if kind == "or":
        left = _eval(node[1], scope)
        return left if left else _eval(node[2], scope)
    if kind == "and":
        left = _eval(node[1], scope)
        return _eval(node[2], scope) if left else left
    if kind == "not":
        return not _eval(node[1], scope)
    if kind == "neg":
        return -_eval(node[1], scope)
    if kind == "bin":
        return _binary(node[1], _eval(node[2], scope), _eval(node[3], scope))
    if kind == "test":
        test = _TESTS.get(node[1])
        if test is None:
            raise TemplateError(f"unsupported test 'is {node[1]}'")
        return test(_eval(node[2], scope), *(_eval(a, scope) for a in node[3]))
    if kind == "filter":
        func = _FILTERS.get(node[1])
        if func is None:
            raise TemplateError(f"unsupported filter '{node[1]}'")
        args, kwargs = _args(node[3], scope)
        return func(_eval(node[2], scope), *args, **kwargs)
    if kind == "call":
        func = _eval(node[1], scope)
        if not callable(func):
            raise TemplateError("call of something that is not a function")
        args, kwargs = _args(node[2], scope)
        return func(*args, **kwargs)
    raise TemplateError(f"cannot evaluate {kind}")


def _args(nodes: list, scope: dict) -> tuple[list, dict]:
    args = [_eval(n, scope) for n in nodes if n[0] != "kw"]
    kwargs = {n[1]: _eval(n[2], scope) for n in nodes if n[0] == "kw"}
    return args, kwargs


def _binary(op: str, left: Any, right: Any) -> Any:
    if op == "~":
        return _to_str(left) + _to_str(right)
    if op == "+" and (isinstance(left, _Undefined) or isinstance(right, _Undefined)):
        raise TemplateError("undefined value in '+'")
    if op == "in":
        return left in right
    ops = {
        "+": lambda: left + right,
        "-": lambda: left - right,
        "*": lambda: left * right,
        "/": lambda: left / right,
        "//": lambda: left // right,
        "%": lambda: left % right,
        "==": lambda: left == right,
        "!=": lambda: left != right,
        "<": lambda: left < right,
        ">": lambda: left > right,
        "<=": lambda: left <= right,
        ">=": lambda: left >= right,
    }
    try:
        return ops[op]()
    except TypeError as e:
        raise TemplateError(f"bad operands for {op!r}: {e}") from None


# --------------------------------------------------------------------------- statements

_TAG_RE = re.compile(r"({%-?|{{-?|{#-?)(.*?)(-?%}|-?}}|-?#})", re.DOTALL)


def _split(source: str) -> list[tuple[str, str]]:
    """('text'|'expr'|'stmt', body) pieces with whitespace control applied.

    Like Hugging Face's apply_chat_template environment: trim_blocks (drop the
    newline right after a block tag) and lstrip_blocks (drop spaces before a
    block tag on its line), plus the explicit `-` markers.
    """
    pieces: list[tuple[str, str]] = []
    pos = 0
    strip_next = False
    trim_newline = False
    for match in _TAG_RE.finditer(source):
        text = source[pos : match.start()]
        opener = match.group(1)[:2]
        if strip_next:
            text = text.lstrip()
        elif trim_newline and text.startswith("\n"):
            text = text[1:]
        if match.group(1).endswith("-"):
            text = text.rstrip()
        elif opener != "{{":
            line_start = text.rfind("\n") + 1
            if text[line_start:].strip(" \t") == "":
                text = text[:line_start]
        if text:
            pieces.append(("text", text))
        if opener == "{{":
            pieces.append(("expr", match.group(2)))
        elif opener == "{%":
            pieces.append(("stmt", match.group(2).strip()))
        strip_next = match.group(3).startswith("-")
        trim_newline = opener != "{{"
        pos = match.end()
    tail = source[pos:]
    if strip_next:
        tail = tail.lstrip()
    elif trim_newline and tail.startswith("\n"):
        tail = tail[1:]
    if tail:
        pieces.append(("text", tail))
    return pieces


def _compile(pieces: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Build a node list until one of the `stop` keywords; returns (nodes, next index, keyword)."""
    nodes: list = []
    while i < len(pieces):
        kind, body = pieces[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
            continue
        if kind == "expr":
            nodes.append(("out", _parse_expr(body)))
            continue
        keyword = body.split(None, 1)[0] if body else ""
        rest = body[len(keyword) :].strip()
        if keyword in stop:
            return nodes, i, body
        if keyword == "if":
            branches = []
            cond = _parse_expr(rest)
            while True:
                block, i, ended = _compile(pieces, i, ("elif", "else", "endif"))
                branches.append((cond, block))
                word = ended.split(None, 1)[0]
                if word == "endif":
                    break
                cond = _parse_expr(ended[4:].strip()) if word == "elif" else ("lit", True)
            nodes.append(("if", branches))
        elif keyword == "for":
            match = re.match(r"(.+?)\s+in\s+(.+)$", rest, re.DOTALL)
            if not match:
                raise TemplateError(f"bad for statement: {body!r}")
            targets = [t.strip() for t in match.group(1).split(",")]
            block, i, _ = _compile(pieces, i, ("endfor",))
            nodes.append(("for", targets, _parse_expr(match.group(2)), block))
        elif keyword == "set":
            match = re.match(r"([A-Za-z_][\w.]*)\s*=(.+)$", rest, re.DOTALL)
            if not match:
                raise TemplateError(f"unsupported set statement: {body!r}")
            nodes.append(("set", match.group(1), _parse_expr(match.group(2))))
        else:
            raise TemplateError(f"unsupported statement {{% {body} %}}")
    if stop:
        raise TemplateError(f"missing {{% {stop[-1]} %}}")
    return nodes, i, ""


def _run(nodes: list, scope: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(_to_str(_eval(node[1], scope)))
        elif kind == "if":
            for cond, block in node[1]:
                if _eval(cond, scope):
                    _run(block, scope, out)
                    break
        elif kind == "for":
            items = list(_eval(node[2], scope))
            outer = {name: scope.get(name, UNDEFINED) for name in (*node[1], "loop")}
            for index, item in enumerate(items):
                if len(node[1]) == 1:
                    scope[node[1][0]] = item
                else:
                    for name, value in zip(node[1], item, strict=True):
                        scope[name] = value
                scope["loop"] = _Loop(index, len(items))
                _run(node[3], scope, out)
            for name, value in outer.items():
                scope[name] = value
        elif kind == "set":
            value = _eval(node[2], scope)
            if "." in node[1]:
                owner, attr = node[1].split(".", 1)
                target = scope.get(owner)
                if not isinstance(target, Namespace):
                    raise TemplateError(f"set {node[1]}: {owner} is not a namespace")
                setattr(target, attr, value)
            else:
                scope[node[1]] = value


class Template:
    """A compiled chat template; render(**variables) -> str."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes, _, _ = _compile(_split(source), 0, ())

    def render(self, **variables: Any) -> str:
        scope: dict[str, Any] = {
            "raise_exception": _raise_exception,
            "namespace": Namespace,
            "range": range,
            "strftime_now": _strftime_now,
        }
        scope.update(variables)
        out: list[str] = []
        _run(self.nodes, scope, out)
        return "".join(out)


@functools.lru_cache(maxsize=16)
def compiled(source: str) -> Template:
    """The Template for `source`, parsed once per process.

    Every instance of a program on the same model renders the same chat template;
    parsing it costs about a millisecond inside the sandbox. The sandbox runtime
    parses the default model's template at build time, so its instances find it
    here already. A Template is never changed by rendering, so sharing one is safe.
    """
    return Template(source)
