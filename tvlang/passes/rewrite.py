"""Bottom-up graph rewriting shared by the passes."""

from __future__ import annotations

from collections.abc import Callable

from tvlang.ir.node import Graph, Node


def rewrite(graph: Graph, rule: Callable[[Node, tuple[Node, ...]], Node]) -> Graph:
    """Rebuild ``graph`` bottom-up: ``rule(node, new_args)`` returns each node's replacement.

    Shared nodes are rewritten once; hash-consing re-shares their replacements.
    """
    done: dict[int, Node] = {}
    for node in graph.nodes():
        new_args = tuple(done[id(a)] for a in node.args)
        done[id(node)] = rule(node, new_args)
    return Graph(tuple((name, done[id(n)]) for name, n in graph.outputs), graph.expressions)


def rebuild(node: Node, args: tuple[Node, ...]) -> Node:
    """``node`` with new operands (itself if they did not change)."""
    if all(a is b for a, b in zip(args, node.args, strict=True)):
        return node
    return Node(node.op, args, node.arg, node.kind)
