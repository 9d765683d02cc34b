"""Specialise an output for one tensor: replace per-tensor context by its values, then re-run
the other passes, so that context-dependent weights cost nothing per element.

>>> from tvlang.ir import Graph, InputRef, Node, Op, MODEL, format_graph
>>> from tvlang.ir.build import add, context, mul, sub
>>> from collections.abc import Mapping

from tvlang.context import TensorContext
>>> base = Node(Op.INPUT, (), InputRef("/b", "base", MODEL), MODEL)
>>> ft = Node(Op.INPUT, (), InputRef("/f", "ft", MODEL), MODEL)
>>> out = add(base, mul(context("gradient", (0.2, 0.8)), sub(ft, base)))
>>> print(format_graph(Graph((("out", specialize(out, TensorContext("model.layers.1.q", 3))),))))
%0 = input base : model
%1 = input ft : model
%2 = wsum 0.5*(%1 - %0) + 1*%0 : model
output out = %2
"""

from __future__ import annotations

from collections.abc import Mapping

from tvlang.context import TensorContext
from tvlang.ir.node import Graph, Node, Op, const, toposort
from tvlang.layermap import is_pre
from tvlang.passes.fold_constants import fold_constants
from tvlang.passes.linearize import linearize
from tvlang.passes.rewrite import rebuild


def has_context(node: Node) -> bool:
    return any(n.op in (Op.CTX, Op.STACK) for n in node.toposort())


def has_stack(node: Node) -> bool:
    return any(n.op is Op.STACK for n in node.toposort())


def specialize(node: Node, ctx: TensorContext, replace: Mapping[int, Node] | None = None) -> Node:
    """``node`` for one tensor; ``replace`` maps input nodes (by id) to stand-ins for inputs that
    lack this tensor (the union key policy).  A stack becomes the slice that holds the tensor, and
    context inside a slice counts the slice's layers."""
    replace = replace or {}
    return linearize(fold_constants(Graph((("out", _resolve(node, ctx, replace)),)))).outputs[0][1]


def stack_slice(node: Node, layer: int, name: str) -> int:
    """The operand of a stack that holds ``layer`` (-1: a tensor outside the layers, ``name``)."""
    frames: tuple[tuple[int, int], ...] = node.arg
    if layer < 0:
        return 0 if is_pre(name) else len(frames) - 1
    for i, (offset, length) in enumerate(frames):
        if offset <= layer < offset + length:
            return i
    return -1


def _resolve(node: Node, ctx: TensorContext, replace: Mapping[int, Node]) -> Node:
    """Bottom-up over everything but stacks; a stack's chosen slice is resolved in its own context
    (recursion only as deep as stacks nest)."""
    done: dict[int, Node] = {}
    for n in _below(node):
        if n.op is Op.STACK:
            i = stack_slice(n, ctx.layer, ctx.name)
            if i < 0:  # a layer no slice holds: the planner never asks for one
                raise AssertionError(f"{ctx.name} is outside the stack")
            offset, length = n.arg[i]
            done[id(n)] = _resolve(n.args[i], ctx.within(offset, length), replace)
        elif n.op is Op.CTX:
            done[id(n)] = const(ctx.value(n.arg))
        else:
            done[id(n)] = replace.get(id(n)) or rebuild(n, tuple(done[id(a)] for a in n.args))
    return done[id(node)]


def _below(root: Node) -> list[Node]:
    """``root`` and its operands, operands first, not descending into stacks."""
    return toposort([root], stop_at=Op.STACK)
