"""Results against a float64 reference, and bits that do not depend on chunking or threads."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvlang
from tvlang.codegen.c import compiler
from tvlang.numerics import correctly_rounded, ulp_error

from .conftest import MISSION, NAMES, family


def _load(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _bindings(paths: dict[str, str]) -> dict[str, object]:
    return {"base": paths["base"], **{n: tvlang.task_vector(paths[n]) for n in NAMES[1:]}}


def _reference(paths: dict[str, str]) -> dict[str, torch.Tensor]:
    s = {n: _load(p) for n, p in paths.items()}
    ref = {}
    for name, b in s["base"].items():
        b = b.double()
        tau = {n: s[n][name].double() - b for n in NAMES[1:]}
        ref[name] = b + 0.4 * (tau["amazon_sent"] - tau["amazon_lm"] + tau["yelp_lm"]) - tau["toxic"]
    return ref


def _assert_within_one_rounding(result: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    errors = torch.cat([ulp_error(result[n], ref[n]).reshape(-1) for n in ref])
    assert errors.max().item() < 1.0, f"worst error {errors.max().item()} ulp"
    # Accumulating wider and rounding once gives the correctly rounded value almost everywhere.
    assert (errors <= 0.5 + 1e-9).double().mean().item() > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mission_within_one_rounding(
    dtype: torch.dtype, tmp_path_factory: pytest.TempPathFactory, tmp_path
) -> None:
    paths = family(tmp_path_factory, dtype, "file")
    out = str(tmp_path / "merged.safetensors")
    tvlang.evaluate(MISSION, _bindings(paths), out=out)
    result = load_file(out)
    assert all(t.dtype == dtype for t in result.values())
    _assert_within_one_rounding(result, _reference(paths))


def test_sharded_inputs_and_outputs(bf16_sharded: dict[str, str], tmp_path) -> None:
    out = str(tmp_path / "merged")
    tvlang.evaluate(MISSION, _bindings(bf16_sharded), out=out, shard_size=20_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    assert sum(f.startswith("model-") for f in files) > 1
    _assert_within_one_rounding(_load(out), _reference(bf16_sharded))


def test_same_bits_across_chunks_threads_and_memory(bf16_files: dict[str, str]) -> None:
    runs = [
        tvlang.evaluate(MISSION, _bindings(bf16_files), chunk=chunk, threads=threads)
        for chunk, threads in ((None, 1), (1000, 2), (4097, 1), (7, 2))
    ]
    first = runs[0]
    for other in runs[1:]:
        for name, t in first.items():
            assert torch.equal(t.view(torch.int16), other[name].view(torch.int16)), name


def test_dtype_override_and_integer_passthrough(tmp_path) -> None:
    base = {
        "w": torch.randn(300, dtype=torch.float64).to(torch.bfloat16),
        "ids": torch.arange(5),
        "m": torch.ones(3, dtype=torch.bool),
    }
    ft = {
        "w": (base["w"].double() + 0.01).to(torch.bfloat16),
        "ids": torch.arange(5) * 7,
        "m": torch.zeros(3, dtype=torch.bool),
    }
    out = tvlang.evaluate("base + 0.5*(ft - base)", {"base": base, "ft": ft}, dtype="fp32")
    assert out["w"].dtype == torch.float32
    exact = base["w"].double() + 0.5 * (ft["w"].double() - base["w"].double())
    assert ulp_error(out["w"], exact).max().item() <= 0.5
    assert torch.equal(out["ids"], base["ids"]) and torch.equal(out["m"], base["m"])


def test_many_outputs_in_one_pass_equal_separate_runs(bf16_files: dict[str, str]) -> None:
    src = "\n".join(
        f"output lam{i} = base + {lam}*(amazon_sent + yelp_lm)" for i, lam in enumerate((0.1, 0.5, 0.9))
    )
    prog = tvlang.compile(src, bindings=_bindings(bf16_files))
    plan = prog.plan()
    assert len(plan.outputs) == 3 and all(len(t.writes) == 3 for t in plan.tasks)
    together = prog.run()
    alone = tvlang.evaluate("base + 0.5*(amazon_sent + yelp_lm)", _bindings(bf16_files))
    for name, t in alone.items():
        assert torch.equal(t, together["lam1"][name])


def test_fp32_accumulates_in_float64(tmp_path) -> None:
    # 1 + 1e-8 - 1 is lost in float32 arithmetic but not in float64.
    a = {"w": torch.tensor([1.0], dtype=torch.float32)}
    b = {"w": torch.tensor([1e-8], dtype=torch.float32)}
    out = tvlang.evaluate("a + 1e6*(b - z)", {"a": a, "b": b, "z": {"w": torch.zeros(1)}})
    assert out["w"].item() == pytest.approx(1.01, rel=1e-7)


def test_empty_and_scalar_tensors(tmp_path) -> None:
    a = {"e": torch.zeros(0, 4), "s": torch.tensor(2.0)}
    b = {"e": torch.zeros(0, 4), "s": torch.tensor(4.0)}
    path = str(tmp_path / "a.safetensors")
    save_file(a, path)
    out = tvlang.evaluate("0.5*a + 0.5*b", {"a": path, "b": b})
    assert out["e"].shape == (0, 4) and out["s"].item() == 3.0


def test_fp8_inputs_compute_in_float32(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4096, generator=g).to(torch.float8_e4m3fn)}
    b = {"w": torch.randn(4096, generator=g).to(torch.float8_e5m2)}
    path = str(tmp_path / "a.safetensors")
    save_file(a, path)  # read back through the safetensors reader (F8_E4M3)
    # dyadic weights: every product and sum is exact in float32, so one rounding is all there is
    out = tvlang.evaluate("0.25*a + 0.75*b", {"a": path, "b": b}, dtype="bf16")
    exact = 0.25 * a["w"].double() + 0.75 * b["w"].double()
    assert ulp_error(out["w"], exact).max().item() <= 0.5
    # the output follows its anchor's dtype: the model with the largest weight when none is a base
    assert tvlang.evaluate("0.7*a + 0.3*b", {"a": a, "b": b})["w"].dtype == torch.float8_e4m3fn
    assert tvlang.evaluate("0.3*a + 0.7*b", {"a": a, "b": b})["w"].dtype == torch.float8_e5m2


# -- fine-tune-like inputs: the anchored sum is correctly rounded almost everywhere ----------------

ANCHORED = [
    # the merge: the base's own weight folds to 0.1, the others are not dyadic
    "base + 0.5*(ft1 - base) - 0.3*(ft2 - base) + 0.7*(ft3 - base)",
    # thirds: the base's weight folds to zero, so it is never read (ft1 is the anchor)
    "base + (1/3)*(ft1 - base) + (1/3)*(ft2 - base) + (1/3)*(ft3 - base)",
    # a soup with no base: the largest weight is the anchor
    "0.3*ft1 + 0.7*ft2",
    # a non-zero (negative) base coefficient
    "base + 0.7*(ft1 - base) + 0.7*(ft2 - base)",
    # a task vector: cancels to a few ulps of the models, rounded relative to itself
    "0.3*(ft1 - base) + 0.7*(ft2 - base)",
]
FINE_TUNE_SIZE = 1 << 16


def _fine_tunes(dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """A base and three fine-tunes a few ulps of ``dtype`` away from it (some elements unchanged)."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(FINE_TUNE_SIZE, generator=g, dtype=torch.float64) * 0.02
    ulps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    out = {"base": {"w": base.to(dtype)}}
    for i in (1, 2, 3):
        shift = torch.randint(-4, 5, (FINE_TUNE_SIZE,), generator=g, dtype=torch.float64)
        out[f"ft{i}"] = {"w": (base * (1 + shift * ulps)).to(dtype)}
    return out


