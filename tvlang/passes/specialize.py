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
from tvlang.ir.node import Graph, Node, Op, const
from tvlang.passes.fold_constants import fold_constants
from tvlang.passes.linearize import linearize
from tvlang.passes.rewrite import rebuild, rewrite


def has_context(node: Node) -> bool:
    return any(n.op is Op.CTX for n in node.toposort())


def specialize(node: Node, ctx: TensorContext, replace: Mapping[int, Node] | None = None) -> Node:
    """``node`` for one tensor; ``replace`` maps input nodes (by id) to stand-ins for inputs that
    lack this tensor (the union key policy)."""
    replace = replace or {}

    def rule(n: Node, args: tuple[Node, ...]) -> Node:
        if n.op is Op.CTX:
            return const(ctx.value(n.arg))
        return replace.get(id(n)) or rebuild(n, args)

    graph = rewrite(Graph((("out", node),)), rule)
    return linearize(fold_constants(graph)).outputs[0][1]
