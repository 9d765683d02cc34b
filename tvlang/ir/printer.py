"""The IR's text form: what ``tvlang plan`` shows and what tests compare.

A difference ``m - a`` that only weighted sums use is written inside them, ``0.5*(%1 - %0)``,
so that an anchored sum reads as the formula it is.

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
    nodes = graph.nodes()
    inline = _inline_differences(graph, nodes)
    count = 0
    for node in nodes:
        if id(node) in inline:
            names[id(node)] = f"({names[id(node.args[0])]} - {names[id(node.args[1])]})"
            continue
        ref = f"%{count}"
        count += 1
        names[id(node)] = ref
        lines.append(f"{ref} = {_format_rhs(node, names)} : {node.kind}")
    for name, node in graph.outputs:
        lines.append(f"output {name} = {names[id(node)]}")
    return "\n".join(lines)


def _inline_differences(graph: Graph, nodes: list[Node]) -> set[int]:
    """Differences of two tensors that only weighted sums use (the terms of anchored sums)."""
    outputs = {id(n) for _, n in graph.outputs}
    candidates = {
        id(n) for n in nodes if n.op is Op.SUB and all(a.kind.tensor for a in n.args) and id(n) not in outputs
    }
    for n in nodes:
        if n.op is not Op.WSUM:
            candidates -= {id(a) for a in n.args}
    return candidates


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
