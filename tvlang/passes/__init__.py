"""Optimisation passes over the IR, one module each, run in ``PIPELINE`` order.

Common subexpressions need no pass: IR nodes are hash-consed, so equal
subexpressions are already one node.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tvlang.ir import Graph, verify
from tvlang.passes.fold_constants import fold_constants
from tvlang.passes.linearize import linear_form, linearize

Pass = Callable[[Graph], Graph]

PIPELINE: tuple[Pass, ...] = (fold_constants, linearize)


# the compiler's stages ``tvlang plan --stage`` prints alone: the program's text, the IR as written,
# the IR after each pass, the plan, the generated C kernels (compiled CPU backend), the Triton ones (GPU)
STAGES = ("source", "written", "passes", "plan", "c", "triton")
VERIFY_ENV = "TVLANG_VERIFY"  # =1: the verifier checks the IR after every pass (a debug switch)


def verifying() -> bool:
    """Whether ``TVLANG_VERIFY=1`` asks for the verifier after every pass."""
    return os.environ.get(VERIFY_ENV) == "1"


def stages(graph: Graph, *, verify_each: bool | None = None) -> list[tuple[str, Graph]]:
    """The IR after each pass of ``PIPELINE``, by the pass's name (``tvlang plan --stage passes``).
    ``verify_each`` (default: ``TVLANG_VERIFY=1``) runs the verifier on the input and after each pass."""
    check = verifying() if verify_each is None else verify_each
    if check:
        verify(graph)
    out = []
    for p in PIPELINE:
        graph = p(graph)
        if check:
            verify(graph)
        out.append((p.__name__, graph))
    return out


def optimize(graph: Graph, *, verify_each: bool | None = None) -> Graph:
    """Run every pass in order; with ``verify_each`` (default: ``TVLANG_VERIFY=1``) the verifier
    checks the IR after each one."""
    after = stages(graph, verify_each=verify_each)
    return after[-1][1] if after else graph


__all__ = [
    "PIPELINE",
    "STAGES",
    "VERIFY_ENV",
    "fold_constants",
    "linear_form",
    "linearize",
    "optimize",
    "stages",
    "verifying",
]
