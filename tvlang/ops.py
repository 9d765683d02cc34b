"""The language's element-wise functions and reductions: one table that every layer reads.

An :class:`ElementwiseOp` entry says everything about one function, in one place:

- its parameters (name and the kind each accepts) and its kind rule (:data:`KIND_RULES`), which
  :mod:`tvlang.lowering.builtins` turns into the function users call;
- its value on plain floats (constant folding, per-tensor numbers);
- its eager meaning on chunks (torch, ``out=`` a scratch buffer; operands already in the
  accumulation dtype or Python floats), which imports torch only when it runs;
- how each generated kernel spells it: a C template and a Triton template over the argument
  expressions ``{0}``, ``{1}``… (``{t}``: the C accumulation type, ``{f}``: libm's float suffix,
  ``""`` or ``"f"``; ``{T}``: the Triton type), None where that back-end has no such kernel.

Adding a function to the language is one entry here (and its test): see docs/extending.md.
Reductions are one :class:`Reduction` entry each, saying how a reduction pass's kernel feeds them.
Nothing here imports torch at module level: the compiled hot path never needs it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

KIND_RULES = {
    "vector": "on numbers a number; on task vectors a task vector; models are refused",
    "keeps": "every tensor operand a model (and no number among them): a model; else as `vector`",
    "select": "as `keeps`, over every operand but the first (a condition, any kind)",
}


@dataclass(frozen=True)
class ElementwiseOp:
    """One element-wise function: its value on floats, on chunks, and its C and Triton spellings."""

    name: str
    arity: int
    scalar: Callable[..., float]  # the value on plain floats
    chunk: Callable[..., Any]  # (out, *operands) -> None; operands are tensors or floats
    summary: str
    c: str | None  # the C expression template (None: no element-wise C spelling)
    triton: str | None  # the Triton expression template (None: Triton kernels refuse it)
    params: tuple[tuple[str, str], ...] = ()  # (name, kind) per parameter; default ("x", "value")…
    kind: str = "vector"  # a key of KIND_RULES
    triton_helpers: tuple[str, ...] = ()  # helper functions its Triton spelling calls
    operator: str | None = None  # an operator spelling (`<`): then not a function users call by name
    rows: bool = False  # a function of whole rows: each C kernel computes it row by row (tvlang.codegen.c)
    exact: bool = True  # whether the C and Triton spellings give the eager path's bits (libm: ≤ 1 ulp)

    @property
    def parameters(self) -> tuple[tuple[str, str], ...]:
        return self.params or tuple((n, "value") for n in ("x", "y", "z")[: self.arity])


@dataclass(frozen=True)
class Reduction:
    """A per-tensor (or per-column) statistic, accumulated over chunks in the passes before the
    element-wise pass.  ``kernel`` says what a reduction pass's kernel hands it per chunk:
    ``operand`` (the operand in the accumulation dtype), ``sum`` (float64 block sums of the operand),
    ``products`` (float64 block sums of the products of its two operands, or of the operand with
    itself for ``sumsq``), None (no kernel: eager)."""

    name: str
    operands: int  # tensor operands (kth's k is a number)
    kernel: str | None
    summary: str


_local = threading.local()


def work_buffer(name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A per-thread buffer reused across chunks, so element-wise ops allocate no temporaries
    on the hot path (freed temporaries fragment the heap: hundreds of MiB on large merges)."""
    import torch

    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        buffers[(name, dtype)] = buf
    return buf[:n]


def _t(x: Any, like: torch.Tensor) -> torch.Tensor:
    import torch

    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype)


def _torch(fn: str) -> Callable[..., None]:
    """``torch.<fn>`` of one operand into ``out``."""

    def run(out: torch.Tensor, x: Any) -> None:
        import torch

        getattr(torch, fn)(_t(x, out), out=out)

    return run


def _torch2(fn: str) -> Callable[..., None]:
    def run(out: torch.Tensor, a: Any, b: Any) -> None:
        import torch

        getattr(torch, fn)(_t(a, out), _t(b, out), out=out)

    return run


