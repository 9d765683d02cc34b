"""The compiled CPU kernels (tvlang.codegen.c) against the eager torch path, bit for bit.

Every planned pass type — weighted sums (one output and sweeps), element-wise programs, the
operands of reduction passes, model-wide reductions, seeded random masks — runs both ways
on the same inputs, for bf16, fp16 and fp32, at chunk sizes that split tensors raggedly.
"""

from __future__ import annotations

import functools
import math
import operator
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tvlang
from tvlang.codegen import c
from tvlang.codegen.spec import SUM, KernelSpec, Stmt, task_spec
from tvlang.errors import TvParamError
from tvlang.plan.plan import BLOCK, LANES

pytestmark = pytest.mark.skipif(c.compiler() is None, reason="no C compiler here: compiled kernels are off")

SHAPES = ((37, 11), (2053,), (5, 4, 3), (1,))


def _states(dtype: torch.dtype, n: int = 4, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(SHAPES)}
    out = {"base": {k: v.to(dtype) for k, v in base.items()}}
    for j in range(1, n):
        out[f"m{j}"] = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _both(src: str, bindings: dict[str, object], **kw: object) -> tuple[dict, dict]:
    eager = tvlang.evaluate(src, bindings, kernels="eager", **kw)
    compiled = tvlang.evaluate(src, bindings, kernels="compiled", **kw)
    return eager, compiled


def _assert_same_bits(eager: dict, compiled: dict) -> None:
    assert eager.keys() == compiled.keys()
    for k in eager:
        a, b = eager[k], compiled[k]
        if isinstance(a, dict):  # several outputs
            _assert_same_bits(a, b)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b)), f"{k}: {(a != b).sum()} elements differ"