def _exact(src: str, states: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """The formula in float64: on the differences from the base (exact here), plus the base times
    the weights' sum (each formula is affine: 1 for a model, 0 for a task vector)."""
    b = states["base"]["w"].double()
    deltas = {n: s["w"].double() - b for n, s in states.items()}
    scope: dict[str, object] = {"__builtins__": {}}
    mass = round(eval(src, scope, dict.fromkeys(states, 1.0)))  # test-only oracle over numbers
    result = eval(src, scope, deltas) + mass * b  # and over float64 tensors
    assert isinstance(result, torch.Tensor)
    return result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("src", ANCHORED)
def test_fine_tune_merges_correctly_rounded(src: str, dtype: torch.dtype) -> None:
    states = _fine_tunes(dtype)
    out = tvlang.evaluate(src, states, kernels="eager")["w"]
    assert out.dtype == dtype
    exact = _exact(src, states)
    errors = ulp_error(out, exact)
    assert errors.max().item() <= 1.0, f"worst error {errors.max().item()} ulp"
    share = correctly_rounded(out, exact).double().mean().item()
    assert share >= 0.9999, f"{share:.4%} correctly rounded"
    if compiler() is not None:  # the fused C loop forms the same differences: the same bits
        compiled = tvlang.evaluate(src, states, kernels="compiled")["w"]
        assert torch.equal(compiled.view(torch.uint8), out.view(torch.uint8))
