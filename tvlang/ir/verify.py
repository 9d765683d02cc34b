"""The IR verifier: invariants every pass must keep.  Tests run it after each pass."""

from __future__ import annotations

import math

from tvlang.ir.node import MASS_TOLERANCE, Graph, Node, Op, scalar_value
from tvlang.ir.printer import format_graph


class IRVerifyError(AssertionError):
    """An internal invariant broke: a compiler bug, not a user error."""


def verify(graph: Graph) -> None:
    for node in graph.nodes():
        problem = _check(node)
        if problem:
            raise IRVerifyError(f"{problem} in node {node!r}\n{format_graph(graph)}")
    for name, node in graph.outputs:
        if not (node.kind.is_model or node.kind.is_delta):
            raise IRVerifyError(f"output {name} has kind {node.kind}")


def _mass(node: Node) -> float:
    return node.kind.mass if node.kind.tensor else 0.0


def _check(node: Node) -> str | None:
    op, args, kind = node.op, node.args, node.kind
    arity = {Op.CONST: 0, Op.INPUT: 0, Op.NEG: 1, Op.ADD: 2, Op.SUB: 2, Op.MUL: 2, Op.DIV: 2, Op.POW: 2}
    if op in arity and len(args) != arity[op]:
        return f"{op.value} takes {arity[op]} operands, has {len(args)}"
    expected: float | None = None
    if op is Op.CONST:
        return None if not kind.tensor and math.isfinite(node.arg[0]) else "bad constant"
    if op is Op.INPUT:
        return None if kind == node.arg.kind else "input kind disagrees with its reference"
    if op in (Op.ADD, Op.SUB):
        if args[0].kind.tensor != args[1].kind.tensor and _mass(args[0]) + _mass(args[1]) != 0.0:
            return "adds a scalar to a model"
        sign = 1.0 if op is Op.ADD else -1.0
        expected = _mass(args[0]) + sign * _mass(args[1])
    elif op is Op.NEG:
        expected = -_mass(args[0])
    elif op is Op.MUL:
        if args[0].kind.tensor and _mass(args[0]) != 0.0:
            return "mul's first operand must be a scalar or a vector"
        s = scalar_value(args[0])
        expected = _mass(args[1]) * s if s is not None else None
    elif op is Op.DIV:
        if args[1].kind.tensor and _mass(args[0]) != 0.0:
            return "divides a model by a tensor"
        s = scalar_value(args[1])
        expected = _mass(args[0]) / s if s else None
    elif op is Op.POW:
        if kind.tensor or any(a.kind.tensor for a in args):
            return "pow of a tensor"
    elif op in (Op.CALL, Op.REDUCE, Op.NUMEL, Op.RAND, Op.GLOBAL, Op.CTX):
        if op in (Op.REDUCE, Op.NUMEL, Op.GLOBAL, Op.CTX) and kind.tensor:
            return f"{op.value} must give a scalar"
        return None
    elif op is Op.WSUM:
        if len(node.arg) != len(args) or not args:
            return "wsum weights and operands differ in number"
        if any(not a.kind.tensor for a in args):
            return "wsum of a scalar"
        if any(w == 0.0 or not math.isfinite(w) for w in node.arg):
            return "wsum keeps a zero or non-finite weight"
        if len({id(a) for a in args}) != len(args):
            return "wsum repeats an operand"
        # anchored (tvlang.passes.linearize): models enter as differences from one anchor, added last
        anchors = {id(a.args[1]) for a in args if a.op is Op.SUB and a.args[1].kind.is_model}
        models = [a for a in args if a.kind.is_model]
        if len(anchors) > 1 or len(models) > 1 or (models and models[0] is not args[-1]):
            return "wsum is not anchored at one model, added last"
        expected = sum(w * _mass(a) for w, a in zip(node.arg, args, strict=True))
    if (
        kind.tensor
        and expected is not None
        and abs(expected - kind.mass) > MASS_TOLERANCE * max(1.0, abs(expected))
    ):
        return f"mass {kind.mass} but operands give {expected}"
    return None