METHODS = [
    "base + 0.4*(m1 - base) - 0.3*(m2 - base) + 0.4*(m3 - base)",
    "base + ties(m1 - base, m2 - base, m3 - base, weights=[0.5, 0.3, 0.2], density=0.3)",
    'base + ties(m1 - base, m2 - base, density=0.5, elect="count", divide="count")',
    "base + dare(m1 - base, 0.7, seed=5)",
    "base + dare_ties(m1 - base, m2 - base, density=0.5, seed=2)",
    'base + della(m1 - base, 0.5, 0.3, seed=2, rescale="l1")',
    "base + magnitude_prune(m1 - base, 0.3)",
    "base + breadcrumbs(m1 - base, 0.5, 0.1)",
    "lerp(base, m1, 0.3)",
    "slerp(m1, m2, 0.4)",
    "base + nuslerp(m1 - base, m2 - base, 0.25)",
    "model_stock(base, m1, m2, m3)",
    'model_stock(base, m1, m2, m3, per="row")',
    "nearswap(base, m1, 0.05)",
    "linear(m1, m2, m3, weights=[1, 2, 1])",
    "base + ram(m1 - base, m2 - base, m3 - base, epsilon=0.02)",
    "base + ramplus(m1 - base, m2 - base, m3 - base, r=0.5, alpha=3, epsilon=0.02)",
    "base + sce(m1 - base, m2 - base, m3 - base, select_topk=0.4)",
    "multislerp(m1, m2, m3, weights=[0.2, 0.5, 0.3])",
    "base + multislerp(m1 - base, m2 - base, weights=[1, 3])",
    "karcher(m1, m2, m3)",
    'nuslerp(m1, m2, 0.4, per="row")',
    'base + nuslerp(m1 - base, m2 - base, 0.4, per="column")',
    "arcee_fusion(base, m1)",
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("src", METHODS)
def test_methods_match_eager_bit_for_bit(src: str, dtype: torch.dtype) -> None:
    eager, compiled = _both(src, _states(dtype), chunk=700, threads=2)
    _assert_same_bits(eager, compiled)


def test_model_wide_trim_and_sweeps_match_eager() -> None:
    b = _states(torch.bfloat16)
    src = 'base + ties(m1 - base, m2 - base, density=0.4, scope="model")'
    _assert_same_bits(*_both(src, b, chunk=512))
    sweep = "param lam = [0.1, 0.3, 0.5, 0.7]\noutput merged = base + lam*(m1 - base) - lam/2*(m2 - base)\n"
    eager = tvlang.compile(sweep, bindings=b).run(options=tvlang.Options(kernels="eager"))
    compiled = tvlang.compile(sweep, bindings=b).run(options=tvlang.Options(kernels="compiled"))
    _assert_same_bits(eager, compiled)


ELEMENTWISE = [
    "abs(d)",
    "sign(d)",
    "sqrt(abs(d))",
    "floor(d * 10)",
    "ceil(d * 10)",
    "min(d, e)",
    "max(d, e)",
    "clamp(d, -0.03, 0.04)",
    "where(d > e, d, e)",
    "(d < e) + (d <= e) + (d >= e) + (d == e) + (d != e)",
    "d / e",
    "2 / d",
    "0.7 / d",
    "d / 3",
    "0.7 - d",
    "d * e - e",
    "-d",
    "d * (sum(d * e) / sqrt(sum(d * d)))",
]
# libm's and torch's (SLEEF) sin and acos may differ in the last bit of the
# accumulation dtype; after rounding to the output they agree to one unit in the last place.
TRANSCENDENTAL = ["sin(d)", "acos(clamp(d * 10, -1, 1))", "cos(d * 3)", "exp(d * 10)", "log(abs(d))"]


def _delta_bindings(dtype: torch.dtype) -> dict[str, object]:
    s = _states(dtype, 3)
    return {"d": tvlang.delta(s["m1"]), "e": tvlang.delta(s["m2"])}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("src", ELEMENTWISE)
def test_elementwise_functions_match_eager_bit_for_bit(src: str, dtype: torch.dtype) -> None:
    _assert_same_bits(*_both(src, _delta_bindings(dtype), chunk=1000))


@pytest.mark.parametrize("src", TRANSCENDENTAL)
def test_transcendental_functions_within_one_ulp(src: str) -> None:
    eager, compiled = _both(src, _delta_bindings(torch.float32))
    for k in eager:
        a, b = eager[k].double(), compiled[k].double()
        ulp = torch.finfo(torch.float32).eps * a.abs().clamp(min=torch.finfo(torch.float32).tiny)
        assert bool(((a - b).abs() <= ulp).all()), k


def test_special_values_propagate_like_eager() -> None:
    """NaN, ±inf, ±0 and subnormals through every element-wise function (NaN payloads aside)."""
    specials = torch.tensor(
        [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1.5, -2.5, 3.0, 0.5, -0.5]
    )
    d = {"w": specials.repeat_interleave(len(specials))}
    e = {"w": specials.repeat(len(specials))}
    bindings = {"d": tvlang.delta(d), "e": tvlang.delta(e)}
    for src in [*ELEMENTWISE[:-1], "d + e", "d - e", "d * e"]:
        eager, compiled = _both(src, bindings, nonfinite="propagate")
        torch.testing.assert_close(compiled["w"], eager["w"], rtol=0, atol=0, equal_nan=True, msg=src)


def test_nonfinite_outputs_get_the_same_errors_and_reports(tmp_path: Path) -> None:
    base = {"w": torch.zeros(10_000, dtype=torch.bfloat16)}
    ft = {"w": torch.zeros(10_000, dtype=torch.bfloat16)}
    ft["w"][1234] = math.nan
    bindings = {"base": base, "ft": ft}
    for kernels in ("eager", "compiled"):
        with pytest.raises(tvlang.TvInputError, match="NaN"):
            tvlang.evaluate("base + 0.5*(ft - base)", bindings, kernels=kernels)
    warned = [
        tvlang.evaluate("base + 0.5*(ft - base)", bindings, kernels=k, nonfinite="warn")["w"]
        for k in ("eager", "compiled")
    ]
    assert torch.equal(_bits(warned[0]), _bits(warned[1]))


def test_kernels_are_cached_on_disk_and_shared_by_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVLANG_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "_loaded", {})
    b = _states(torch.bfloat16)
    program = tvlang.compile("base + 0.5*(m1 - base)", bindings=b)
    plan = program.plan()
    from tvlang.backends.compiled import prepare_kernels

    assert prepare_kernels(plan).prepare() == 1  # one kernel for every bf16 tensor
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(c, "_loaded", {})  # a new process: loaded from the disk cache, not rebuilt
    prepare_kernels(plan)
    assert built[0].stat().st_mtime_ns == mtime


