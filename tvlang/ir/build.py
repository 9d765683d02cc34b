"""Checked IR constructors: the one place that turns an operation into a node with its kind.

The lowering and the merge-method builders both use these, so a method written
in Python obeys exactly the rules a user's expression does.
"""

from __future__ import annotations

import math

from tvlang.check import KindError, binary_kind, unary_kind
from tvlang.ir.node import DELTA, SCALAR, Kind, Node, Op, const, scalar_value

_BINARY = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "**": Op.POW}


def lift(x: Node | float) -> Node:
    return x if isinstance(x, Node) else const(x)


def binary(op: str, left: Node | float, right: Node | float) -> Node:
    """``left op right``; raises :class:`tvlang.check.KindError` when the kinds do not combine."""
    a, b = lift(left), lift(right)
    kind = binary_kind(op, a.kind, b.kind, scalar_value(a), scalar_value(b))
    if not kind.tensor and scalar_value(a) is not None and scalar_value(b) is not None:
        value = scalar_value(Node(_BINARY[op], (a, b), None, kind))
        if value is None or not math.isfinite(value):
            raise KindError(
                "this is not a finite real number",
                "evaluates to " + ("a complex number" if value is None else str(value)),
            )
    if op == "*" and a.kind.tensor and not b.kind.tensor:  # canonical: the scalar first
        a, b = b, a
    return Node(_BINARY[op], (a, b), None, kind)


def add(a: Node | float, b: Node | float) -> Node:
    return binary("+", a, b)


def sub(a: Node | float, b: Node | float) -> Node:
    return binary("-", a, b)


def mul(a: Node | float, b: Node | float) -> Node:
    return binary("*", a, b)


def div(a: Node | float, b: Node | float) -> Node:
    return binary("/", a, b)


def neg(a: Node) -> Node:
    return Node(Op.NEG, (a,), None, unary_kind("-", a.kind))


def call(name: str, *args: Node | float, kind: Kind | None = None) -> Node:
    """An element-wise function.  On numbers it is a number; on tensors a vector (a delta)
    unless ``kind`` says otherwise (``where``/``clamp`` keep their operands' kind)."""
    nodes = tuple(lift(a) for a in args)
    if kind is None:
        kind = DELTA if any(n.kind.tensor for n in nodes) else SCALAR
    return Node(Op.CALL, nodes, name, kind)


def reduce(name: str, *args: Node | float) -> Node:
    """A per-tensor reduction (sum, sumsq, dot, count, kth): a scalar that needs a pass over the data."""
    return Node(Op.REDUCE, tuple(lift(a) for a in args), name, SCALAR)


def model_kth(x: Node, density: Node | float) -> Node:
    """The k-th largest element of ``x`` over the whole model, k = floor(density · total elements)."""
    return Node(Op.GLOBAL, (x, lift(density)), "kth", SCALAR)


def context(*what: object) -> Node:
    """A per-tensor number known from the tensor's name (see tvlang.context)."""
    return Node(Op.CTX, (), tuple(what), SCALAR)


def numel(x: Node) -> Node:
    return Node(Op.NUMEL, (x,), None, SCALAR)


def rand(like: Node, seed: int, stream: str) -> Node:
    return Node(Op.RAND, (like,), (int(seed), stream), DELTA)


def with_kind(node: Node, kind: Kind) -> Node:
    """The same computation declared as ``kind`` (for methods such as slerp whose result is a model
    although its per-tensor coefficients are not known before the data is read)."""
    return Node(node.op, node.args, node.arg, kind)
