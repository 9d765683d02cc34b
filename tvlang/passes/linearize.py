"""Collapse linear arithmetic over tensors into one weighted sum per expression.

``base + 0.4*(a - base)`` becomes ``wsum 0.6*base + 0.4*a``: each input appears
once (so it is read once), and an input whose weight folds to zero disappears
(so it is never opened).  Weights are folded in float64.

>>> from tvlang.ir import Graph, InputRef, Node, Op, MODEL, DELTA, const, format_graph
>>> base = Node(Op.INPUT, (), InputRef("/b", "base", MODEL), MODEL)
>>> a = Node(Op.INPUT, (), InputRef("/a", "a", MODEL), MODEL)
>>> d = Node(Op.SUB, (a, base), None, DELTA)
>>> out = Node(Op.ADD, (base, Node(Op.MUL, (const(0.4), d), None, DELTA)), None, MODEL)
>>> print(format_graph(linearize(Graph((("out", out),)))))
%0 = input base : model
%1 = input a : model
%2 = wsum 0.6*%0 + 0.4*%1 : model
output out = %2
"""

from __future__ import annotations

from tvlang.ir.node import Graph, Node, Op, scalar_value
from tvlang.passes.rewrite import rebuild, rewrite

# Weights this much smaller than the largest in their sum are float noise from
# cancellation (0.1 + 0.2 - 0.3); dropping them changes results far below one
# rounding of any output dtype.
RELATIVE_ZERO = 1e-12

LinearForm = dict[Node, float]  # atom -> weight, in first-appearance order


def linear_form(node: Node, memo: dict[int, LinearForm] | None = None) -> LinearForm:
    """The weights of ``node`` over its non-linear atoms (inputs), zeros dropped."""
    memo = {} if memo is None else memo
    for n in node.toposort():
        if id(n) not in memo and n.kind.tensor:
            memo[id(n)] = _form(n, memo)
    return _drop_zeros(memo[id(node)])


def _form(node: Node, memo: dict[int, LinearForm]) -> LinearForm:
    op, args = node.op, node.args
    if op in (Op.ADD, Op.SUB) and not all(a.kind.tensor for a in args):
        return {node: 1.0}  # a vector plus a number: element-wise, not a combination of checkpoints
    if op is Op.ADD:
        return _combine((1.0, memo[id(args[0])]), (1.0, memo[id(args[1])]))
    if op is Op.SUB:
        return _combine((1.0, memo[id(args[0])]), (-1.0, memo[id(args[1])]))
    if op is Op.NEG:
        return _combine((-1.0, memo[id(args[0])]))
    if op is Op.MUL:
        s = scalar_value(args[0])
        if s is not None:
            return _combine((s, memo[id(args[1])]))
    if op is Op.DIV:
        s = scalar_value(args[1])
        if s:
            return _combine((1.0 / s, memo[id(args[0])]))
    if op is Op.WSUM:
        return _combine(*((w, memo[id(a)]) for w, a in zip(node.arg, args, strict=True)))
    return {node: 1.0}


def _combine(*scaled: tuple[float, LinearForm]) -> LinearForm:
    out: LinearForm = {}
    for scale, form in scaled:
        for atom, w in form.items():
            out[atom] = out.get(atom, 0.0) + scale * w
    return out


def _drop_zeros(form: LinearForm) -> LinearForm:
    largest = max((abs(w) for w in form.values()), default=0.0)
    return {a: w for a, w in form.items() if abs(w) > RELATIVE_ZERO * largest}


def linearize(graph: Graph) -> Graph:
    # Forms are computed bottom-up on the rewritten nodes, so a non-linear atom (an
    # element-wise call, say) is rebuilt over its already-linearised operands.
    forms: dict[int, LinearForm] = {}

    def rule(node: Node, args: tuple[Node, ...]) -> Node:
        node = rebuild(node, args)
        if not node.kind.tensor:
            return node
        form = _drop_zeros(_form(node, forms))
        if len(form) == 1 and next(iter(form.values())) == 1.0:
            result = next(iter(form))
        elif form == {node: 1.0}:
            result = node
        else:
            result = Node(Op.WSUM, tuple(form), tuple(form.values()), node.kind)
        forms[id(result)] = form if result.op is Op.WSUM else {result: 1.0}
        return result

    return rewrite(graph, rule)
