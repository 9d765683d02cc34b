"""The parser proper: text → Lark parse tree (LALR, with positions) → AST, and Lark's errors as
positioned :class:`~tvlang.errors.TvSyntaxError`.

Only :func:`tvlang.syntax.parser.parse` calls it, on a miss of the parse cache
(:mod:`tvlang.syntax.cached`): a repeated run never imports Lark.  The cache's key covers this
module's source, so changing the transform below invalidates every cached parse.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from functools import cache
from typing import Any

from tvlang.cache import cache_root
from tvlang.errors import TvSyntaxError
from tvlang.source import SourceText, Span
from tvlang.syntax import ast, lark_import
from tvlang.syntax.grammar import MAX_NESTING, grammar_text, too_deep

with lark_import():  # without the optional `regex` module in the command's process
    import lark
    from lark import Lark, Token, Transformer, v_args
    from lark.grammar import Rule
    from lark.lark import PostLex
    from lark.lexer import TerminalDef

_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


class _NewlinesInParens(PostLex):
    """Drop newline tokens inside parentheses so expressions can wrap over lines."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
                if depth > MAX_NESTING:
                    raise _TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


class _TooDeep(Exception):
    def __init__(self, tok: Token) -> None:
        self.tok = tok


_OPTIONS: dict[str, Any] = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": False}


@cache
def _lark() -> Lark:
    """The parser.  Building the LALR tables takes about 70 ms, half of a merge's start-up, so they
    are kept in the cache directory (:mod:`tvlang.cache`) as JSON, named by a hash of the grammar,
    the options and Lark's version, and loaded in about 3 ms; nothing there is ever executed."""
    text = grammar_text()
    key = hashlib.sha256(f"{text}{sorted(_OPTIONS.items())}{lark.__version__}".encode()).hexdigest()[:32]
    path = cache_root() / "grammar" / f"{key}.json"
    try:
        with open(path, encoding="utf-8") as f:
            tables = json.load(f, object_hook=_untag)
        load = Lark._load_from_dict  # (untyped in Lark)
        loaded: Lark = load(tables["data"], tables["memo"], postlex=_NewlinesInParens())  # type: ignore[no-untyped-call]
        return loaded
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass  # not built yet (or unreadable): build it
    parser = Lark(text, postlex=_NewlinesInParens(), **_OPTIONS)
    data, memo = parser.memo_serialize([TerminalDef, Rule])
    data["options"] = {k: v for k, v in data["options"].items() if k != "postlex"}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_tag({"data": data, "memo": memo}), f)
        os.replace(tmp, path)  # atomic: concurrent processes see a whole file or none
    except OSError:  # no writable cache: build it each time
        pass
    return parser


