"""Optimisation passes over the IR, one module each, run in ``PIPELINE`` order.

Common subexpressions need no pass: IR nodes are hash-consed, so equal
subexpressions are already one node.
"""

from __future__ import annotations

from collections.abc import Callable

from tvlang.ir import Graph, verify
from tvlang.passes.fold_constants import fold_constants
from tvlang.passes.linearize import linear_form, linearize

Pass = Callable[[Graph], Graph]

PIPELINE: tuple[Pass, ...] = (fold_constants, linearize)


def optimize(graph: Graph, *, verify_each: bool = False) -> Graph:
    """Run every pass in order; with ``verify_each`` the verifier checks the IR after each one."""
    if verify_each:
        verify(graph)
    for p in PIPELINE:
        graph = p(graph)
        if verify_each:
            verify(graph)
    return graph


__all__ = ["PIPELINE", "fold_constants", "linear_form", "linearize", "optimize"]
