"""Merge methods against whole-tensor float64 references written here from the formulas.

Inputs are float32 (so tvlang accumulates in float64) and the references run in
float64; results must agree to float32 rounding.  Edge cases: all-zero deltas,
ties at the threshold, density 0 and 1, 1-D tensors, opposite signs.
"""

from __future__ import annotations

import math

import pytest
import torch

import tvlang
from tvlang.backends.interpreter import random_key, uniform


def _close(result: torch.Tensor, ref: torch.Tensor) -> None:
    assert result.shape == ref.shape
    torch.testing.assert_close(result.double(), ref, rtol=2e-7, atol=1e-12)


def _states(seed: int, n: int = 4, shapes=((37, 11), (53,), (5, 4, 3))) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    states = [base]
    for _ in range(n - 1):
        states.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return states


def _bind(states: list[dict[str, torch.Tensor]]) -> dict[str, object]:
    return {"base": states[0], **{f"m{i}": s for i, s in enumerate(states[1:], 1)}}


# -- references ---------------------------------------------------------------------------------


def ref_prune(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    k = math.floor(density * d.numel())
    if k < 1:
        return torch.zeros_like(d)
    thr = torch.sort(d.abs().reshape(-1), descending=True).values[k - 1]
    return torch.where(d.abs() >= thr, d, torch.zeros_like(d))


def ref_ties(deltas, weights, density, elect="sum", divide="weights"):
    trimmed = torch.stack([ref_prune(d, density) for d in deltas])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * deltas[0].dim()))
    weighted = trimmed * w
    vote = weighted.sum(0) if elect == "sum" else weighted.sign().sum(0)
    majority = torch.where(vote >= 0, 1.0, -1.0).to(torch.float64)
    mask = (weighted.sign() == majority).to(torch.float64)
    merged = (weighted * mask).sum(0)
    if divide == "none":
        return merged
    div = mask.sum(0) if divide == "count" else (w * mask).sum(0)
    return merged / torch.where(div == 0, 1.0, div)


def ref_slerp(a, b, t):
    na, nb = a.norm(), b.norm()
    va = a / na if na > 1e-8 else a
    vb = b / nb if nb > 1e-8 else b
    dot = (va * vb).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.arccos(dot)
    return torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * b


def ref_model_stock(base, models):
    ds = [m - base for m in models]
    cos = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            c = (ds[i] * ds[j]).sum() / (ds[i].norm() * ds[j].norm()).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean()
    n = len(models)
    t = n * c / (1 + (n - 1) * c)
    return t * (sum(models) / n) + (1 - t) * base


def ref_breadcrumbs(d, density, gamma):
    n = d.numel()
    target = math.floor(density * n)
    n_top = math.floor(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.sort(d.abs().reshape(-1)).indices
    mask = torch.zeros(n, dtype=torch.float64)
    mask[order[n_bot : n - n_top]] = 1  # (mergekit writes [n_bot:-n_top], which is empty for n_top = 0)
    return d * mask.reshape(d.shape)


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_magnitude_prune(density: float) -> None:
    s = _states(1, 2)
    out = tvlang.evaluate(f"base + magnitude_prune(m1 - base, {density})", _bind(s))
    for k, b in s[0].items():
        _close(out[k], b.double() + ref_prune(s[1][k].double() - b.double(), density))


def test_prune_keeps_every_tie_at_the_threshold() -> None:
    base = {"w": torch.zeros(8)}
    ft = {"w": torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.0, -3.0, 0.5])}
    out = tvlang.evaluate("magnitude_prune(ft - base, 0.375)", {"base": base, "ft": ft})  # k = 3
    assert out["w"].tolist() == [3.0, -2.0, 2.0, 2.0, 0.0, 0.0, -3.0, 0.0]


@pytest.mark.parametrize(("elect", "divide"), [("sum", "weights"), ("count", "count"), ("sum", "none")])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties(elect: str, divide: str, density: float) -> None:
    s = _states(2, 4)
    src = f'base + ties(m1 - base, m2 - base, m3 - base, weights=[0.5, 0.3, 0.2], density={density}, elect="{elect}", divide="{divide}")'
    out = tvlang.evaluate(src, _bind(s))
    for k, b in s[0].items():
        deltas = [s[i][k].double() - b.double() for i in (1, 2, 3)]
        _close(out[k], b.double() + ref_ties(deltas, [0.5, 0.3, 0.2], density, elect, divide))


