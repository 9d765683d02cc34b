"""The op table (tvlang.ops): one entry per function, read by the builtins, the constant folder, the
eager path and both kernel generators; the functions added through it (nan_to_num), the C kernels
of whole rows (rowrank, rowsum, rowmax: DELLA runs compiled) and float8 inputs decoded in C."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tvlang
from tvlang.codegen import c
from tvlang.codegen.spec import computes
from tvlang.dtypes import DTYPES
from tvlang.lowering.builtins import BUILTINS
from tvlang.ops import COMPARISONS, ELEMENTWISE, KIND_RULES, REDUCTIONS, ROW_FUNCTIONS

needs_cc = pytest.mark.skipif(c.compiler() is None, reason="no C compiler here: compiled kernels are off")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{k}: {int((_bits(a[k]) != _bits(b[k])).sum())} differ"


class _Spy:
    """Counts the compiled kernel calls (and those of kernels of whole rows) while it is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[bool, int]] = []
        call = c.CKernel.__call__

        def spy(kernel: c.CKernel, *args: Any, **kw: Any) -> int:
            result = call(kernel, *args, **kw)
            self.calls.append((c.has_rows(kernel.spec), result))
            return result

        monkeypatch.setattr(c.CKernel, "__call__", spy)

    @property
    def rows(self) -> int:
        assert all(r >= 0 for _, r in self.calls), "a kernel refused its chunk"
        return sum(1 for rows, _ in self.calls if rows)


# -- the table --------------------------------------------------------------------------------------


def test_every_entry_is_complete_and_read_by_every_layer() -> None:
    args = ["a0", "a1", "a2", "a3"]
    for name, op in ELEMENTWISE.items():
        assert op.kind in KIND_RULES and len(op.parameters) == op.arity, name
        if op.operator is None:  # a function users call: its builtin is the entry's
            b = BUILTINS[name]
            assert b.summary == op.summary and [(p.name, p.kind) for p in b.params] == list(op.parameters)
        else:
            assert COMPARISONS[op.operator] == name and name not in BUILTINS
        if op.c is not None:
            assert op.c.format(*args[: op.arity], t="float", f="f").count("a0") >= 1
            assert computes("c", name)
        if op.triton is not None:
            assert op.triton.format(*args[: op.arity], T="tl.float32").count("a0") >= 1
            assert computes("triton", name)
    assert {"rowrank", "rowsum", "rowmax"} == ROW_FUNCTIONS
    assert all(computes("c", f) and not computes("triton", f) for f in ROW_FUNCTIONS)
    assert not computes("c", "colsum") and {"sum", "dot", "kth"} <= set(REDUCTIONS)


def test_the_table_imports_no_torch_at_module_level() -> None:
    """The compiled hot path reads the table without importing torch: the chunk functions import it."""
    tree = ast.parse(Path(tvlang.ops.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names


# -- nan_to_num: the worked example of docs/extending.md ---------------------------------------------

SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, 1.5, -2.5, 3e38, -3e38]


def _specials(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(SPECIALS * 4), torch.randn(5000, generator=g)])
    return {"w": x.to(dtype), "m": x[:60].reshape(6, 10).to(dtype)}


def _reference(x: torch.Tensor, nan: float, posinf: float, neginf: float) -> torch.Tensor:
    """float64, element by element, rounded once to the output dtype."""
    values = [
        nan if math.isnan(v) else posinf if v == math.inf else neginf if v == -math.inf else v
        for v in x.double().reshape(-1).tolist()
    ]
    return torch.tensor(values, dtype=torch.float64).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_to_num_against_float64_and_compiled_equals_eager(dtype: torch.dtype) -> None:
    d = _specials(dtype)
    src = "nan_to_num(d, 0.25, 7, -3)"
    eager = tvlang.evaluate(src, {"d": tvlang.delta(d)}, kernels="eager", nonfinite="propagate")
    for k, x in d.items():
        assert torch.equal(_bits(eager[k]), _bits(_reference(x, 0.25, 7.0, -3.0)))
    if c.compiler() is not None:
        compiled = tvlang.evaluate(src, {"d": tvlang.delta(d)}, kernels="compiled", nonfinite="propagate")
        _same_bits(eager, compiled)


