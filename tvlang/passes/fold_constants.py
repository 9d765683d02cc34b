"""Fold scalar arithmetic on constants into single constants.

>>> from tvlang.ir import Graph, Node, Op, SCALAR, const, format_graph
>>> lam = const(0.4, "lam")
>>> g = Graph((("x", Node(Op.SUB, (const(1.0), lam), None, SCALAR)),))
>>> print(format_graph(fold_constants(g)))
%0 = const 0.6 : scalar
output x = %0
"""

from __future__ import annotations

from tvlang.ir.node import Graph, Node, Op, const, scalar_value
from tvlang.passes.rewrite import rebuild, rewrite


def fold_constants(graph: Graph) -> Graph:
    def rule(node: Node, args: tuple[Node, ...]) -> Node:
        node = rebuild(node, args)
        if node.kind.tensor or node.op is Op.CONST:
            return node
        value = scalar_value(node)
        return node if value is None else const(value)

    return rewrite(graph, rule)