def test_generated_source_holds_numbers_only() -> None:
    """No name or string of a program reaches the compiler: weights are exact hex literals."""
    w = {"layer.Secret_Weight": torch.ones(4, dtype=torch.bfloat16)}
    plan = tvlang.compile(
        "Pretrained + 0.1*(Finetuned - Pretrained)", bindings={"Pretrained": w, "Finetuned": w}
    ).plan()
    task = plan.tasks[0]
    bound = task_spec(task, {i: plan.inputs[i].tensors[task.name].dtype for i in task.reads})
    source = c.c_source(bound.spec)
    assert "Secret" not in source and "Pretrained" not in source and "Finetuned" not in source
    assert "fmaf(" in source and "weights[" in source
    assert (0.1).hex() not in source and (0.9).hex() not in source  # weights are passed at each call


def test_merges_differing_only_in_weights_share_one_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tvlang.backends.compiled import prepare_kernels

    monkeypatch.setenv("TVLANG_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "_loaded", {})
    b = _states(torch.bfloat16)
    results = []
    for lam in (0.1, 0.35, -2.5):
        src = f"base + {lam}*(m1 - base) - 0.2*(m2 - base)"
        plan = tvlang.compile(src, bindings=b).plan()
        prepare_kernels(plan)
        eager, compiled = _both(src, b)
        _assert_same_bits(eager, compiled)
        results.append(compiled["t0"])
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1  # one library for the three merges
    assert not torch.equal(results[0], results[1])


def test_a_failing_compiler_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVLANG_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(c, "_loaded", {})
    b = _states(torch.float32)
    with pytest.warns(UserWarning, match="kernel compilation failed"):
        out = tvlang.evaluate("base + 0.5*(m1 - base)", b, kernels="compiled")
    ref = tvlang.evaluate("base + 0.5*(m1 - base)", b, kernels="eager")
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_compiled_without_a_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(TvParamError, match="C compiler"):
        tvlang.evaluate("a", {"a": {"w": torch.ones(3)}}, kernels="compiled")
    out = tvlang.evaluate("0.25*a + 0.75*a", {"a": {"w": torch.ones(3)}}, kernels="auto")  # eager, quietly
    assert out["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(TvParamError, match="kernel mode"):
        tvlang.evaluate("a", {"a": {"w": torch.ones(3)}}, kernels="fast")


def test_handwritten_spec_rounds_like_torch() -> None:
    """The bf16 and fp16 conversions: every float32 bit pattern class, round-to-nearest-even."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    spec = KernelSpec(("F32",), ((0, "BF16"), (0, "F16")), (Stmt("load", (), 0),), "F32", 0, 0)
    kernel = c.load(spec)
    bf, hf = torch.empty(x.numel(), dtype=torch.bfloat16), torch.empty(x.numel(), dtype=torch.float16)
    bad = kernel([x], [bf, hf])
    finite = torch.isfinite(x.bfloat16()) & torch.isfinite(x.half())
    assert bad == int((~finite).sum())
    assert torch.equal(_bits(bf), _bits(x.bfloat16()))
    assert torch.equal(hf[~x.half().isnan()], x.half()[~x.half().isnan()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_radix_histogram_selects_like_eager(dtype: torch.dtype) -> None:
    from tvlang.backends.reductions import KthLargest

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50_000, generator=g, dtype=dtype)
    x[:100] = 0.0
    x[100:200] = -0.0
    x[200:300] = x[300:400]  # ties
    x[400] = math.inf
    for k in (1, 7, 25_000, 49_999, 50_000):
        selects = [KthLargest(k, x.numel(), dtype), KthLargest(k, x.numel(), dtype, c.radix_histogram())]
        for sel in selects:
            for r in range(sel.rounds):
                for lo in range(0, x.numel(), 4096 * 3):  # chunked as the runtime does
                    sel.add(x[lo : lo + 4096 * 3], lo, r)
                sel.end_round()
        eager, compiled = (s.result() for s in selects)
        assert eager == compiled == torch.sort(x, descending=True).values[k - 1].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_radix_histogram_counts_like_eager(dtype: torch.dtype) -> None:
    """Every round's counts, not only the selected value, over chunk lengths that change per round
    (a kernel that skips blocks of values must count the same at every block boundary)."""
    from tvlang.backends.reductions import DIGIT, KthLargest

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(20_011, generator=g, dtype=dtype) * 0.01).abs()
    x[::7] = x[3]  # a crowded bucket, as bf16 differences make
    x[5:9] = torch.tensor([-0.0, 0.0, -1.5, math.inf], dtype=dtype)
    k = 10_000
    eager, compiled = KthLargest(k, x.numel(), dtype), KthLargest(k, x.numel(), dtype, c.radix_histogram())
    for r in range(eager.rounds):
        for sel in (eager, compiled):
            for lo in range(0, x.numel(), 1000 + 37 * r):
                sel.add(x[lo : lo + 1000 + 37 * r], lo, r)
        assert (eager.hist[:DIGIT] == compiled.hist[:DIGIT]).all()
        eager.end_round()
        compiled.end_round()
    assert eager.result() == compiled.result() == torch.sort(x, descending=True).values[k - 1].item()


def test_an_unwritable_cache_builds_privately_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("TVLANG_CACHE", str(blocker))  # mkdir below a file fails
    monkeypatch.setattr(c, "_loaded", {})
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    b = _states(torch.float32)
    out = tvlang.evaluate("base + 0.5*(m1 - base)", b, kernels="compiled")
    ref = tvlang.evaluate("base + 0.5*(m1 - base)", b, kernels="eager")
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("n", [1, 4095, 4097, 3 * 4096 + 5])
def test_reduction_pass_block_sums_match_eager(n: int) -> None:
    """Sums, norms and dot products (slerp, model_stock, DARE's L1 rescale) over whole blocks and a
    ragged last one: the compiled kernel adds each block in element order, as block_sums does."""
    g = torch.Generator().manual_seed(n)
    states = {k: {"w": torch.randn(n, generator=g)} for k in ("base", "m1", "m2", "m3")}
    for src in ("slerp(m1, m2, 0.3)", "model_stock(base, m1, m2, m3)", "base + dare(m1 - base, 0.5, seed=1)"):
        _assert_same_bits(*_both(src, states, chunk=4096))


def _lanes_reference(block: list[float]) -> float:
    """A block's sum in the documented order, in Python floats: element j in lane j % LANES, each
    lane in element order from +0.0, then the lanes pairwise."""
    lanes = [0.0] * LANES
    for j, x in enumerate(block):
        lanes[j % LANES] += x
    while len(lanes) > 1:
        lanes = [a + b for a, b in zip(lanes[0::2], lanes[1::2], strict=True)]
    return lanes[0]


@pytest.mark.parametrize("n", [1, 7, 9, BLOCK, BLOCK + 13, 2 * BLOCK + LANES])
def test_block_sums_add_lanes_in_the_documented_order(n: int) -> None:
    """The eager block sums and a compiled kernel's SUM output both add each block in LANES
    lanes, pairwise at the end, bit for bit as a plain Python loop does; the values span 16
    orders of magnitude, so that another order (one running sum) gives other bits."""
    from tvlang.backends.reductions import block_sums

    g = np.random.default_rng(n)
    values = g.standard_normal(n) * 10.0 ** g.integers(-8, 8, n)
    blocks = [values[b : b + BLOCK].tolist() for b in range(0, n, BLOCK)]
    expected = [_lanes_reference(block) for block in blocks]
    if n >= BLOCK:  # (the order matters for these values)
        assert expected != [functools.reduce(operator.add, block, 0.0) for block in blocks]
    assert block_sums(torch.from_numpy(values)).tolist() == expected
    spec = KernelSpec(("F64",), ((0, SUM),), (Stmt("load", (), 0),), "F64", 0, 0)
    sums = np.empty(len(blocks), dtype=np.float64)
    c.load(spec)([values], [sums], n=n)
    assert sums.tolist() == expected


def _gcc() -> bool:
    cc = c.compiler()
    if cc is None:
        return False
    done = subprocess.run([cc, "-v"], capture_output=True, text=True)
    return "gcc version" in done.stderr


@pytest.mark.skipif(not _gcc(), reason="-fopt-info-vec (the vectoriser's report) is GCC's")
def test_generated_loops_vectorise(tmp_path: Path) -> None:
    """Kernels with many pointers, random keys, min/max and block sums all vectorise (each of
    these once stopped GCC from vectorising, at 3-6x the time per element)."""
    from tvlang.codegen.spec import reduction_spec

    b = _states(torch.bfloat16, n=5)
    sources = []
    for src in (
        "base + 0.4*(m1 - base) - 0.3*(m2 - base) + 0.4*(m3 - base) - (m4 - base)",
        "base + dare_ties(m1 - base, m2 - base, m3 - base, m4 - base, density=0.5, seed=0)",
        "nearswap(base, m1, 0.05)",
    ):
        plan = tvlang.compile(src, bindings=b).plan()
        task = plan.tasks[0]
        dtypes = {i: plan.inputs[i].tensors[task.name].dtype for i in task.reads}
        sources.append(c.c_source(task_spec(task, dtypes).spec))
        if task.program is not None and task.program.passes > 1:
            sources.append(
                c.c_source(reduction_spec(task.program, task.program.reductions_in(1), dtypes).spec)
            )
    for k, source in enumerate(sources):
        path = tmp_path / f"k{k}.c"
        path.write_text(source)
        cc = c.compiler()
        assert cc is not None
        done = subprocess.run(
            [cc, *c.FLAGS, "-fopt-info-vec", "-o", str(tmp_path / f"k{k}.so"), str(path)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert "loop vectorized" in done.stderr, source


def test_the_plan_says_which_tensors_run_eagerly_and_the_runtime_obeys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan decides: `tvlang plan` names the tensors no generated kernel computes (and why),
    the runtime never asks the compiled kernels for them, and every other tensor runs compiled."""
    import tvlang.backends.compiled as compiled_backend

    states = _states(torch.bfloat16, n=2)
    linear = tvlang.compile("base + 0.4*(m1 - base)", bindings=states)
    assert linear.plan(options=tvlang.Options(kernels="compiled")).eager == {}

    # a function of whole rows beside libm's exp/log stays eager (it keeps torch's bits)
    fusion = tvlang.compile("arcee_fusion(base, m1)", bindings=states)
    plan = fusion.plan(options=tvlang.Options(kernels="compiled"))
    assert plan.eager and set(plan.eager) <= {t.name for t in plan.tasks}
    assert all("libm" in why for why in plan.eager.values())
    text = fusion.explain(options=tvlang.Options(kernels="compiled"), all_tensors=True)
    for name in plan.eager:
        assert f"{name}  [" in text and "eager: a function of whole rows" in text
    assert f"{len(plan.eager)} tensor" in text.splitlines()[-1]
    assert (
        fusion.plan(options=tvlang.Options(kernels="eager")).eager == {}
    )  # all eager: nothing to single out

    asked: list[str] = []
    real = compiled_backend.Kernels.task

    def spy(self: compiled_backend.Kernels, task: object) -> object:
        asked.append(task.name)  # type: ignore[attr-defined]
        return real(self, task)  # type: ignore[arg-type]

    monkeypatch.setattr(compiled_backend.Kernels, "task", spy)
    asked.clear()
    fusion.run(options=tvlang.Options(kernels="compiled", threads=1))
    assert sorted(asked) == sorted(t.name for t in plan.tasks)  # prepare() looked once; chunks never asked


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize(
    "src",
    [
        "base + ties(ft - base, ft2 - base, density=0.5)",
        "slerp(ft, ft2, 0.3)",
        'base + dare(ft - base, 0.5, seed=1, rescale="l1")',
    ],
)
def test_float8_files_run_compiled_like_eager(tmp_path: Path, src: str, dtype: torch.dtype) -> None:
    """float8 read from files arrives as bytes (numpy uint8), which cannot say E4M3 from E5M2: the
    reduction and program kernels take the plan's dtypes, so both formats give the eager bits."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = torch.randn(257, 33, generator=g)
    paths = {}
    for name, noise in (("base", 0.0), ("ft", 0.3), ("ft2", 0.3)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({"w": (base + noise * torch.randn(base.shape, generator=g)).to(dtype)}, paths[name])
    eager, compiled = _both(src, paths, dtype="fp32", chunk=1000)
    _assert_same_bits(eager, compiled)


def test_compiled_selections_take_whole_chunks_where_eager_ones_stay_small() -> None:
    """A compiled program holds no per-op temporaries, so a two-pass TIES task gets the plan's
    full chunk (fewer page drops, which interrupt the other cores); op by op it stays at the
    eager cap, whose temporaries must stay in cache."""
    from tvlang.plan.planner import MAX_CHUNK, PROGRAM_CHUNK

    g = torch.Generator().manual_seed(3)
    base = torch.randn(1 << 21, generator=g)
    states = {
        "base": {"w": base},
        **{f"m{i}": {"w": base + 0.01 * torch.randn(base.shape, generator=g)} for i in (1, 2)},
    }
    program = tvlang.compile("base + ties(m1 - base, m2 - base, density=0.5)", bindings=states)
    compiled = program.plan(options=tvlang.Options(kernels="compiled"))
    eager = program.plan(options=tvlang.Options(kernels="eager"))
    assert [t.passes for t in compiled.tasks] == [2]
    assert compiled.tasks[0].chunk == MAX_CHUNK > PROGRAM_CHUNK == eager.tasks[0].chunk
    assert f"2 chunks of {MAX_CHUNK:,}, 2 passes" in program.explain(
        options=tvlang.Options(kernels="compiled")
    )
    assert f"8 chunks of {PROGRAM_CHUNK:,}, 2 passes" in program.explain(
        options=tvlang.Options(kernels="eager")
    )
    _assert_same_bits(*_both("base + ties(m1 - base, m2 - base, density=0.5)", states))


def test_tensors_of_one_shape_share_a_kernel_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan's tasks with the same writes, program and input dtypes share one kernel, its spec
    built once; a task whose weights differ gets its own, and the bits stay the eager path's."""
    from tvlang.backends import compiled

    built = []
    monkeypatch.setattr(compiled, "task_spec", lambda *a: built.append(a) or task_spec(*a))
    b = _states(torch.bfloat16)
    src = 'base + (0.5 - matches("t1")) * (m1 - base)'  # 0.5 for every tensor but t1: -0.5
    plan = tvlang.compile(src, bindings=b).plan()
    kernels = compiled.prepare_kernels(plan)
    by_name = {task.name: kernels.task(task) for task in plan.tasks}
    assert by_name["t0"] is by_name["t2"] is by_name["t3"]
    assert by_name["t1"] is not by_name["t0"]
    assert len(built) == 2
    _assert_same_bits(*_both(src, b))
