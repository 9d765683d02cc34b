"""Collapse linear arithmetic over tensors into one weighted sum per expression, anchored at a model.

``base + 0.4*(a - base)`` becomes ``wsum 0.4*(a - base) + 1*base``: each input appears once (so
it is read once), and an input whose weight folds to zero disappears (so it is never opened).
Weights are folded in float64.

The sum keeps a reference model, its *anchor*, and takes every other model as its difference
from it: ``Σ wᵢ·xᵢ = Σ wᵢ·(mᵢ − a) + Σ wⱼ·dⱼ + (Σ model weights)·a``.  Fine-tunes lie a few
ulps from their base, so each difference is small and exact in the accumulation dtype, the
rounding errors of the sum are those of the deltas, not of the weights themselves, and the
anchor is added last, once.  The anchor is the model the task vectors are taken against (the
right operand of a model − model difference), else the model input with the largest weight
(the first of equals).  Task vectors that are inputs (stored deltas, LoRA adapters) are added
as they are.  An anchor whose own coefficient folds to zero (a task vector ``a - b``) is still
read, as it is subtracted.

>>> from tvlang.ir import Graph, InputRef, Node, Op, MODEL, DELTA, const, format_graph
>>> base = Node(Op.INPUT, (), InputRef("/b", "base", MODEL), MODEL)
>>> a = Node(Op.INPUT, (), InputRef("/a", "a", MODEL), MODEL)
>>> d = Node(Op.SUB, (a, base), None, DELTA)
>>> out = Node(Op.ADD, (base, Node(Op.MUL, (const(0.4), d), None, DELTA)), None, MODEL)
>>> print(format_graph(linearize(Graph((("out", out),)))))
%0 = input base : model
%1 = input a : model
%2 = wsum 0.4*(%1 - %0) + 1*%0 : model
output out = %2
"""

from __future__ import annotations

from tvlang.ir.node import Graph, Kind, Node, Op, scalar_value
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


def is_difference(node: Node) -> bool:
    """``m - a`` of two tensors with ``a`` a model: a term of an anchored sum (or a task vector)."""
    return node.op is Op.SUB and all(x.kind.tensor for x in node.args) and node.args[1].kind.is_model


def anchor_of(node: Node) -> Node | None:
    """The anchor of a linearised node: the model its differences are taken against, or the one
    model it adds as it is; None for a sum of task vectors alone (or a node that is no sum)."""
    if is_difference(node):
        return node.args[1]
    if node.op is not Op.WSUM:
        return None
    for a in node.args:
        if is_difference(a):
            return a.args[1]
    return next((a for a in node.args if a.kind.is_model), None)


def choose_anchor(form: LinearForm, preferred: Node | None = None) -> Node | None:
    """``preferred`` if it is a model of ``form``, else the model input with the largest weight
    (the first of equals), else the model atom with the largest weight; None without models."""
    models = [a for a in form if a.kind.is_model]
    if preferred is not None and preferred in models:
        return preferred
    candidates = [a for a in models if a.op is Op.INPUT] or models
    return max(candidates, key=lambda a: form[a], default=None)


def anchored(form: LinearForm, kind: Kind, preferred: Node | None = None) -> Node:
    """The node computing ``form`` (zeros dropped, two or more terms or a weight other than 1):
    ``Σ wᵢ·(mᵢ − a) + Σ wⱼ·xⱼ + c·a`` in that order, with ``c`` the sum of the model weights
    (the term dropped when it folds to zero), or the plain weighted sum when no model is in it."""
    anchor = choose_anchor(form, preferred)
    terms: list[tuple[float, Node]] = []
    coefficient = 0.0
    if anchor is not None:
        coefficient = form[anchor]
        for atom, w in form.items():
            if atom is anchor:
                continue
            if atom.kind.is_model:
                difference = Node(Op.SUB, (atom, anchor), None, Kind(True, atom.kind.mass - anchor.kind.mass))
                terms.append((w, difference))
                coefficient += w
            else:
                terms.append((w, atom))
        largest = max(abs(w) for w in form.values())
        if abs(coefficient) > RELATIVE_ZERO * largest:
            terms.append((coefficient, anchor))
    else:
        terms = [(w, atom) for atom, w in form.items()]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return Node(Op.WSUM, tuple(t for _, t in terms), tuple(w for w, _ in terms), kind)


def _preference(node: Node, prefs: dict[int, Node | None]) -> Node | None:
    """The anchor ``node``'s expression names: the model its task vectors are taken against."""
    if is_difference(node):
        right = node.args[1]
        return prefs.get(id(right)) or anchor_of(right) or right
    if node.op in (Op.ADD, Op.SUB, Op.NEG, Op.MUL, Op.DIV, Op.WSUM):
        return next((p for a in node.args if (p := prefs.get(id(a))) is not None), None)
    return None


def linearize(graph: Graph) -> Graph:
    # Forms are computed bottom-up on the rewritten nodes, so a non-linear atom (an
    # element-wise call, say) is rebuilt over its already-linearised operands.
    forms: dict[int, LinearForm] = {}
    prefs: dict[int, Node | None] = {}

    def rule(node: Node, args: tuple[Node, ...]) -> Node:
        node = rebuild(node, args)
        if not node.kind.tensor:
            return node
        form = _drop_zeros(_form(node, forms))
        preferred = _preference(node, prefs)
        if len(form) == 1 and next(iter(form.values())) == 1.0:
            result = next(iter(form))
        elif form == {node: 1.0}:
            result = node
        else:
            result = anchored(form, node.kind, preferred)
            forms[id(result)] = form
            prefs.setdefault(id(result), preferred)
            return result
        forms[id(result)] = {result: 1.0}
        return result

    return rewrite(graph, rule)
