"""``output adapter = as_lora(expr, rank=16)``: an output written as a PEFT LoRA adapter.

``as_lora`` is not a function of tensors: it says how an output is written, so it may only be the
whole value of an ``output`` line (or of a program's final bare expression).  This module takes
those wrappers off the syntax before lowering and returns what each one asked for; the API then
writes those outputs as adapters exactly as ``--as-lora`` would (``tvlang/io/lora_out.py``).

>>> from tvlang.syntax.parser import parse
>>> prog, specs = strip_adapters(parse('output ad = as_lora(ft - base, rank=8, svd="exact")', "<t>"))
>>> specs["ad"].rank, specs["ad"].base, specs["ad"].svd
(8, 'base', 'exact')
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tvlang.errors import TvParamError
from tvlang.options import SVD_METHODS
from tvlang.source import Span
from tvlang.syntax import ast

FUNCTION = "as_lora"
DEFAULT_OUTPUT = "out"  # the name of a program's bare final expression
CODE = "E408"


@dataclass(frozen=True)
class AdapterSpec:
    """One output to write as an adapter: its rank, the name of its base model, the SVD."""

    rank: int
    base: str = "base"
    svd: str = "auto"
    span: Span | None = None


def check_adapter(rank: object, svd: object, span: Span | None = None) -> None:
    """The values ``--as-lora``/``Options`` or ``as_lora(...)`` give, checked alike."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TvParamError(f"the LoRA rank must be a positive integer, not {rank!r}", span, code="E402")
    if svd not in SVD_METHODS:
        raise TvParamError(
            f"unknown SVD method {svd!r}", span, help="choose " + ", ".join(SVD_METHODS), code="E402"
        )


def _misplaced(node: ast.Call) -> TvParamError:
    return TvParamError(
        f"`{FUNCTION}(...)` says how an output is written, so it is the whole value of an `output` line",
        node.span,
        label="here it is inside an expression",
        help=f"write `output adapter = {FUNCTION}(expr, rank=16)`",
        code=CODE,
    )


def _refuse_nested(expr: ast.Expr | None) -> None:
    if isinstance(expr, ast.Call):
        if expr.func.id == FUNCTION:
            raise _misplaced(expr)
        for arg in expr.args:
            _refuse_nested(arg)
        for kw in expr.kwargs:
            _refuse_nested(kw.value)
    elif isinstance(expr, ast.Unary):
        _refuse_nested(expr.operand)
    elif isinstance(expr, (ast.Binary, ast.Compare)):
        _refuse_nested(expr.left)
        _refuse_nested(expr.right)
    elif isinstance(expr, ast.List):
        for item in expr.items:
            _refuse_nested(item)


def _spec(call: ast.Call) -> tuple[ast.Expr, AdapterSpec]:
    if len(call.args) != 1:
        raise TvParamError(
            f"`{FUNCTION}` takes one task vector or model, then rank=, base=, svd=",
            call.span,
            help=f"e.g. {FUNCTION}(ft - base, rank=16)",
            code=CODE,
        )
    rank: int | None = None
    base, svd = "base", "auto"
    for kw in call.kwargs:
        key, value = kw.name.id, kw.value
        if key == "rank":
            if not (isinstance(value, ast.Number) and float(value.value).is_integer()):
                raise TvParamError("`rank` is a whole number written out", value.span, code=CODE)
            rank = int(value.value)
            check_adapter(rank, "auto", value.span)
        elif key == "base":
            if not isinstance(value, ast.Name):
                raise TvParamError(
                    "`base` names the adapter's base model", value.span, help="e.g. base=base", code=CODE
                )
            base = value.id
        elif key == "svd":
            if not isinstance(value, ast.String):
                raise TvParamError('`svd` is "auto", "exact" or "randomized"', value.span, code=CODE)
            svd = value.value
            check_adapter(1, svd, value.span)
        else:
            raise TvParamError(
                f"`{FUNCTION}` has no argument `{key}`",
                kw.name.span,
                help="its arguments: rank, base, svd",
                code=CODE,
            )
    if rank is None:
        raise TvParamError(
            f"`{FUNCTION}` needs the adapter's rank",
            call.span,
            help=f"e.g. {FUNCTION}(ft - base, rank=16)",
            code=CODE,
        )
    return call.args[0], AdapterSpec(rank, base, svd, call.span)


def strip_adapters(program: ast.Program) -> tuple[ast.Program, dict[str, AdapterSpec]]:
    """The program with each ``output NAME = as_lora(expr, ...)`` turned into ``output NAME = expr``,
    and the adapter each one asked for, by output name.  A program that defines its own
    ``as_lora`` is left as it is."""
    if any(isinstance(s, ast.Define) and s.name.id == FUNCTION for s in program.statements):
        return program, {}
    specs: dict[str, AdapterSpec] = {}
    statements: list[ast.Stmt] = []
    for stmt in program.statements:
        if (
            isinstance(stmt, (ast.Output, ast.ExprStmt))
            and isinstance(stmt.value, ast.Call)
            and stmt.value.func.id == FUNCTION
        ):
            inner, spec = _spec(stmt.value)
            _refuse_nested(inner)
            if isinstance(stmt, ast.Output):
                specs[stmt.target.id] = spec
                statements.append(replace(stmt, value=inner))
            else:
                specs[DEFAULT_OUTPUT] = spec
                statements.append(replace(stmt, value=inner))
            continue
        if isinstance(stmt, (ast.Binding, ast.Output, ast.ExprStmt)):
            _refuse_nested(stmt.value)
        elif isinstance(stmt, ast.Param):
            _refuse_nested(stmt.default)
        elif isinstance(stmt, ast.Define):
            _refuse_nested(stmt.body)
        statements.append(stmt)
    return (replace(program, statements=tuple(statements)) if specs else program), specs


__all__ = ["CODE", "FUNCTION", "AdapterSpec", "check_adapter", "strip_adapters"]