def test_ties_edge_cases_zero_and_opposite_deltas() -> None:
    base = {"w": torch.zeros(6)}
    a = {"w": torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, -0.5])}
    b = {"w": torch.tensor([-1.0, -1.0, 0.0, -3.0, 0.0, 0.5])}
    out = tvlang.evaluate("ties(a - base, b - base)", {"base": base, "a": a, "b": b})
    ref = ref_ties([a["w"].double(), b["w"].double()], [1.0, 1.0], 1.0)
    _close(out["w"], ref)
    assert out["w"][2] == 0 and out["w"][4] == 0  # all-zero columns stay zero (no division by zero)


def test_dare_matches_its_documented_mask_and_rescale() -> None:
    s = _states(3, 2)
    out = tvlang.evaluate("base + dare(m1 - base, 0.7, seed=5)", _bind(s))
    stream = "m1 - base"
    for k, b in s[0].items():
        d = s[1][k].double() - b.double()
        u = torch.empty(d.numel(), dtype=torch.float64)
        uniform(random_key(5, stream, k), 0, d.numel(), u)
        keep = (u >= 0.7).reshape(d.shape).double()
        _close(out[k], b.double() + d * keep / 0.3)


def test_dare_l1_rescale_and_keep_rate() -> None:
    big = {"w": torch.zeros(20000)}
    ft = {"w": torch.randn(20000, generator=torch.Generator().manual_seed(0))}
    out = tvlang.evaluate('dare(ft - base, 0.9, seed=1, rescale="l1")', {"base": big, "ft": ft})["w"].double()
    kept = (out != 0).double().mean().item()
    assert 0.08 < kept < 0.12
    assert out.abs().sum().item() == pytest.approx(ft["w"].double().abs().sum().item(), rel=1e-6)


def test_random_streams_follow_the_source_text() -> None:
    s = _states(10, 3, shapes=((64, 64),))
    b = _bind(s)
    prog = tvlang.compile(
        "def my(d) = dare(d, 0.5, seed=3)\n"
        "output x = base + my(m1 - base)\n"
        "output y = base + my(m2 - base)\n"
        "output z = base + dare(m1 - base, 0.5, seed=3)\n",
        bindings=b,
    )
    out = prog.run()
    mask = {k: (v - s[0]["t0"]) != 0 for k, v in ((k, out[k]["t0"]) for k in "xyz")}
    assert not torch.equal(mask["x"], mask["y"])  # two expansions of one method draw different masks
    assert not torch.equal(mask["x"], mask["z"])  # ... and differ from a direct call


def test_dare_is_seeded_and_chunking_independent() -> None:
    s = _states(4, 2, shapes=((300, 70),))
    runs = [tvlang.evaluate("base + dare(m1 - base, 0.5, seed=3)", _bind(s), chunk=c, threads=t)
            for c, t in ((None, 1), (4096, 2), (5000, 1))]  # fmt: skip
    assert all(torch.equal(runs[0]["t0"], r["t0"]) for r in runs[1:])
    other = tvlang.evaluate("base + dare(m1 - base, 0.5, seed=4)", _bind(s))
    assert not torch.equal(runs[0]["t0"], other["t0"])


def ref_della(d: torch.Tensor, density: float, eps: float, u: torch.Tensor, rescale: str) -> torch.Tensor:
    rows = d.reshape(d.shape[0], -1) if d.dim() > 1 else d.reshape(1, -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order)).double()
    probs = (density - eps) + (ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)) * 2 * eps
    masked = (rows * (u.reshape(rows.shape) < probs)).reshape(d.shape)
    if rescale == "inverse":
        return masked / probs.reshape(d.shape)
    before, after = d.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


@pytest.mark.parametrize("rescale", ["l1", "inverse"])
def test_della(rescale: str) -> None:
    s = _states(11, 2)
    out = tvlang.evaluate(f'base + della(m1 - base, 0.5, 0.3, seed=2, rescale="{rescale}")', _bind(s))
    for k, b in s[0].items():
        d = s[1][k].double() - b.double()
        u = torch.empty(d.numel(), dtype=torch.float64)
        uniform(random_key(2, "m1 - base", k), 0, d.numel(), u)
        _close(out[k], b.double() + ref_della(d, 0.5, 0.3, u, rescale))