def _tag(x: Any) -> Any:
    """Lark's serialised tables as JSON: dicts with other than string keys and tuples tagged."""
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("~") for k in x):
            return {k: _tag(v) for k, v in x.items()}
        return {"~d": [[_tag(k), _tag(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"~t": [_tag(v) for v in x]}
    if isinstance(x, list):
        return [_tag(v) for v in x]
    if x is None or isinstance(x, str | int | float | bool):
        return x
    raise TypeError(f"cannot keep {type(x).__name__} in the grammar cache")


def _untag(d: dict[str, Any]) -> Any:
    if len(d) == 1 and "~d" in d:
        return {k: v for k, v in d["~d"]}
    if len(d) == 1 and "~t" in d:
        return tuple(d["~t"])
    return d


_FRIENDLY = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "COMMA": "`,`",
    "EQUAL": "`=`",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "__ANON_0": "`**`",
    "_NL": "a new line",
    "$END": "the end of the input",
    "PARAM": "`param`",
    "DEF": "`def`",
    "COMPARE": "a comparison",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "OUTPUT": "`output`",
    "VOCAB": "`vocab`",
    "TOKEN": "`token`",
}


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of input"
    if tok.type == "_NL":
        return "end of line"
    return f"`{tok.value}`"


_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "__ANON_0"}


def _expected(names: set[str]) -> str:
    """A short English list of what the parser could have accepted."""
    if names == {"NAME"}:
        return "a name"
    if names & {"NAME", "NUMBER", "STRING"}:
        return "an expression"
    friendly = []
    if names & _OPERATORS:
        friendly.append("an operator")
    friendly.extend(sorted(_FRIENDLY.get(n, n.lower()) for n in names - _OPERATORS - {"LPAR", "$END"}))
    if "$END" in names and "_NL" not in names:
        friendly.append(_FRIENDLY["$END"])
    if len(friendly) <= 2:
        return " or ".join(friendly)
    return ", ".join(friendly[:-1]) + " or " + friendly[-1]


def parse(source: SourceText) -> ast.Program:
    """Parse ``source`` with Lark; a syntax error is a positioned :class:`TvSyntaxError`."""
    text = source.text
    try:
        tree = _lark().parse(text)
    except _TooDeep as exc:
        pos = exc.tok.start_pos or 0
        raise TvSyntaxError(
            f"parentheses nest more than {MAX_NESTING} deep", Span(source, pos, pos + 1), code="E103"
        ) from None
    except lark.UnexpectedCharacters as exc:
        pos = exc.pos_in_stream or 0
        raise TvSyntaxError(
            f"unexpected character {text[pos]!r}",
            Span(source, pos, pos + 1),
            label="not part of the language",
            code="E101",
        ) from None
    except lark.UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            pos = len(text.rstrip())
            span = Span(source, pos, pos)
        else:
            pos = tok.start_pos or 0
            span = Span(source, pos, tok.end_pos or pos + 1)
        expected = _expected(set(exc.accepts or exc.expected))
        raise TvSyntaxError(
            f"unexpected {_describe_token(tok)}", span, label=f"expected {expected}", code="E100"
        ) from None
    except lark.UnexpectedEOF as exc:
        pos = len(text.rstrip())
        raise TvSyntaxError(
            "unexpected end of input",
            Span(source, pos, pos),
            label=f"expected {_expected(set(exc.expected))}",
            code="E100",
        ) from None
    except RecursionError:
        raise TvSyntaxError("expression nests too deeply", Span(source, 0, 0), code="E103") from None
    try:
        return _ToAst(source).transform_program(tree)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, TvSyntaxError):
            raise exc.orig_exc from None
        if isinstance(exc.orig_exc, RecursionError):
            raise too_deep(source) from None
        raise
    except RecursionError:
        raise too_deep(source) from None