def _where(out: torch.Tensor, c: Any, a: Any, b: Any) -> None:
    import torch

    if not isinstance(c, torch.Tensor):  # a per-tensor number: one branch or the other, whole
        chosen = a if c else b
        out.copy_(chosen) if isinstance(chosen, torch.Tensor) else out.fill_(chosen)
        return
    cond = torch.ne(c, 0, out=work_buffer("where", torch.bool, c.numel()).view(c.shape))
    torch.where(cond, _t(a, out), _t(b, out), out=out)


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def _compare(fn: str) -> Callable[..., None]:
    def run(out: torch.Tensor, a: Any, b: Any) -> None:
        import torch

        if not isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):  # number on the left: flip
            getattr(torch, _FLIP[fn])(b, a, out=out)
        else:
            getattr(torch, fn)(_t(a, out), _t(b, out), out=out)

    return run


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def _whole_rows(out: torch.Tensor, x: Any) -> None:
    """A placeholder: row and column functions need the tensor's rows (tvlang.backends.interpreter runs them)."""
    raise NotImplementedError("a function of whole rows or columns runs in tvlang.backends.interpreter")


def _clamp(out: torch.Tensor, x: Any, lo: Any, hi: Any) -> None:
    import torch

    torch.clamp(_t(x, out), min=_t(lo, out), max=_t(hi, out), out=out)


def _nan_to_num_scalar(x: float, nan: float, posinf: float, neginf: float) -> float:
    if math.isnan(x):
        return nan
    if math.isinf(x):
        return posinf if x > 0 else neginf
    return x


def _nan_to_num(out: torch.Tensor, x: Any, nan: float, posinf: float, neginf: float) -> None:
    import torch

    if not isinstance(x, torch.Tensor):
        out.fill_(_nan_to_num_scalar(float(x), nan, posinf, neginf))
        return
    torch.nan_to_num(x, nan=nan, posinf=posinf, neginf=neginf, out=out)


def _libm(name: str, summary: str, scalar: Callable[[float], float]) -> ElementwiseOp:
    """A function of one operand that libm (C) and libdevice (Triton) spell by its name."""
    return ElementwiseOp(
        name, 1, scalar, _torch(name), summary, f"{name}{{f}}({{0}})", f"libdevice.{name}({{0}})", exact=False
    )


def _comparison(name: str, symbol: str, scalar: Callable[[float, float], bool]) -> ElementwiseOp:
    return ElementwiseOp(
        name,
        2,
        lambda a, b: float(scalar(a, b)),
        _compare(name),
        f"a {symbol} b as 1 or 0",
        f"({{0}} {symbol} {{1}} ? ({{t}})1 : ({{t}})0)",
        f"({{0}} {symbol} {{1}}).to({{T}})",
        operator=symbol,
    )


def _row(name: str, scalar: Callable[[float], float], summary: str) -> ElementwiseOp:
    return ElementwiseOp(
        name, 1, scalar, _whole_rows, summary, None, None, params=(("x", "delta"),), rows=True
    )