def test_della_rows_survive_any_chunking_and_bad_epsilon_is_an_error() -> None:
    s = _states(12, 2, shapes=((3000, 7), (50,)))
    src = 'base + della(m1 - base, 0.4, 0.1, seed=9, rescale="none")'
    runs = [tvlang.evaluate(src, _bind(s), chunk=c, threads=t) for c, t in ((None, 1), (70, 2), (64, 1))]
    assert all(torch.equal(runs[0][k], r[k]) for r in runs[1:] for k in runs[0])
    with pytest.raises(tvlang.TvTypeError, match="epsilon"):
        tvlang.evaluate("base + della(m1 - base, 0.5, 0.6)", _bind(s))


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.01), (0.9, 0.2), (0.3, 0.0)])
def test_breadcrumbs(density: float, gamma: float) -> None:
    s = _states(5, 2)
    out = tvlang.evaluate(f"base + breadcrumbs(m1 - base, {density}, {gamma})", _bind(s))
    for k, b in s[0].items():
        _close(out[k], b.double() + ref_breadcrumbs(s[1][k].double() - b.double(), density, gamma))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp(t: float) -> None:
    s = _states(6, 3)
    out = tvlang.evaluate(f"slerp(m1, m2, {t})", _bind(s))
    for k in s[0]:
        _close(out[k], ref_slerp(s[1][k].double(), s[2][k].double(), t))


def ref_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    n0, n1 = v0.norm().clamp(min=1e-7), v1.norm().clamp(min=1e-7)
    theta = torch.acos(((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1))
    if torch.sin(theta).abs() < 1e-8:
        return (1 - t) * v0 + t * v1
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


@pytest.mark.parametrize("t", [0.25, 0.6])
def test_nuslerp_models_and_task_vectors(t: float) -> None:
    s = _states(13, 3)
    b = _bind(s)
    plain = tvlang.evaluate(f"nuslerp(m1, m2, {t})", b)
    based = tvlang.evaluate(f"base + nuslerp(m1 - base, m2 - base, {t})", b)
    for k, base in s[0].items():
        m1, m2, base = s[1][k].double(), s[2][k].double(), base.double()
        _close(plain[k], ref_nuslerp(t, m1, m2))
        _close(based[k], base + ref_nuslerp(t, m1 - base, m2 - base))


def test_slerp_colinear_falls_back_to_lerp() -> None:
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([2.0, 4.0, 6.0])}
    out = tvlang.evaluate("slerp(a, b, 0.25)", {"a": a, "b": b})
    _close(out["w"], torch.tensor([1.25, 2.5, 3.75], dtype=torch.float64))


def test_model_stock_linear_lerp_nearswap() -> None:
    s = _states(7, 4)
    b = _bind(s)
    stock = tvlang.evaluate("model_stock(base, m1, m2, m3)", b)
    lin = tvlang.evaluate("linear(m1, m2, m3, weights=[1, 2, 1])", b)
    lerp = tvlang.evaluate("lerp(base, m1, 0.3)", b)
    near = tvlang.evaluate("nearswap(base, m1, 0.05)", b)
    for k, base in s[0].items():
        ms = [s[i][k].double() for i in (1, 2, 3)]
        _close(stock[k], ref_model_stock(base.double(), ms))
        _close(lin[k], (ms[0] + 2 * ms[1] + ms[2]) / 4)
        _close(lerp[k], base.double() + 0.3 * (ms[0] - base.double()))
        d = ms[0] - base.double()
        w = torch.where(d.abs() > 0, (0.05 / d.abs()).clamp(0, 1), 1.0)
        _close(near[k], base.double() + w * d)


def test_reductions_and_elementwise_building_blocks() -> None:
    x = {"w": torch.tensor([3.0, -4.0, 0.0, 1.0])}
    z = {"w": torch.zeros(4)}
    run = lambda e: tvlang.evaluate(e, {"x": x, "z": z})["w"].tolist()  # noqa: E731
    assert run("(x - z) * 0 + norm(x - z)") == pytest.approx([math.sqrt(26)] * 4)
    assert run("(x - z) * 0 + sum(x - z) + mean(x - z)") == [0.0] * 4
    assert run("(x - z) * 0 + dot(x - z, x - z) + count(x - z) + numel(x - z)") == [33.0] * 4
    assert run("(x - z) * 0 + kth(x - z, 2) + quantile(x - z, 0)") == [-3.0] * 4  # 1 + (-4)
    assert run("where(abs(x - z) > 2, x - z, 0)") == [3.0, -4.0, 0.0, 0.0]
    assert run("clamp(x - z, -1, 2) + sign(x - z)") == [3.0, -2.0, 0.0, 2.0]
    assert run("min(x - z, 0) + max(x - z, 0)") == [3.0, -4.0, 0.0, 1.0]


