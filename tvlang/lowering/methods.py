"""Merge methods as IR builders, from the element-wise and reduction primitives.

Each method is written the way a user could write it in a ``.tv`` file: the
planner sees only primitives, so a user-defined variant plans and runs the same.
Whole-tensor statistics (norms, dot products, k-th largest magnitudes) are
reductions, computed in passes over the chunks before the element-wise pass.

Mathematics follow the reference implementations (mergekit, PEFT, the papers);
where they differ the docstring says which one a default reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvlang.check import KindError
from tvlang.ir.build import add, call, div, lift, model_kth, mul, numel, rand, reduce, sub
from tvlang.ir.node import DELTA, MODEL, Kind, Node, Op, scalar_value

EPS = 1e-8


def _sum(nodes: Sequence[Node | float]) -> Node:
    total = lift(nodes[0])
    for n in nodes[1:]:
        total = add(total, n)
    return total


def _scaled(s: Node, x: Node, mass: float) -> Node:
    """``s * x`` for a per-tensor ``s`` inside a combination whose masses are known as a whole."""
    return Node(Op.MUL, (s, x), None, Kind(True, mass))


def kth(x: Node, k: Node | float) -> Node:
    """The k-th largest element of ``x`` (k ≥ 1; ``+inf`` for k < 1, ``-inf`` for k > numel)."""
    return reduce("kth", x, k)


def magnitude_prune(d: Node, density: Node | float, scope: str = "tensor") -> Node:
    """Keep the ``floor(density·numel)`` largest magnitudes, zero the rest (elements tied with the
    k-th largest magnitude are all kept).  mergekit's ``magnitude`` sparsification; with
    ``scope="model"`` the top-k runs over the whole model (the TIES paper's global trim)."""
    if scalar_value(lift(density)) is not None and scalar_value(lift(density)) >= 1.0:  # type: ignore[operator]
        return d
    mag = call("abs", d)
    if scope == "model":
        # The model-wide threshold is selected in passes before any per-tensor work, so neither its
        # operand nor its density may depend on per-tensor statistics.
        if scalar_value(lift(density)) is None:
            raise KindError("a model-wide density must be a number known before any data is read")
        if any(n.op in (Op.REDUCE, Op.GLOBAL) for n in mag.toposort()):
            raise KindError(
                "a model-wide trim cannot apply to a value that needs per-tensor statistics",
                "this task vector depends on a reduction (a norm, a sum, an L1 rescale…)",
                help='trim the plain task vector, e.g. `magnitude_prune(ft - base, 0.5, scope="model")`',
            )
        threshold = model_kth(mag, density)
    else:
        threshold = kth(mag, call("floor", mul(density, numel(d))))
    return call("where", call("ge", mag, threshold), d, 0.0, kind=DELTA)


def breadcrumbs(d: Node, density: Node | float, gamma: Node | float = 0.01) -> Node:
    """Drop the ``gamma`` share of largest magnitudes and the smallest ones, keeping ``density``.

    mergekit's ``magnitude_outliers``, except that ``gamma·numel < 1`` removes no outliers (mergekit's
    ``indices[n_bot:-0]`` keeps nothing there and so drops the whole tensor)."""
    n = numel(d)
    target = call("floor", mul(density, n))
    n_top = call("floor", mul(gamma, n))
    n_bot = sub(sub(n, target), n_top)
    n_top = call("where", call("lt", n_bot, 0.0), add(n_top, n_bot), n_top)
    n_bot = call("max", n_bot, 0.0)
    mag = call("abs", d)
    low = kth(mag, sub(n, n_bot))  # the smallest magnitude kept
    high = kth(mag, n_top)  # magnitudes at or above the n_top-th largest are outliers (+inf when n_top = 0)
    keep = mul(call("ge", mag, low), call("lt", mag, high))
    full = call("ge", density, 1.0)
    return call("where", full, d, mul(d, keep), kind=DELTA)


def dare(d: Node, p: Node | float, seed: int, stream: str, rescale: str = "inverse") -> Node:
    """Drop each element with probability ``p`` (a seeded, counter-based mask) and rescale:
    ``inverse`` by 1/(1-p) (the paper), ``l1`` to the original L1 norm (mergekit), ``none``."""
    keep = call("ge", rand(d, seed, stream), p)
    masked = mul(d, keep)
    if rescale == "none":
        return masked
    if rescale == "inverse":
        survive = sub(1.0, p)
        return mul(call("where", call("gt", survive, 0.0), div(1.0, call("max", survive, EPS)), 0.0), masked)
    return _l1_rescale(d, masked)


def della(d: Node, density: float, epsilon: float, seed: int, stream: str, rescale: str = "l1") -> Node:
    """DELLA's MagPrune as mergekit computes it: within each row (the tensor as ``(shape[0], -1)``; a
    vector is one row) an element of rank r (by magnitude, 0 = smallest) is kept with probability
    ``density - epsilon + 2·epsilon·r/(n-1)``; the survivors are rescaled to the original L1 norm
    (mergekit), by their own 1/p (``inverse``, the paper), or not (``none``)."""
    if density >= 1.0:
        return d
    if density <= 0.0:
        return mul(0.0, d)
    if not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise KindError(
            "epsilon must keep density ± epsilon inside (0, 1)", f"density {density:g}, epsilon {epsilon:g}"
        )
    p = add(density - epsilon, mul(2.0 * epsilon, call("rowrank", call("abs", d))))
    keep = call("lt", rand(d, seed, stream), p)
    masked = mul(d, keep)
    if rescale == "none":
        return masked
    if rescale == "inverse":
        return div(masked, p)
    return _l1_rescale(d, masked)


def _l1_rescale(d: Node, masked: Node) -> Node:
    before = reduce("sum", call("abs", d))
    after = reduce("sum", call("abs", masked))
    small = call("max", call("lt", before, 1e-7), call("lt", after, 1e-7))
    return mul(call("where", small, 1.0, div(before, call("max", after, 1e-7))), masked)


def ties(
    deltas: Sequence[Node],
    weights: Sequence[Node | float],
    density: Node | float = 1.0,
    elect: str = "sum",
    divide: str = "weights",
    scope: str = "tensor",
) -> Node:
    """TIES-merging: trim each task vector to its top ``density`` magnitudes, elect a sign per
    element, and average the agreeing entries.

    Defaults reproduce mergekit's ``ties``: the sign is elected on the weighted, trimmed deltas
    (``sum``: the sign of their sum, ties going to +), zeros never agree, and the result is divided
    by the summed weights of the agreeing entries.  ``elect="count"`` elects by majority of signs
    (PEFT's ``frequency``); ``divide="count"`` divides by the number of agreeing entries (PEFT's
    disjoint merge); ``divide="none"`` sums them (the paper with λ).  ``scope="model"`` trims by a
    top-k over the whole model (the paper's and FusionBench's global trim) instead of per tensor."""
    trimmed = [magnitude_prune(d, density, scope) for d in deltas]
    weighted = [mul(w, t) for w, t in zip(weights, trimmed, strict=True)]
    signs = [call("sign", w) for w in weighted]
    vote = _sum(weighted) if elect == "sum" else _sum(signs)
    majority = call("where", call("ge", vote, 0.0), 1.0, -1.0)
    agree = [call("eq", s, majority) for s in signs]
    merged = _sum([mul(w, a) for w, a in zip(weighted, agree, strict=True)])
    if divide == "none":
        return merged
    if divide == "count":
        count = _sum(agree)
        return div(merged, call("where", call("eq", count, 0.0), 1.0, count))
    divisor = _sum([mul(w, a) for w, a in zip(weights, agree, strict=True)])
    return div(merged, call("where", call("eq", divisor, 0.0), 1.0, divisor))


def linear(models: Sequence[Node], weights: Sequence[Node | float], normalize: bool = True) -> Node:
    """A weighted average of models (mergekit's ``linear``): ``Σ wᵢ·mᵢ / Σ wᵢ`` when ``normalize``."""
    total = _sum([mul(w, m) for w, m in zip(weights, models, strict=True)])
    if not normalize:
        return total
    wsum = _sum(list(weights))
    value = scalar_value(wsum)
    if value is not None and abs(value) < 1e-8:
        raise KindError("the weights sum to zero", "cannot normalise")
    return div(total, wsum)


def lerp(a: Node, b: Node, t: Node | float) -> Node:
    """``a + t·(b - a)``."""
    return add(a, mul(t, sub(b, a)))


def slerp(a: Node, b: Node, t: Node | float) -> Node:
    """Spherical interpolation of two tensors, mergekit's formula: the angle between the
    tensors (each normalised when its norm exceeds 1e-8) and, when they are nearly colinear
    (|cos| > 0.9995), plain linear interpolation."""
    na = call("sqrt", reduce("sumsq", a))
    nb = call("sqrt", reduce("sumsq", b))
    scale_a = call("where", call("gt", na, EPS), na, 1.0)
    scale_b = call("where", call("gt", nb, EPS), nb, 1.0)
    cos = call("clamp", div(reduce("dot", a, b), mul(scale_a, scale_b)), -1.0, 1.0)
    colinear = call("gt", call("abs", cos), 0.9995)
    theta = call("acos", cos)
    sin_theta = call("sin", theta)
    safe_sin = call("where", colinear, 1.0, sin_theta)
    s0 = call("where", colinear, sub(1.0, t), div(call("sin", mul(sub(1.0, t), theta)), safe_sin))
    s1 = call("where", colinear, t, div(call("sin", mul(t, theta)), safe_sin))
    return _interpolation(a, b, t, s0, s1)


def nuslerp(a: Node, b: Node, t: Node | float, per: str = "tensor") -> Node:
    """mergekit's ``nuslerp``: the angle between the vectors normalised with norms clamped at 1e-7,
    and linear interpolation where |sin θ| < 1e-8.  ``per="tensor"`` takes the whole tensor as one
    vector (``nuslerp_flatten``, mergekit's default); ``per="row"`` each row of the tensor seen as
    ``(shape[0], -1)`` (``nuslerp_flatten: false``; chunks then hold whole rows), ``per="column"``
    each column of it (``nuslerp_row_wise: true``: one pass sums the columns).  With a base,
    mergekit interpolates the task vectors: write ``base + nuslerp(a - base, b - base, t)``;
    mergekit's weights w₀, w₁ give t = w₁/(w₀ + w₁)."""
    if per in ("row", "column"):
        total = "rowsum" if per == "row" else "colsum"
        va, vb = _values(a), _values(b)
        na = call("max", call("sqrt", call(total, mul(va, va))), 1e-7)
        nb = call("max", call("sqrt", call(total, mul(vb, vb))), 1e-7)
        dot = call(total, mul(va, vb))
    else:
        na = call("max", call("sqrt", reduce("sumsq", a)), 1e-7)
        nb = call("max", call("sqrt", reduce("sumsq", b)), 1e-7)
        dot = reduce("dot", a, b)
    cos = call("clamp", div(dot, mul(na, nb)), -1.0, 1.0)
    theta = call("acos", cos)
    sin_theta = call("sin", theta)
    colinear = call("lt", call("abs", sin_theta), EPS)
    safe_sin = call("where", colinear, 1.0, sin_theta)
    s0 = call("where", colinear, sub(1.0, t), div(call("sin", mul(sub(1.0, t), theta)), safe_sin))
    s1 = call("where", colinear, t, div(call("sin", mul(t, theta)), safe_sin))
    return _interpolation(a, b, t, s0, s1)


def _interpolation(a: Node, b: Node, t: Node | float, s0: Node, s1: Node) -> Node:
    """``s0·a + s1·b`` for per-tensor coefficients: a model for two models (for the affine
    bookkeeping it counts as the lerp it generalises, masses 1-t and t), a delta for two deltas."""
    if a.kind.is_model and b.kind.is_model:
        t_value = scalar_value(lift(t))
        mass_a = 1.0 - t_value if t_value is not None else 0.5
        return Node(Op.ADD, (_scaled(s0, a, mass_a), _scaled(s1, b, 1.0 - mass_a)), None, MODEL)
    if a.kind.is_delta and b.kind.is_delta:
        return add(mul(s0, a), mul(s1, b))
    raise KindError("interpolation needs two models or two task vectors")


def model_stock(base: Node, models: Sequence[Node], per: str = "tensor") -> Node:
    """Model Stock (Jang et al., 2024) as mergekit computes it: the mean pairwise cosine of the
    task vectors over the whole tensor, ``t = N·cos / (1 + (N-1)·cos)``, and
    ``t·mean(models) + (1-t)·base``.  ``per="row"`` (mergekit's ``filter_wise: true``) takes the
    cosines, and so t, per row of the tensor seen as ``(shape[0], -1)`` (a 1-D tensor is one row)."""
    if len(models) < 2:
        raise KindError("model_stock needs at least two fine-tuned models besides the base")
    deltas = [sub(m, base) for m in models]

    def dot(x: Node, y: Node) -> Node:
        return call("rowsum", mul(x, y)) if per == "row" else reduce("dot", x, y)

    norms = [call("sqrt", call("rowsum", mul(d, d)) if per == "row" else reduce("sumsq", d)) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            denom = call("max", mul(norms[i], norms[j]), 1e-6)
            cosines.append(call("clamp", div(dot(deltas[i], deltas[j]), denom), -1.0, 1.0))
    cos = div(_sum(cosines), float(len(cosines)))
    n = float(len(models))
    t = div(mul(n, cos), add(1.0, mul(n - 1.0, cos)))
    mean_delta = div(_sum(deltas), n)
    return add(base, mul(t, mean_delta))


def nearswap(base: Node, model: Node, t: Node | float) -> Node:
    """mergekit's ``nearswap``: move each element of ``base`` toward ``model`` by
    ``clamp(nan_to_num(t / |model - base|, 1, 1, 1), 0, 1)``, mergekit's own lines (1 where they
    are equal: t/0 is ±inf or NaN)."""
    d = sub(model, base)
    weight = call("clamp", call("nan_to_num", div(t, call("abs", d)), 1.0, 1.0, 1.0), 0.0, 1.0)
    return add(base, mul(weight, d))


def _gram(xs: Sequence[Node]) -> dict[tuple[int, int], Node]:
    """Every dot product of two of ``xs`` (one reduction pass): ``g[i, j] = xᵢ·xⱼ``."""
    g: dict[tuple[int, int], Node] = {}
    for i, x in enumerate(xs):
        for j in range(i, len(xs)):
            g[i, j] = g[j, i] = reduce("sumsq", x) if i == j else reduce("dot", x, xs[j])
    return g


def _quadratic(c: Sequence[Node | float], g: dict[tuple[int, int], Node]) -> Node:
    """``(Σ cᵢxᵢ)·(Σ cⱼxⱼ)`` from the Gram matrix ``g``."""
    n = len(c)
    return _sum([mul(mul(c[i], c[j]), g[i, j]) for i in range(n) for j in range(n)])


def _combination(coefs: Sequence[Node], xs: Sequence[Node]) -> Node:
    """``Σ cᵢ·xᵢ`` for per-tensor coefficients: a delta for task vectors; for models, a model whose
    coefficients are decided by the data (for the affine bookkeeping each counts as 1/n)."""
    if all(x.kind.is_delta for x in xs):
        return _sum([mul(c, x) for c, x in zip(coefs, xs, strict=True)])
    if not all(x.kind.is_model for x in xs):
        raise KindError("the operands must all be models or all task vectors")
    share = 1.0 / len(xs)
    total = _scaled(coefs[0], xs[0], share)
    for k in range(1, len(xs)):
        total = Node(Op.ADD, (total, _scaled(coefs[k], xs[k], share)), None, Kind(True, share * (k + 1)))
    return Node(total.op, total.args, total.arg, MODEL)


def multislerp(
    xs: Sequence[Node], weights: Sequence[Node | float], normalize: bool = True, eps: float = 1e-8
) -> Node:
    """mergekit's ``multislerp`` (barycentric interpolation on the sphere): the weighted mean
    m = Σ wᵢ·xᵢ/(|xᵢ| + eps) of the unit vectors, mapped back to the sphere and scaled by Σ wᵢ|xᵢ|.
    The tangent-space step adds nothing: Σ wᵢ(uᵢ - (uᵢ·m̂)m̂) = m - |m|m̂ = 0, so the result is
    (Σ wᵢ|xᵢ|)·m/|m|.  Where |m| < eps mergekit falls back to Σ wᵢxᵢ (two operands; it stops for
    more); so does this.  One reduction pass (the Gram matrix), then one element-wise pass."""
    if len(xs) == 1:
        return xs[0]
    w: list[Node | float] = list(weights)
    if normalize:
        total = _sum(w)
        if scalar_value(total) == 0.0:
            raise KindError("the weights sum to zero", "cannot normalise")
        w = [div(x, total) for x in w]
    g = _gram(xs)
    norms = [call("sqrt", g[i, i]) for i in range(len(xs))]
    c = [div(wi, add(n, eps)) for wi, n in zip(w, norms, strict=True)]  # m = Σ cᵢxᵢ
    m_norm = call("sqrt", call("max", _quadratic(c, g), 0.0))
    small = call("lt", m_norm, eps)
    scale = div(_sum([mul(wi, n) for wi, n in zip(w, norms, strict=True)]), call("where", small, 1.0, m_norm))
    coefs = [call("where", small, wi, mul(scale, ci)) for wi, ci in zip(w, c, strict=True)]
    return _combination(coefs, xs)


def karcher(xs: Sequence[Node], max_iter: int = 10, tol: float = 1e-5) -> Node:
    """mergekit's ``karcher``: the Riemannian (Karcher) mean of the unit vectors xᵢ/|xᵢ| with equal
    weights, by at most ``max_iter`` steps of the gradient iteration, scaled by the mean norm.

    Every iterate is a combination u = Σ cᵢ·xᵢ/|xᵢ| of the inputs, so each step is arithmetic on
    the n×n Gram matrix of the inputs: one reduction pass gives it, the iteration runs on per-tensor
    numbers, and one element-wise pass writes Σ (s·cᵢ/|xᵢ|)·xᵢ.  Inputs with |xᵢ| ≤ tol are left
    out of the mean (their norms still count in the scale), as in mergekit."""
    n = len(xs)
    if n == 1:
        return xs[0]
    g = _gram(xs)
    norms = [call("sqrt", g[i, i]) for i in range(n)]
    valid = [call("gt", nv, tol) for nv in norms]
    count = _sum(valid)
    alphas = [div(v, call("max", count, 1.0)) for v in valid]
    safe = [call("where", v, nv, 1.0) for v, nv in zip(valid, norms, strict=True)]
    # the Gram matrix of the unit vectors (of the valid ones: the others never get a coefficient)
    u = {(i, j): div(g[i, j], mul(safe[i], safe[j])) for i in range(n) for j in range(n)}
    c: list[Node] = [lift(a) for a in alphas]
    u_norm = call("sqrt", call("max", _quadratic(c, u), 0.0))
    first = [lift(0.0)] * n  # the first valid unit vector
    found: Node = lift(0.0)
    for i in range(n):
        first[i] = mul(valid[i], sub(1.0, found))
        found = call("max", found, valid[i])
    degenerate = call("lt", u_norm, tol)
    c = [
        call("where", degenerate, f, div(ci, call("where", degenerate, 1.0, u_norm)))
        for f, ci in zip(first, c, strict=True)
    ]
    done: Node = lift(0.0)
    for _ in range(max_iter):
        dots = [call("clamp", _sum([mul(c[j], u[j, i]) for j in range(n)]), -1.0, 1.0) for i in range(n)]
        thetas = [call("acos", d) for d in dots]
        active = [call("ge", th, tol) for th in thetas]
        step = [
            call("where", act, div(mul(a, th), call("sin", call("where", act, th, 1.0))), 0.0)
            for act, a, th in zip(active, alphas, thetas, strict=True)
        ]
        along = _sum([mul(s, d) for s, d in zip(step, dots, strict=True)])
        tangent = [sub(s, mul(along, ci)) for s, ci in zip(step, c, strict=True)]  # T = Σ stepᵢ(uᵢ - dotᵢ·u)
        t_norm = call("sqrt", call("max", _quadratic(tangent, u), 0.0))
        done = call("max", done, call("lt", t_norm, tol))
        safe_t = call("where", done, 1.0, t_norm)
        moved = [
            add(mul(call("cos", t_norm), ci), mul(div(call("sin", t_norm), safe_t), ti))
            for ci, ti in zip(c, tangent, strict=True)
        ]
        m_norm = call("sqrt", call("max", _quadratic(moved, u), 0.0))
        rescale = call(
            "where", call("gt", m_norm, tol), call("where", call("gt", m_norm, tol), m_norm, 1.0), 1.0
        )
        moved = [div(mi, rescale) for mi in moved]
        c = [call("where", done, ci, mi) for ci, mi in zip(c, moved, strict=True)]
    scale = div(_sum(norms), float(n))  # Σ αᵢ|xᵢ| over every input, zero ones included
    coefs = [call("where", v, div(mul(scale, ci), sf), 0.0) for v, ci, sf in zip(valid, c, safe, strict=True)]
    return _combination(coefs, xs)


def ram(deltas: Sequence[Node], epsilon: Node | float = 1e-5) -> Node:
    """mergekit's ``ram`` (Reinforced Agent Merging): entries with |dᵢ| > epsilon contribute; where
    one task vector contributes it is kept, where several do they are averaged:
    Σ dᵢ·[|dᵢ| > ε] / max(count, 1)."""
    live = [call("gt", call("abs", d), epsilon) for d in deltas]
    count = _sum(live)
    return div(_sum([mul(d, k) for d, k in zip(deltas, live, strict=True)]), call("max", count, 1.0))


def ramplus(
    deltas: Sequence[Node], r: Node | float = 0.1, alpha: Node | float = 0.2, epsilon: Node | float = 1e-5
) -> Node:
    """mergekit's ``ramplus_tl`` (RAM+, tensor-local): as ``ram``, but each task vector's unique
    entries (where it alone contributes) are scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, alpha), ρᵢ the count
    of its shared entries over the count of its unique ones in this tensor (the divisor clamped at
    epsilon).  One reduction pass counts, one element-wise pass writes."""
    live = [call("gt", call("abs", d), epsilon) for d in deltas]
    count = _sum(live)
    unique = call("eq", count, 1.0)
    shared = call("gt", count, 1.0)
    average = div(1.0, call("max", count, 1.0))
    terms = []
    for d, k in zip(deltas, live, strict=True):
        rho = div(reduce("sum", mul(k, shared)), call("max", reduce("sum", mul(k, unique)), epsilon))
        lam = add(1.0, mul(r, call("clamp", rho, 0.0, alpha)))
        terms.append(mul(mul(d, k), call("where", unique, lam, average)))
    return _sum(terms)


def sce(deltas: Sequence[Node], select_topk: Node | float = 1.0) -> Node:
    """mergekit's ``sce`` (Select, Calculate, Erase): keep the elements whose variance across the task
    vectors is among the top ``select_topk`` share of the non-zero variances; weight each task vector
    by its mean square (normalised over the task vectors, equal when they sum below 1e-6); elect a
    sign by the sum; average the agreeing entries with those weights (divisor clamped at 1e-6)."""
    n = float(len(deltas))
    topk = scalar_value(lift(select_topk))
    if topk is None or topk < 1.0:
        # n²·variance = Σ_{i<j} (dᵢ - dⱼ)²: the differences of inputs of one dtype are exact more often
        # than deviations from a rounded mean, so equal variances stay equal (all are kept at the threshold)
        var = _sum([_square(sub(x, y)) for i, x in enumerate(deltas) for y in deltas[i + 1 :]])
        k = call("floor", mul(reduce("count", var), select_topk))
        keep = call("ge", var, kth(var, k))  # k = 0: the threshold is +inf, nothing is kept
        keep = call(
            "where", call("ge", select_topk, 1.0), 1.0, call("where", call("le", select_topk, 0.0), 0.0, keep)
        )
        deltas = [mul(d, keep) for d in deltas]
    squares = [div(reduce("sumsq", d), numel(d)) for d in deltas]
    total = _sum(squares)
    tiny = call("lt", call("abs", total), 1e-6)
    weights = [call("where", tiny, 1.0 / n, div(s, call("where", tiny, 1.0, total))) for s in squares]
    majority = call("where", call("ge", _sum(list(deltas)), 0.0), 1.0, -1.0)
    agree = [call("eq", call("sign", d), majority) for d in deltas]
    erased = [mul(w, a) for w, a in zip(weights, agree, strict=True)]
    merged = _sum([mul(e, d) for e, d in zip(erased, deltas, strict=True)])
    return div(merged, call("max", _sum(erased), 1e-6))


def arcee_fusion(base: Node, model: Node) -> Node:
    """mergekit's ``arcee_fusion``: the importance of each element is |model - base| times the KL
    divergence of its row's softmax, KL(p‖q) = Σ p·log(p/q) with p = softmax(model row) + 1e-8 and
    q = softmax(base row) + 1e-8; elements whose importance reaches median + 1.5·IQR (exact lower
    quantiles of the tensor) take the model's value, the others keep the base's.  Rows are the
    tensor seen as ``(shape[0], -1)`` (a vector is one row); chunks hold whole rows."""
    d = sub(model, base)

    def softmax(x: Node) -> Node:
        e = call("exp", sub(x, call("rowmax", x)))
        return add(div(e, call("rowsum", e)), 1e-8)

    p = softmax(model)  # element-wise functions of a model's values are vectors
    q = softmax(base)
    kl = call("rowsum", mul(p, call("log", div(p, q))))
    importance = mul(call("abs", d), kl)

    def quantile(q_: float) -> Node:
        nn = numel(importance)
        return kth(importance, sub(nn, call("floor", mul(q_, sub(nn, 1.0)))))

    median, q1, q3 = quantile(0.5), quantile(0.25), quantile(0.75)
    threshold = add(median, mul(1.5, sub(q3, q1)))
    return add(base, mul(call("ge", importance, threshold), d))


def _square(x: Node) -> Node:
    return mul(x, x)


def _values(x: Node) -> Node:
    """A tensor's values as a vector (a model's too), for products of the values themselves."""
    return x if x.kind.is_delta else call("where", 1.0, x, 0.0)


__all__ = [
    "arcee_fusion",
    "breadcrumbs",
    "dare",
    "della",
    "karcher",
    "kth",
    "lerp",
    "linear",
    "magnitude_prune",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ram",
    "sce",
    "slerp",
    "ties",
]