ELEMENTWISE: dict[str, ElementwiseOp] = {
    op.name: op
    for op in (
        ElementwiseOp("abs", 1, abs, _torch("abs"), "absolute value", "fabs{f}({0})", "tl.abs({0})"),
        ElementwiseOp(
            "sign",
            1,
            _sign,
            _torch("sign"),
            "-1, 0 or 1",
            "({t})TV_SIGN({0})",
            "({0} > 0.0).to({T}) - ({0} < 0.0).to({T})",  # 0 for ±0 and NaN, like torch.sign
        ),
        ElementwiseOp(
            "sqrt", 1, math.sqrt, _torch("sqrt"), "square root", "sqrt{f}({0})", "libdevice.sqrt_rn({0})"
        ),
        ElementwiseOp(
            "floor", 1, math.floor, _torch("floor"), "round down", "floor{f}({0})", "tl.floor({0})"
        ),
        ElementwiseOp("ceil", 1, math.ceil, _torch("ceil"), "round up", "ceil{f}({0})", "tl.ceil({0})"),
        _libm("sin", "sine", math.sin),
        _libm("acos", "arc cosine", math.acos),
        _libm("cos", "cosine", math.cos),
        _libm("exp", "e to the power x", math.exp),
        _libm("log", "natural logarithm", math.log),
        ElementwiseOp(
            "min",
            2,
            min,
            _torch2("minimum"),
            "element-wise minimum",
            "tv_min{f}({0}, {1})",
            "_minimum({0}, {1})",
            kind="keeps",
            triton_helpers=("minmax",),
        ),
        ElementwiseOp(
            "max",
            2,
            max,
            _torch2("maximum"),
            "element-wise maximum",
            "tv_max{f}({0}, {1})",
            "_maximum({0}, {1})",
            kind="keeps",
            triton_helpers=("minmax",),
        ),
        ElementwiseOp(
            "clamp",
            3,
            lambda x, lo, hi: min(max(x, lo), hi),
            _clamp,
            "clamp(x, lo, hi)",
            "tv_min{f}(tv_max{f}({0}, {1}), {2})",
            "_minimum(_maximum({0}, {1}), {2})",
            params=(("x", "value"), ("lo", "value"), ("hi", "value")),
            kind="keeps",
            triton_helpers=("minmax",),
        ),
        ElementwiseOp(
            "where",
            3,
            lambda c, a, b: a if c else b,
            _where,
            "where(cond, a, b): a where cond ≠ 0",
            "({0} != 0 ? {1} : {2})",
            "tl.where({0} != 0.0, {1}, {2})",
            params=(("cond", "value"), ("a", "value"), ("b", "value")),
            kind="select",
        ),
        ElementwiseOp(
            "nan_to_num",
            4,
            _nan_to_num_scalar,
            _nan_to_num,
            "x with NaN, +inf and -inf replaced by the numbers nan, posinf, neginf (torch.nan_to_num)",
            "({0} != {0} ? {1} : fabs{f}({0}) == ({t})INFINITY ? ({0} > 0 ? {2} : {3}) : {0})",
            "tl.where({0} != {0}, {1}, tl.where({0} - {0} == 0.0, {0}, tl.where({0} > 0.0, {2}, {3})))",
            params=(("x", "value"), ("nan", "number"), ("posinf", "number"), ("neginf", "number")),
        ),
        _row(
            "rowrank",
            lambda x: 0.5,
            "rank within its row, scaled to [0, 1] (ties by position); chunks hold whole rows",
        ),
        _row(
            "rowsum",
            lambda x: x,
            "the sum of its row (float64, in element order), at every element; chunks hold whole rows",
        ),
        _row(
            "rowmax", lambda x: x, "the largest element of its row, at every element; chunks hold whole rows"
        ),
        ElementwiseOp(
            "colsum",
            1,
            lambda x: x,
            _whole_rows,
            "the sum of its column (float64, in row order), at every element; one pass, chunks hold whole rows",
            None,
            None,
            params=(("x", "delta"),),
        ),
        _comparison("lt", "<", lambda a, b: a < b),
        _comparison("le", "<=", lambda a, b: a <= b),
        _comparison("gt", ">", lambda a, b: a > b),
        _comparison("ge", ">=", lambda a, b: a >= b),
        _comparison("eq", "==", lambda a, b: a == b),
        _comparison("ne", "!=", lambda a, b: a != b),
    )
}

REDUCTIONS: dict[str, Reduction] = {
    r.name: r
    for r in (
        Reduction("sum", 1, "sum", "the sum of all elements, float64 in 4096-element blocks"),
        Reduction("sumsq", 1, "products", "the sum of squares, products and sums in float64"),
        Reduction("dot", 2, "products", "the dot product, products and sums in float64"),
        Reduction("count", 1, "operand", "the number of non-zero elements"),
        Reduction("kth", 1, "operand", "the k-th largest element (exact radix selection)"),
        Reduction("colsum", 1, None, "per-column float64 sums, in row order"),
    )
}

# Functions of a whole row (the tensor seen as ``(shape[0], -1)``; a vector is one row): the planner
# makes every chunk hold whole rows; the eager path (tvlang.backends.interpreter) and the C kernels
# compute them, Triton kernels do not.
ROW_FUNCTIONS = frozenset(name for name, op in ELEMENTWISE.items() if op.rows)
# Functions of a whole column of that view: a reduction pass accumulates one number per column (flat
# memory: one row's worth), and the element-wise pass reads each element's column back.
COLUMN_FUNCTIONS = frozenset({"colsum"})

COMPARISONS = {op.operator: name for name, op in ELEMENTWISE.items() if op.operator is not None}
