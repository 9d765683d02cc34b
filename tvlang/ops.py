"""Element-wise functions: one table shared by constant folding and the kernels.

Each entry gives the arity, the value on plain floats (used when every operand
is a number) and the torch implementation on chunks (``out=`` a scratch buffer,
operands already in the accumulation dtype or Python floats).
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:

    class _Lazy:
        """torch, imported at the first use of a chunk function (constant folding never needs it)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(importlib.import_module("torch"), name)

    torch = _Lazy()


@dataclass(frozen=True)
class ElementwiseOp:
    name: str
    arity: int
    scalar: Callable[..., float]
    chunk: Callable[..., Any]  # (out, *operands) -> None; operands are tensors or floats
    summary: str


_local = threading.local()


def work_buffer(name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A per-thread buffer reused across chunks, so element-wise ops allocate no temporaries
    on the hot path (freed temporaries fragment the heap: hundreds of MiB on large merges)."""
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        buffers[(name, dtype)] = buf
    return buf[:n]


def _t(x: Any, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype)


def _where(out: torch.Tensor, c: Any, a: Any, b: Any) -> None:
    if not isinstance(c, torch.Tensor):  # a per-tensor number: one branch or the other, whole
        chosen = a if c else b
        out.copy_(chosen) if isinstance(chosen, torch.Tensor) else out.fill_(chosen)
        return
    cond = torch.ne(c, 0, out=work_buffer("where", torch.bool, c.numel()).view(c.shape))
    torch.where(cond, _t(a, out), _t(b, out), out=out)


def _compare(name: str) -> Callable[..., None]:
    def run(out: torch.Tensor, a: Any, b: Any) -> None:
        if not isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):  # number on the left: flip
            getattr(torch, _FLIP.get(name, name))(b, a, out=out)
        else:
            getattr(torch, name)(_t(a, out), _t(b, out), out=out)

    return run


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def _whole_rows(out: torch.Tensor, x: Any) -> None:
    """A placeholder: row and column functions need the tensor's rows (tvlang.backends.program runs them)."""
    raise NotImplementedError("a function of whole rows or columns runs in tvlang.backends.program")


def _clamp(out: torch.Tensor, x: Any, lo: Any, hi: Any) -> None:
    torch.clamp(_t(x, out), min=_t(lo, out), max=_t(hi, out), out=out)


ELEMENTWISE: dict[str, ElementwiseOp] = {
    op.name: op
    for op in (
        ElementwiseOp("abs", 1, abs, lambda out, x: torch.abs(_t(x, out), out=out), "absolute value"),
        ElementwiseOp("sign", 1, _sign, lambda out, x: torch.sign(_t(x, out), out=out), "-1, 0 or 1"),
        ElementwiseOp("sqrt", 1, math.sqrt, lambda out, x: torch.sqrt(_t(x, out), out=out), "square root"),
        ElementwiseOp("floor", 1, math.floor, lambda out, x: torch.floor(_t(x, out), out=out), "round down"),
        ElementwiseOp("ceil", 1, math.ceil, lambda out, x: torch.ceil(_t(x, out), out=out), "round up"),
        ElementwiseOp("sin", 1, math.sin, lambda out, x: torch.sin(_t(x, out), out=out), "sine"),
        ElementwiseOp("acos", 1, math.acos, lambda out, x: torch.acos(_t(x, out), out=out), "arc cosine"),
        ElementwiseOp("cos", 1, math.cos, lambda out, x: torch.cos(_t(x, out), out=out), "cosine"),
        ElementwiseOp("exp", 1, math.exp, lambda out, x: torch.exp(_t(x, out), out=out), "e to the power x"),
        ElementwiseOp("log", 1, math.log, lambda out, x: torch.log(_t(x, out), out=out), "natural logarithm"),
        ElementwiseOp(
            "min",
            2,
            min,
            lambda out, a, b: torch.minimum(_t(a, out), _t(b, out), out=out),
            "element-wise minimum",
        ),
        ElementwiseOp(
            "max",
            2,
            max,
            lambda out, a, b: torch.maximum(_t(a, out), _t(b, out), out=out),
            "element-wise maximum",
        ),
        ElementwiseOp("clamp", 3, lambda x, lo, hi: min(max(x, lo), hi), _clamp, "clamp(x, lo, hi)"),
        ElementwiseOp(
            "where", 3, lambda c, a, b: a if c else b, _where, "where(cond, a, b): a where cond ≠ 0"
        ),
        ElementwiseOp(
            "rowrank",
            1,
            lambda x: 0.5,
            lambda out, x: out.fill_(0.5),  # needs the row length: run by tvlang.backends.program.row_rank
            "rank within its row, scaled to [0, 1] (ties by position); chunks hold whole rows",
        ),
        ElementwiseOp(
            "rowsum",
            1,
            lambda x: x,
            _whole_rows,
            "the sum of its row (float64, in element order), at every element; chunks hold whole rows",
        ),
        ElementwiseOp(
            "rowmax",
            1,
            lambda x: x,
            _whole_rows,
            "the largest element of its row, at every element; chunks hold whole rows",
        ),
        ElementwiseOp(
            "colsum",
            1,
            lambda x: x,
            _whole_rows,
            "the sum of its column (float64, in row order), at every element; one pass, chunks hold whole rows",
        ),
        ElementwiseOp("lt", 2, lambda a, b: float(a < b), _compare("lt"), "a < b as 1 or 0"),
        ElementwiseOp("le", 2, lambda a, b: float(a <= b), _compare("le"), "a <= b as 1 or 0"),
        ElementwiseOp("gt", 2, lambda a, b: float(a > b), _compare("gt"), "a > b as 1 or 0"),
        ElementwiseOp("ge", 2, lambda a, b: float(a >= b), _compare("ge"), "a >= b as 1 or 0"),
        ElementwiseOp("eq", 2, lambda a, b: float(a == b), _compare("eq"), "a == b as 1 or 0"),
        ElementwiseOp("ne", 2, lambda a, b: float(a != b), _compare("ne"), "a != b as 1 or 0"),
    )
}

# Functions of a whole row (the tensor seen as ``(shape[0], -1)``; a vector is one row): the planner
# makes every chunk hold whole rows, and only the eager path computes them.
ROW_FUNCTIONS = frozenset({"rowrank", "rowsum", "rowmax"})
# Functions of a whole column of that view: a reduction pass accumulates one number per column (flat
# memory: one row's worth), and the element-wise pass reads each element's column back.
COLUMN_FUNCTIONS = frozenset({"colsum"})

COMPARISONS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
