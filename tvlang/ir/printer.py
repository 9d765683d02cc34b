"""The IR's text form: what ``tvlang plan`` shows and what tests compare.

>>> from tvlang.ir.node import const, Graph
>>> print(format_graph(Graph((("x", const(2.0, "lam")),))))
%0 = const 2 (lam) : scalar
output x = %0
"""

from __future__ import annotations

from tvlang.ir.node import Graph, Node, Op


def format_weight(w: float) -> str:
    return f"{w:.10g}"


def format_graph(graph: Graph) -> str:
    names: dict[int, str] = {}
    lines: list[str] = []
    for node in graph.nodes():
        ref = f"%{len(names)}"
        names[id(node)] = ref
        lines.append(f"{ref} = {_format_rhs(node, names)} : {node.kind}")
    for name, node in graph.outputs:
        lines.append(f"output {name} = {names[id(node)]}")
    return "\n".join(lines)


def _format_rhs(node: Node, names: dict[int, str]) -> str:
    args = [names[id(a)] for a in node.args]
    if node.op is Op.CONST:
        value, label = node.arg
        return f"const {format_weight(value)}" + (f" ({label})" if label else "")
    if node.op is Op.INPUT:
        ref = node.arg
        if ref.view is not None:
            return f"input {ref.label} layers {ref.view.text}"
        return f"input {ref.label}"
    if node.op is Op.WSUM:
        terms = []
        for i, (w, a) in enumerate(zip(node.arg, args, strict=True)):
            if i == 0:
                terms.append(f"{format_weight(w)}*{a}")
            else:
                sign = "-" if w < 0 else "+"
                terms.append(f"{sign} {format_weight(abs(w))}*{a}")
        return "wsum " + " ".join(terms)
    if node.op in (Op.CALL, Op.REDUCE):
        return f"{node.arg}({', '.join(args)})"
    if node.op is Op.CTX:
        what, *rest = node.arg
        return f"{what}({', '.join(repr(r) for r in rest)})"
    if node.op is Op.STACK:
        return "stack " + ", ".join(f"{a} as {o}:{o + n}" for a, (o, n) in zip(args, node.arg, strict=True))
    if node.op is Op.GLOBAL:
        return f"model_{node.arg}({', '.join(args)})"
    if node.op is Op.RAND:
        seed, stream = node.arg
        return f"rand(like={args[0]}, seed={seed}, stream={stream!r})"
    return f"{node.op.value} " + ", ".join(args)
