"""The IR: hash-consed nodes, their printer (the test oracle) and verifier."""

from tvlang.ir.node import DELTA, MODEL, SCALAR, Graph, InputRef, Kind, Node, Op, const, scalar_value
from tvlang.ir.printer import format_graph
from tvlang.ir.verify import IRVerifyError, verify

__all__ = [
    "DELTA",
    "MODEL",
    "SCALAR",
    "Graph",
    "IRVerifyError",
    "InputRef",
    "Kind",
    "Node",
    "Op",
    "const",
    "format_graph",
    "scalar_value",
    "verify",
]