class _ToAst(Transformer[Token, Any]):
    """Lark parse tree → :mod:`tvlang.syntax.ast` nodes with spans."""

    def __init__(self, source: SourceText) -> None:
        super().__init__()
        self.source = source

    def transform_program(self, tree: lark.Tree[Token]) -> ast.Program:
        statements = self.transform(tree)
        return ast.Program(tuple(statements), self.source)

    def _span(self, meta: Any) -> Span:
        return Span(self.source, meta.start_pos, meta.end_pos)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.source, tok.start_pos or 0, tok.end_pos or 0)

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(str(tok), self._tok_span(tok))

    def start(self, children: list[ast.Stmt]) -> list[ast.Stmt]:
        return children

    @v_args(meta=True)
    def binding(self, meta: Any, children: list[Any]) -> ast.Binding:
        return ast.Binding(self._name(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def param(self, meta: Any, children: list[Any]) -> ast.Param:
        return ast.Param(self._name(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def output(self, meta: Any, children: list[Any]) -> ast.Output:
        return ast.Output(self._name(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def define(self, meta: Any, children: list[Any]) -> ast.Define:
        params = children[1] if len(children) > 2 else []
        return ast.Define(self._name(children[0]), tuple(params), children[-1], self._span(meta))

    @v_args(meta=True)
    def vocab(self, meta: Any, children: list[Any]) -> ast.Vocab:
        return ast.Vocab(self._name(children[0]), tuple(children[1:]), self._span(meta))

    @v_args(meta=True)
    def vocab_option(self, meta: Any, children: list[Any]) -> ast.Keyword:
        return ast.Keyword(self._name(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def token(self, meta: Any, children: list[Any]) -> ast.TokenRow:
        token, model, *rest = children
        index = rest.pop(0) if rest and isinstance(rest[0], (ast.String, ast.Number)) else None
        return ast.TokenRow(
            self.string([token]), self._name(model), index, tuple(map(self._name, rest)), self._span(meta)
        )

    def token_index(self, children: list[Token]) -> ast.String | ast.Number:
        tok = children[0]
        return self.string([tok]) if tok.type == "STRING" else self.number([tok])

    def defparams(self, children: list[Any]) -> list[Any]:
        return children

    def defparam(self, children: list[Any]) -> tuple[ast.Name, ast.Expr | None]:
        return (self._name(children[0]), children[1] if len(children) > 1 else None)

    @v_args(meta=True)
    def compare(self, meta: Any, children: list[Any]) -> ast.Compare:
        return ast.Compare(str(children[1]), children[0], children[2], self._span(meta))

    @v_args(meta=True)
    def list_expr(self, meta: Any, children: list[Any]) -> ast.List:
        items = children[0] if children else []
        return ast.List(tuple(items), self._span(meta))

    def exprlist(self, children: list[Any]) -> list[Any]:
        return children

    @v_args(meta=True)
    def expr_stmt(self, meta: Any, children: list[Any]) -> ast.ExprStmt:
        return ast.ExprStmt(children[0], self._span(meta))

    def number(self, children: list[Token]) -> ast.Number:
        tok = children[0]
        value = float(tok)
        if not math.isfinite(value):
            raise TvSyntaxError(
                f"`{tok}` is too large to be a number",
                self._tok_span(tok),
                label="beyond the float64 range (±1.8e308)",
                code="E103",
            )
        return ast.Number(value, self._tok_span(tok))

    def string(self, children: list[Token]) -> ast.String:
        tok = children[0]
        body = str(tok)[1:-1]
        bad = next((m for m in _ESCAPE.finditer(body) if m.group(1) not in _ESCAPES), None)
        if bad is not None:
            start = (tok.start_pos or 0) + 1 + bad.start()
            raise TvSyntaxError(
                f"unknown escape `{bad.group(0)}` in string",
                Span(self.source, start, start + 2),
                help="write a backslash as `\\\\`; known escapes: " + " ".join(f"\\{c}" for c in _ESCAPES),
                code="E102",
            )
        value = _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], body)
        return ast.String(value, self._tok_span(tok))

    def name(self, children: list[Token]) -> ast.Name:
        return self._name(children[0])

    def _binary(self, op: str, meta: Any, children: list[Any]) -> ast.Binary:
        return ast.Binary(op, children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def add(self, meta: Any, children: list[Any]) -> ast.Binary:
        return self._binary("+", meta, children)

    @v_args(meta=True)
    def sub(self, meta: Any, children: list[Any]) -> ast.Binary:
        return self._binary("-", meta, children)

    @v_args(meta=True)
    def mul(self, meta: Any, children: list[Any]) -> ast.Binary:
        return self._binary("*", meta, children)

    @v_args(meta=True)
    def div(self, meta: Any, children: list[Any]) -> ast.Binary:
        return self._binary("/", meta, children)

    @v_args(meta=True)
    def pow(self, meta: Any, children: list[Any]) -> ast.Binary:
        return self._binary("**", meta, children)

    @v_args(meta=True)
    def neg(self, meta: Any, children: list[Any]) -> ast.Unary:
        return ast.Unary("-", children[0], self._span(meta))

    @v_args(meta=True)
    def pos(self, meta: Any, children: list[Any]) -> ast.Unary:
        return ast.Unary("+", children[0], self._span(meta))

    @v_args(meta=True)
    def call(self, meta: Any, children: list[Any]) -> ast.Call:
        func = self._name(children[0])
        items = children[1] if len(children) > 1 else []
        args = tuple(a for a in items if not isinstance(a, ast.Keyword))
        kwargs = tuple(a for a in items if isinstance(a, ast.Keyword))
        first_kw = next((i for i, a in enumerate(items) if isinstance(a, ast.Keyword)), len(items))
        if len(args) > first_kw:
            stray = items[first_kw + 1 :][
                [isinstance(a, ast.Keyword) for a in items[first_kw + 1 :]].index(False)
            ]
            raise TvSyntaxError(
                "positional argument after a keyword argument",
                stray.span,
                label="move it before the keyword arguments",
                code="E104",
            )
        return ast.Call(func, args, kwargs, self._span(meta))

    def arglist(self, children: list[Any]) -> list[Any]:
        return children

    @v_args(meta=True)
    def kwarg(self, meta: Any, children: list[Any]) -> ast.Keyword:
        return ast.Keyword(self._name(children[0]), children[1], self._span(meta))
