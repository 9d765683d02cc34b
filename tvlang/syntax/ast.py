"""The abstract syntax tree: frozen, slotted dataclasses, each with its source span.

The parser builds it; :mod:`tvlang.lowering.lower` walks it.  Nothing here knows about
kinds or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvlang.source import SourceText, Span


@dataclass(frozen=True, slots=True)
class Number:
    """A number literal."""

    value: float
    span: Span


@dataclass(frozen=True, slots=True)
class String:
    """A string literal."""

    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class Name:
    """A name."""

    id: str
    span: Span


@dataclass(frozen=True, slots=True)
class Unary:
    """A unary ``-x`` or ``+x``."""

    op: str  # "-" or "+"
    operand: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Binary:
    """A binary operation."""

    op: str  # "+", "-", "*", "/", "**"
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Keyword:
    """A keyword argument, ``name=value``."""

    name: Name
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    """A function call."""

    func: Name
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Compare:
    """A comparison."""

    op: str  # "<", "<=", ">", ">=", "==", "!="
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class List:
    """``[a, b, c]``: only as a function argument (e.g. ``weights=[0.5, 0.5]``)."""

    items: tuple[Expr, ...]
    span: Span


Expr = Number | String | Name | Unary | Binary | Compare | List | Call


@dataclass(frozen=True, slots=True)
class Binding:
    """``name = expr``"""

    target: Name
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Param:
    """``param name = default``: a scalar the caller may override."""

    target: Name
    default: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Output:
    """``output name = expr``: a checkpoint to write."""

    target: Name
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class ExprStmt:
    """A bare expression: the program's result when it has no ``output``."""

    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Define:
    """``def name(a, b, density=0.5) = expr``: a method, expanded where it is called."""

    name: Name
    params: tuple[tuple[Name, Expr | None], ...]
    body: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Vocab:
    """``vocab union, base=base`` or ``vocab chatml``: the output's vocabulary; embedding and head
    rows are matched by token string, not by index."""

    source: Name
    options: tuple[Keyword, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class TokenRow:
    """``token "<|im_end|>" = chatml, force``: where one token's rows come from."""

    token: String
    model: Name  # a model, or `zero`
    index: String | Number | None  # another token of the model (its string or id)
    flags: tuple[Name, ...]  # `force`
    span: Span


Stmt = Binding | Param | Output | ExprStmt | Define | Vocab | TokenRow


@dataclass(frozen=True, slots=True)
class Program:
    """A whole program (or an expression as one): its statements."""

    statements: tuple[Stmt, ...]
    source: SourceText
