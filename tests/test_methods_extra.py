"""The methods sce, ram, ramplus, row-wise model_stock, multislerp, karcher, arcee_fusion and row- and column-wise nuslerp against
float64 references written here from mergekit's code (merge_methods/*.py), run on whole tensors.

Inputs are float32, so tvlang accumulates in float64; results agree to float32 rounding.  Then
bf16 inputs: the correctly rounded share of the outputs, and the same bits for any chunking.
"""

from __future__ import annotations

import math

import pytest
import torch

import tvlang

SHAPES = ((37, 11), (53,), (6, 4, 3))


def _states(seed: int, n: int = 4, shapes=SHAPES, spread: float = 0.1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    states = [base]
    for _ in range(n - 1):
        states.append({k: v + spread * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return states


def _bind(states: list[dict[str, torch.Tensor]]) -> dict[str, object]:
    return {"base": states[0], **{f"m{i}": s for i, s in enumerate(states[1:], 1)}}


def _wide(states: list[dict[str, torch.Tensor]], k: str) -> list[torch.Tensor]:
    return [s[k].double() for s in states]


def _check(src: str, states: list[dict[str, torch.Tensor]], ref, rtol: float = 2e-7) -> None:  # type: ignore[no-untyped-def]
    out = tvlang.evaluate(src, _bind(states))
    for k in states[0]:
        expected = ref(_wide(states, k))
        torch.testing.assert_close(out[k].double(), expected, rtol=rtol, atol=1e-12, msg=f"{src}: {k}")


# -- references: mergekit's code, in float64 -------------------------------------------------------


def ref_ram(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    tv = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(0, keepdim=True)
    z = tv * nonzero
    merged = (z * (counts == 1) + z * (counts > 1) / counts.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)


def ref_ramplus(
    base: torch.Tensor, tensors: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """mergekit's ``ramplus_tl``; its counts are integers, so ρ is formed here in float64 (mergekit's
    integer-by-float division gives float32)."""
    tv = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    shared_counts = (nonzero & overlap).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    rho = shared_counts.double() / unique_counts.double().clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    z = tv * nonzero
    merged = (z * unique * lam.unsqueeze(-1) + z * overlap / counts.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)


def ref_model_stock_rows(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's model_stock with ``filter_wise: true``: cosines along the last dimension (a 1-D
    tensor is one row); the rows here are those of the tensor seen as ``(shape[0], -1)``."""
    rows = (base.shape[0], -1) if base.dim() > 1 else (1, -1)
    w0, ws = base.reshape(rows), [m.reshape(rows) for m in models]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def _sparse_states(seed: int, n: int = 4, keep: float = 0.4) -> list[dict[str, torch.Tensor]]:
    """Task vectors that each change about ``keep`` of the entries: unique and shared ones mixed."""
    s = _states(seed, n)
    g = torch.Generator().manual_seed(seed + 1000)
    for st in s[1:]:
        for k, v in st.items():
            st[k] = torch.where(torch.rand(v.shape, generator=g) < keep, v, s[0][k])
    return s


def ref_sce(base: torch.Tensor, tensors: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    tv = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        var = torch.var(tv, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        if k > 0:  # (mergekit's topk keeps an arbitrary k of the values tied at the threshold; all are kept)
            mask = (var.abs() >= torch.topk(var.abs().view(-1), k=k).values[-1]).double()
        tv = tv * mask
    majority = (tv.sum(0) >= 0) * 2 - 1
    erase = tv.sign() == majority
    w = torch.mean(tv**2, dim=list(range(1, tv.dim())))
    total = float(w.sum())
    w = torch.ones_like(w) / len(w) if abs(total) < 1e-6 else w / total
    w = w.reshape(-1, *([1] * base.dim())) * erase
    return base + (tv * w).sum(0) / w.sum(0).clamp(min=1e-6)


def ref_multislerp(tensors: list[torch.Tensor], weight: list[float], base=None, eps: float = 1e-8):  # type: ignore[no-untyped-def]
    t = torch.stack(tensors)
    if base is not None:
        t = t - base
    flat = t.reshape(len(tensors), -1)
    w = torch.tensor(weight, dtype=torch.float64)
    w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    result = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    result = result.reshape(t.shape[1:])
    return result if base is None else result + base


def ref_karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(x.norm()) for x in tensors]
    units = [x / n if n > 0 else torch.zeros_like(x) for x, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, us, strict=True))
    nu = float(u.norm())
    u = us[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        big_t = torch.zeros_like(u)
        for ai, ui in zip(a, us, strict=True):
            dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            big_t += ai * (theta / torch.sin(theta)) * (ui - dot * u)
        nt = big_t.norm()
        if float(nt) < tol:
            break
        u = torch.cos(nt) * u + torch.sin(nt) * (big_t / nt)
        un = u.norm()
        if float(un) > tol:
            u = u / un
    return sum(al * n for al, n in zip(alphas, norms, strict=True)) * u


def ref_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, per: str, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's nuslerp with ``flatten: false``; the vectors are the rows (``per="row"``) or the
    columns (``per="column"``) of the tensor seen as ``(shape[0], -1)``."""
    shape = v0.shape
    a, b = v0.reshape(shape[0], -1), v1.reshape(shape[0], -1)
    if per == "column" or v0.dim() == 1:
        a, b = (a.T, b.T) if v0.dim() > 1 else (a.reshape(1, -1), b.reshape(1, -1))

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(normalize(a) * normalize(b), dim=-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    colinear = (sin.abs() < eps).squeeze(-1)
    res[colinear] = (1 - t) * a[colinear] + t * b[colinear]
    if per == "column" and v0.dim() > 1:
        res = res.T
    return res.reshape(shape)


def ref_arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion (its quantiles are exact below 10⁶ elements); rows as (shape[0], -1)."""
    rows = (base.shape[0], -1) if base.dim() > 1 else (1, -1)
    p = torch.softmax(model.reshape(rows), dim=-1) + 1e-8
    q = torch.softmax(base.reshape(rows), dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = ((model - base).abs().reshape(rows) * kl).reshape(-1)
    ordered = torch.sort(importance).values

    def quantile(q_: float) -> torch.Tensor:
        return ordered[int(q_ * (len(ordered) - 1))]

    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    mask = (importance >= threshold).reshape(base.shape)
    return base + (model - base) * mask


# -- the methods against their references ----------------------------------------------------------


@pytest.mark.parametrize("epsilon", [1e-5, 0.08])
def test_ram(epsilon: float) -> None:
    s = _states(1)
    s[2]["t0"][:5] = s[0]["t0"][:5]  # entries one or no model changes
    s[3]["t0"][:3] = s[0]["t0"][:3]
    s[1]["t0"][:2] = s[0]["t0"][:2]
    _check(
        f"base + ram(m1 - base, m2 - base, m3 - base, epsilon={epsilon})",
        s,
        lambda x: ref_ram(x[0], x[1:], epsilon),
    )


@pytest.mark.parametrize(("r", "alpha", "keep"), [(0.1, 0.2, 0.4), (0.5, 3.0, 0.2), (0.3, 0.5, 1.0)])
def test_ramplus(r: float, alpha: float, keep: float) -> None:
    """Clamped at alpha, not clamped (ρ < alpha), and no unique entry at all (ρ's divisor clamped)."""
    _check(
        f"base + ramplus(m1 - base, m2 - base, m3 - base, r={r}, alpha={alpha}, epsilon=0.01)",
        _sparse_states(16, keep=keep),
        lambda x: ref_ramplus(x[0], x[1:], r, alpha, 0.01),
    )


def test_model_stock_per_row() -> None:
    s = _states(17)
    s[2]["t0"][3] = s[0]["t0"][3]  # a row one task vector leaves unchanged: its cosines are 0
    _check(
        'model_stock(base, m1, m2, m3, per="row")', s, lambda x: ref_model_stock_rows(x[0], x[1:]), rtol=1e-6
    )


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce(topk: float) -> None:
    _check(
        f"base + sce(m1 - base, m2 - base, m3 - base, select_topk={topk})",
        _states(2),
        lambda x: ref_sce(x[0], x[1:], topk),
    )


def test_sce_of_identical_models_is_the_base() -> None:
    s = _states(3, 3)
    s[1] = s[2] = dict(s[0])
    _check("base + sce(m1 - base, m2 - base, select_topk=0.5)", s, lambda x: x[0])


def test_multislerp() -> None:
    _check(
        "multislerp(m1, m2, m3, weights=[0.2, 0.5, 0.3])",
        _states(4),
        lambda x: ref_multislerp(x[1:], [0.2, 0.5, 0.3]),
    )
    _check(
        "base + multislerp(m1 - base, m2 - base, weights=[1, 3])",
        _states(5, 3),
        lambda x: ref_multislerp(x[1:], [1, 3], base=x[0]),
    )


def test_multislerp_of_opposite_vectors_falls_back_to_the_weighted_sum() -> None:
    s = _states(6, 3)
    s[0] = {k: torch.zeros_like(v) for k, v in s[0].items()}
    s[2] = {k: -v for k, v in s[1].items()}  # m2 - base = -(m1 - base), exactly
    _check(
        "base + multislerp(m1 - base, m2 - base, weights=[1, 1])",
        s,
        lambda x: x[0] + 0.5 * (x[1] - x[0]) + 0.5 * (x[2] - x[0]),
    )


@pytest.mark.parametrize("spread", [0.1, 3.0])
def test_karcher(spread: float) -> None:
    # spread 3: the directions differ widely and the iteration takes all 10 steps
    _check("karcher(m1, m2, m3)", _states(7, spread=spread), lambda x: ref_karcher(x[1:]), rtol=1e-6)
    _check(
        "base + karcher(m1 - base, m2 - base, max_iter=3, tol=1e-3)",
        _states(8, 3, spread=spread),
        lambda x: x[0] + ref_karcher([x[1] - x[0], x[2] - x[0]], 3, 1e-3),
        rtol=1e-6,
    )


def test_karcher_skips_zero_vectors_but_counts_their_norm() -> None:
    s = _states(9)
    s[2] = dict(s[0])  # m2 - base = 0
    _check(
        "base + karcher(m1 - base, m2 - base, m3 - base)",
        s,
        lambda x: x[0] + ref_karcher([x[1] - x[0], x[2] - x[0], x[3] - x[0]]),
        rtol=1e-6,
    )


@pytest.mark.parametrize("per", ["row", "column"])
@pytest.mark.parametrize("t", [0.25, 0.7])
def test_nuslerp_rows_and_columns(per: str, t: float) -> None:
    _check(f'nuslerp(m1, m2, {t}, per="{per}")', _states(10, 3), lambda x: ref_nuslerp(t, x[1], x[2], per))
    _check(
        f'base + nuslerp(m1 - base, m2 - base, {t}, per="{per}")',
        _states(11, 3),
        lambda x: x[0] + ref_nuslerp(t, x[1] - x[0], x[2] - x[0], per),
    )


def test_nuslerp_colinear_rows_interpolate_linearly() -> None:
    s = _states(12, 3)
    s[2] = {k: s[0][k] + 2 * (s[1][k] - s[0][k]) for k in s[0]}  # m2 - base = 2·(m1 - base)
    for per in ("row", "column"):
        _check(
            f'base + nuslerp(m1 - base, m2 - base, 0.3, per="{per}")',
            s,
            lambda x: x[0] + 0.7 * (x[1] - x[0]) + 0.3 * (x[2] - x[0]),
        )


def test_arcee_fusion() -> None:
    _check("arcee_fusion(base, m1)", _states(13, 2), lambda x: ref_arcee_fusion(x[0], x[1]), rtol=1e-6)


# -- bf16: correctly rounded, and chunking changes nothing -------------------------------------------

BF16 = {
    "base + ram(m1 - base, m2 - base, m3 - base, epsilon=0.01)": lambda x: ref_ram(x[0], x[1:], 0.01),
    "base + ramplus(m1 - base, m2 - base, m3 - base, r=0.5, alpha=3, epsilon=0.01)": lambda x: ref_ramplus(
        x[0], x[1:], 0.5, 3.0, 0.01
    ),
    "base + sce(m1 - base, m2 - base, m3 - base, select_topk=0.5)": lambda x: ref_sce(x[0], x[1:], 0.5),
    "multislerp(m1, m2, m3, weights=[0.2, 0.5, 0.3])": lambda x: ref_multislerp(x[1:], [0.2, 0.5, 0.3]),
    "karcher(m1, m2, m3)": lambda x: ref_karcher(x[1:]),
    'base + nuslerp(m1 - base, m2 - base, 0.3, per="row")': lambda x: (
        x[0] + ref_nuslerp(0.3, x[1] - x[0], x[2] - x[0], "row")
    ),
    'base + nuslerp(m1 - base, m2 - base, 0.3, per="column")': lambda x: (
        x[0] + ref_nuslerp(0.3, x[1] - x[0], x[2] - x[0], "column")
    ),
    "arcee_fusion(base, m1)": lambda x: ref_arcee_fusion(x[0], x[1]),
    'model_stock(base, m1, m2, m3, per="row")': lambda x: ref_model_stock_rows(x[0], x[1:]),
}


@pytest.mark.parametrize("src", list(BF16))
def test_bf16_outputs_are_correctly_rounded_and_chunking_independent(src: str) -> None:
    shapes = ((64, 96), (300,))
    s = [{k: v.to(torch.bfloat16) for k, v in st.items()} for st in _states(14, 4, shapes)]
    whole = tvlang.evaluate(src, _bind(s))
    chunked = tvlang.evaluate(src, _bind(s), chunk=4096 + 96)
    for k in s[0]:
        assert torch.equal(whole[k].view(torch.int16), chunked[k].view(torch.int16)), k
        expected = BF16[src](_wide(s, k)).to(torch.bfloat16)
        exact = (whole[k].view(torch.int16) == expected.view(torch.int16)).double().mean().item()
        assert exact >= 0.999, f"{k}: {exact:.4%} correctly rounded"


def test_misuse_is_positioned() -> None:
    s = _bind(_states(15, 3))
    with pytest.raises(tvlang.TvError) as info:
        tvlang.evaluate('nuslerp(m1, m2, 0.5, per="diagonal")', s)
    assert info.value.span is not None and "diagonal" in info.value.span.text
    with pytest.raises(tvlang.TvError) as info:
        tvlang.evaluate("base + sce(m1, m2)", s)  # models where task vectors are expected
    assert info.value.span is not None
    with pytest.raises(tvlang.TvError):
        tvlang.evaluate("multislerp(m1, m2, weights=[1, -1])", s)
    assert math.isfinite(float(tvlang.evaluate("karcher(m1)", s)["t1"].sum()))


def test_degenerate_inputs() -> None:
    """All task vectors zero: karcher, multislerp's fallback, ram and sce give the base back; one
    operand is itself."""
    s = _states(16, 3)
    s[1] = s[2] = dict(s[0])
    for src in (
        "base + karcher(m1 - base, m2 - base)",
        "base + multislerp(m1 - base, m2 - base, weights=[1, 2])",
        "base + ram(m1 - base, m2 - base)",
        "base + sce(m1 - base, m2 - base, select_topk=0.5)",
        'base + nuslerp(m1 - base, m2 - base, 0.3, per="column")',
    ):
        _check(src, s, lambda x: x[0])
    _check("karcher(m1)", _states(17, 2), lambda x: x[1])
    _check("multislerp(m1, weights=[0.3])", _states(17, 2), lambda x: x[1])