def test_nan_to_num_folds_constants_and_checks_its_arguments() -> None:
    fold = ELEMENTWISE["nan_to_num"].scalar
    assert [fold(x, 2.0, 3.0, 4.0) for x in (math.nan, math.inf, -math.inf, -0.5)] == [2.0, 3.0, 4.0, -0.5]
    out = tvlang.evaluate("nan_to_num(2.5, 0, 1, -1) * d", {"d": tvlang.delta({"w": torch.ones(3)})})
    assert torch.equal(out["w"], torch.full((3,), 2.5))
    with pytest.raises(tvlang.TvError) as e:
        tvlang.evaluate("nan_to_num(a, 0, 1, -1)", {"a": {"w": torch.ones(3)}})
    assert "task vectors" in str(e.value)
    with pytest.raises(tvlang.TvError):
        tvlang.evaluate("nan_to_num(d, d, 1, -1)", {"d": tvlang.delta({"w": torch.ones(3)})})


def test_nearswap_is_mergekits_formula_through_nan_to_num() -> None:
    """nearswap lowers to mergekit's own lines: clamp(nan_to_num(t / |m - base|, 1, 1, 1), 0, 1)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, generator=g)
    m = base + 0.01 * torch.randn(400, generator=g)
    m[:50] = base[:50]  # equal elements: t/0 = inf, replaced by 1
    out = tvlang.evaluate("nearswap(base, m, 0.005)", {"base": {"w": base}, "m": {"w": m}})["w"]
    b64, m64 = base.double(), m.double()
    weight = torch.nan_to_num(0.005 / (m64 - b64).abs(), nan=1.0, posinf=1.0, neginf=1.0).clamp(0, 1)
    reference = (b64 + weight * (m64 - b64)).float()
    assert torch.equal(out, reference)


# -- functions of whole rows on the C kernels ---------------------------------------------------------


def _row_states(dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    shapes = {"w": (40, 300), "v": (5000,), "x": (7, 3, 5), "one": (33, 1)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["w"][3, 7:40] = 0.0  # ties, ±0
    base["w"][5, 9:20] = 1.0
    out = {"base": {k: v.to(dtype) for k, v in base.items()}}
    for j in (1, 2):
        m = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        m["w"][3, 7:30] = 0.0
        m["w"][5, 9:20] = 1.0
        m["w"][6, 3:9] = -0.0
        out[f"m{j}"] = {k: v.to(dtype) for k, v in m.items()}
    return out


ROW_PROGRAMS = [
    'base + della(m1 - base, 0.5, 0.3, seed=2, rescale="l1")',
    'base + della(m1 - base, 0.4, 0.1, seed=3, rescale="inverse")',
    "base + 0.001*rowsum(m1 - base) + 0.01*rowmax(m2 - base) + 0.01*rowrank(rowsum(m1 - base)*(m2 - base))",
    "base + 0.01*rowrank(m1 - base) + 0.01*rowrank(rowmax(m1 - base)*(m2 - base))",
    'model_stock(base, m1, m2, per="row")',
]


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("src", ROW_PROGRAMS)
def test_row_functions_compiled_equal_eager(
    src: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _row_states(dtype)
    for chunk in (None, 4096 * 3):
        kw: dict[str, Any] = {"nonfinite": "propagate", **({"chunk": chunk} if chunk else {})}
        eager = tvlang.evaluate(src, s, kernels="eager", **kw)
        spy = _Spy(monkeypatch)
        compiled = tvlang.evaluate(src, s, kernels="compiled", **kw)
        assert spy.rows > 0, "no kernel of whole rows ran"
        _same_bits(eager, compiled)
        monkeypatch.undo()


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_functions_of_special_values_compiled_equal_eager(dtype: torch.dtype) -> None:
    """NaN (any sign or payload: rowmax gives torch.amax's canonical NaN), ±inf, ±0 and ties."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (20, 64), generator=g).float() * 0.5
    x[0, :5] = torch.tensor([math.nan, -0.0, 0.0, math.nan, -math.inf])
    x[1, 10], x[3, :], x[3, 5], x[4, 7] = math.nan, -0.0, 0.0, math.inf
    x.view(torch.int32)[2, 63] = -0x3FFFFF  # 0xFFC00001: a negative NaN with a payload
    assert math.isnan(x[2, 63])
    bindings = {"d": tvlang.delta({"w": x.to(dtype)})}
    for src in ["rowrank(d)", "rowmax(d)", "rowsum(d)", "rowmax(d) + rowrank(d) * rowsum(d)"]:
        eager = tvlang.evaluate(src, bindings, kernels="eager", nonfinite="propagate")
        _same_bits(eager, tvlang.evaluate(src, bindings, kernels="compiled", nonfinite="propagate"))


@needs_cc
def test_row_ranks_against_a_stable_float64_reference() -> None:
    """rowrank: each element's position in its row sorted stably (NaN last, -0 = +0), over n - 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (20, 64), generator=g).float() * 0.5  # many ties
    x[0, :5] = torch.tensor([math.nan, -0.0, 0.0, math.nan, -math.inf])
    out = tvlang.evaluate(
        "rowrank(d)", {"d": tvlang.delta({"w": x})}, kernels="compiled", nonfinite="propagate"
    )
    a = x.double().numpy()
    keys = np.where(np.isnan(a), np.inf, a) + 0.0  # NaN above +inf below: ranks by (value, position)
    nan_last = np.isnan(a).astype(np.int64)
    ref = np.empty_like(a)
    for r in range(a.shape[0]):
        order = np.lexsort((np.arange(a.shape[1]), keys[r], nan_last[r]))
        ref[r, order] = np.arange(a.shape[1]) / (a.shape[1] - 1)
    assert torch.equal(out["w"], torch.from_numpy(ref).float())


# -- float8 inputs on the C kernels --------------------------------------------------------------------


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2"])
def test_float8_decoding_table_is_torchs_widening(code: str) -> None:
    table = torch.tensor([c.float8_bits(code, b) for b in range(256)], dtype=torch.int64)
    widened = torch.arange(256, dtype=torch.uint8).view(getattr(torch, DTYPES[code].torch)).float()
    assert torch.equal(table, widened.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)


@needs_cc
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_inputs_run_compiled_equal_eager_and_float64(
    fp8: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(5)
    base = {
        "w": torch.randn(300, 7, generator=g).to(fp8),
        "b": torch.arange(256, dtype=torch.uint8).view(fp8),
    }
    m1 = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(fp8) for k, v in base.items()}
    bindings = {"base": base, "m1": m1}
    src = "base + 0.75*(m1 - base)"
    for dtype in ("bf16", "fp32"):
        eager = tvlang.evaluate(src, bindings, kernels="eager", dtype=dtype, nonfinite="propagate")
        spy = _Spy(monkeypatch)
        compiled = tvlang.evaluate(src, bindings, kernels="compiled", dtype=dtype, nonfinite="propagate")
        assert spy.calls and all(r >= 0 for _, r in spy.calls), "the float8 task did not run compiled"
        monkeypatch.undo()
        _same_bits(eager, compiled)
        for k in base:
            b64, m64 = base[k].double(), m1[k].double()
            ref = b64 + 0.75 * (m64 - b64)
            got = compiled[k].double()
            finite = torch.isfinite(ref)
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            rel = 2.0**-8 if dtype == "bf16" else 2.0**-23  # the output's rounding, and float32 sums
            bound = rel * ref.abs() + 2.0**-22 * (b64.abs() + m64.abs())
            assert bool(((got - ref).abs() <= bound)[finite].all())
