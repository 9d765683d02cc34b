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


def nuslerp(a: Node, b: Node, t: Node | float) -> Node:
    """mergekit's ``nuslerp`` over the whole tensor (``nuslerp_flatten``, its default): the angle
    between the tensors normalised with norms clamped at 1e-7, and linear interpolation where
    |sin θ| < 1e-8.  With a base, mergekit interpolates the task vectors: write
    ``base + nuslerp(a - base, b - base, t)``; mergekit's weights w₀, w₁ give t = w₁/(w₀ + w₁)."""
    na = call("max", call("sqrt", reduce("sumsq", a)), 1e-7)
    nb = call("max", call("sqrt", reduce("sumsq", b)), 1e-7)
    cos = call("clamp", div(reduce("dot", a, b), mul(na, nb)), -1.0, 1.0)
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


def model_stock(base: Node, models: Sequence[Node]) -> Node:
    """Model Stock (Jang et al., 2024) as mergekit computes it: the mean pairwise cosine of the
    task vectors over the whole tensor, ``t = N·cos / (1 + (N-1)·cos)``, and
    ``t·mean(models) + (1-t)·base``."""
    if len(models) < 2:
        raise KindError("model_stock needs at least two fine-tuned models besides the base")
    deltas = [sub(m, base) for m in models]
    norms = [call("sqrt", reduce("sumsq", d)) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            denom = call("max", mul(norms[i], norms[j]), 1e-6)
            cosines.append(call("clamp", div(reduce("dot", deltas[i], deltas[j]), denom), -1.0, 1.0))
    cos = div(_sum(cosines), float(len(cosines)))
    n = float(len(models))
    t = div(mul(n, cos), add(1.0, mul(n - 1.0, cos)))
    mean_delta = div(_sum(deltas), n)
    return add(base, mul(t, mean_delta))


def nearswap(base: Node, model: Node, t: Node | float) -> Node:
    """mergekit's ``nearswap``: move each element of ``base`` toward ``model`` by
    ``clamp(t / |model - base|, 0, 1)`` (1 where they are equal)."""
    d = sub(model, base)
    gap = call("abs", d)
    weight = call("where", call("gt", gap, 0.0), call("clamp", div(t, gap), 0.0, 1.0), 1.0)
    return add(base, mul(weight, d))


__all__ = [
    "breadcrumbs",
    "dare",
    "della",
    "kth",
    "lerp",
    "linear",
    "magnitude_prune",
    "model_stock",
    "nearswap",
    "nuslerp",
    "slerp",
    "ties",
]