def test_user_defined_ties_matches_builtin() -> None:
    s = _states(8, 3)
    program = """
def prune(d, density) = where(abs(d) >= kth(abs(d), floor(density*numel(d))), d, 0)
def my_ties(a, b, density=0.4) = tie_merge(prune(a, density), prune(b, density))
def tie_merge(a, b) = (a*(sign(a) == elect(a, b)) + b*(sign(b) == elect(a, b))) \\
                      / where(agree(a, b) == 0, 1, agree(a, b))
def elect(a, b) = where(a + b >= 0, 1, -1)
def agree(a, b) = (sign(a) == elect(a, b)) + (sign(b) == elect(a, b))
output mine = base + my_ties(m1 - base, m2 - base)
output builtin = base + ties(m1 - base, m2 - base, density=0.4)
"""
    prog = tvlang.compile(program, bindings=_bind(s))
    out = prog.run()
    for k in s[0]:
        assert torch.equal(out["mine"][k], out["builtin"][k])
    # Planned alone, each compiles to the same program: one pass selects the thresholds (a sampled
    # bracket; radix rounds repeat that pass only where it misses), one element-wise pass writes.
    defs = program.split("output")[0]
    mine = tvlang.compile(defs + "output o = base + my_ties(m1 - base, m2 - base)", bindings=_bind(s)).plan()
    builtin = tvlang.compile("base + ties(m1 - base, m2 - base, density=0.4)", bindings=_bind(s)).plan()
    assert mine.tasks[0].passes == builtin.tasks[0].passes == 2
    ops = [sorted((i.op, str(i.attr), i.need) for i in p.tasks[0].program.instrs) for p in (mine, builtin)]
    assert ops[0] == ops[1]


def test_method_misuse_is_positioned() -> None:
    s = _states(9, 2)
    with pytest.raises(tvlang.TvTypeError) as info:
        tvlang.evaluate("ties(m1, base)", _bind(s))
    assert "must be a delta" in str(info.value) and info.value.span is not None
    with pytest.raises(tvlang.TvTypeError, match="must be one of"):
        tvlang.evaluate('base + ties(m1 - base, elect="vote")', _bind(s))
    with pytest.raises(tvlang.TvTypeError, match="weights"):
        tvlang.evaluate("base + ties(m1 - base, weights=[1, 2])", _bind(s))


def test_ties_with_a_model_wide_trim() -> None:
    s = _states(14, 3)
    out = tvlang.evaluate('base + ties(m1 - base, m2 - base, density=0.3, scope="model")', _bind(s))
    names = list(s[0])
    deltas = [[s[i][k].double() - s[0][k].double() for k in names] for i in (1, 2)]
    for i in range(2):  # the reference trims each task vector by one threshold over all its tensors
        flat = torch.cat([d.reshape(-1) for d in deltas[i]])
        thr = torch.sort(flat.abs(), descending=True).values[math.floor(0.3 * flat.numel()) - 1]
        deltas[i] = [torch.where(d.abs() >= thr, d, 0.0) for d in deltas[i]]
    for j, k in enumerate(names):
        ref = ref_ties([deltas[0][j], deltas[1][j]], [1.0, 1.0], 1.0)
        _close(out[k], s[0][k].double() + ref)
    plan = tvlang.compile(
        'base + ties(m1 - base, m2 - base, density=0.3, scope="model")', bindings=_bind(s)
    ).plan()
    assert len(plan.model_reductions) == 2 and "model-wide" in plan.explain()
    assert plan.model_reductions[0].k == math.floor(0.3 * sum(t.numel for t in plan.tasks))


def test_model_wide_trim_of_a_rescaled_vector_is_a_positioned_error() -> None:
    s = _states(15, 2)
    with pytest.raises(tvlang.TvTypeError) as info:
        tvlang.evaluate(
            'base + magnitude_prune(dare(m1 - base, 0.5, rescale="l1"), 0.5, scope="model")', _bind(s)
        )
    assert "per-tensor statistics" in info.value.message and info.value.span is not None
