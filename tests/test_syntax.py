"""The parser: the language's forms, positions, and friendly syntax errors."""

from __future__ import annotations

import pytest

from tvlang.errors import TvSyntaxError
from tvlang.syntax import ast
from tvlang.syntax.parser import parse


def only_expr(text: str) -> ast.Expr:
    (stmt,) = parse(text).statements
    assert isinstance(stmt, ast.ExprStmt)
    return stmt.value


def show(e: ast.Expr) -> str:
    """A fully parenthesised rendering, to pin precedence."""
    if isinstance(e, ast.Number):
        return repr(e.value)
    if isinstance(e, ast.String):
        return repr(e.value)
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Unary):
        return f"({e.op}{show(e.operand)})"
    if isinstance(e, ast.Binary):
        return f"({show(e.left)} {e.op} {show(e.right)})"
    args = [show(a) for a in e.args] + [f"{k.name.id}={show(k.value)}" for k in e.kwargs]
    return f"{e.func.id}({', '.join(args)})"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a + b * c", "(a + (b * c))"),
        ("a - b - c", "((a - b) - c)"),
        ("a / 2 / 4", "((a / 2.0) / 4.0)"),
        ("-a + b", "((-a) + b)"),
        ("-2**2", "(-(2.0 ** 2.0))"),
        ("2**-1", "(2.0 ** (-1.0))"),
        ("2 ** 3 ** 2", "(2.0 ** (3.0 ** 2.0))"),
        ("+a", "(+a)"),
        ("1e-3*a + .5*b + 3.*c", "(((0.001 * a) + (0.5 * b)) + (3.0 * c))"),
        ("f()", "f()"),
        ("f(a, b=2,)", "f(a, b=2.0)"),
        ("load('x\\'y')", 'load("x\'y")'),
        (
            "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic",
            "((base + (0.4 * ((amazon_sent - amazon_lm) + yelp_lm))) - toxic)",
        ),
    ],
)
def test_precedence_and_forms(text: str, expected: str) -> None:
    assert show(only_expr(text)) == expected


def test_program_statements_comments_and_wrapping() -> None:
    prog = parse(
        "# header comment\n"
        "\n"
        'base = load("b")   # trailing comment\n'
        "param lam = 0.4\n"
        "output merged = base + lam*(\n"
        "    x - base\n"
        ")\n"
        "output other = base \\\n"
        "    + 0\n"
    )
    kinds = [type(s).__name__ for s in prog.statements]
    assert kinds == ["Binding", "Param", "Output", "Output"]
    out = prog.statements[2]
    assert isinstance(out, ast.Output) and out.target.id == "merged"
    assert out.span.line_col() == (5, 1)
    assert out.value.span.text.startswith("base + lam*(")


def test_spans_point_at_source() -> None:
    e = only_expr("alpha +  beta")
    assert isinstance(e, ast.Binary)
    assert e.right.span.line_col() == (1, 10)
    assert e.right.span.text == "beta"


@pytest.mark.parametrize(
    ("text", "code", "where"),
    [
        ("a +", "E100", (1, 4)),
        ("a + )", "E100", (1, 5)),
        ("a b", "E100", (1, 3)),
        ("x = 3 4", "E100", (1, 7)),
        ("a $ b", "E101", (1, 3)),
        ("f(y=2, 3)", "E104", (1, 8)),
        ("param = 3", "E100", (1, 7)),
        ("((a)", "E100", (1, 5)),
        ('load("a\\q")', "E102", (1, 8)),
        ("(" * 300 + "a" + ")" * 300, "E103", (1, 201)),
    ],
)
def test_syntax_errors_are_positioned(text: str, code: str, where: tuple[int, int]) -> None:
    with pytest.raises(TvSyntaxError) as info:
        parse(text)
    err = info.value
    assert err.code == code
    assert err.span is not None and err.span.line_col() == where
    assert isinstance(err, ValueError)  # the builtin category too


def test_source_size_limit() -> None:
    with pytest.raises(TvSyntaxError, match="limit"):
        parse("a" * 1_000_001)
