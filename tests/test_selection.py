"""The k-th largest value of a tensor: the sampled selection (one pass when its bracket holds the
answer, radix rounds when it does not) against a sorted float64 reference, the compiled bracket
count against numpy's, and the pass that repeats through the CLI."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tvlang import cli
from tvlang.backends import compiled
from tvlang.backends.reductions import (
    SAMPLE_MIN,
    SAMPLE_RUN,
    SampledKth,
    key_array,
    key_to_float,
    order_at,
    sample_positions,
)
from tvlang.codegen import c
from tvlang.io import endpoints
from tvlang.io.checkpoint import Checkpoint

BITS = {np.float32: 32, np.float64: 64}


def _reference(x: np.ndarray, k: float) -> float:
    """The k-th largest in the order of the keys (NaN above +inf, -0.0 below +0.0), by sorting."""
    n = x.size
    k_int = math.floor(k) if math.isfinite(k) else (0 if k < 0 else n + 1)
    if k_int < 1:
        return math.inf
    if k_int > n:
        return -math.inf
    keys = np.sort(key_array(x))[::-1]
    return key_to_float(int(keys[k_int - 1]), BITS[x.dtype.type])


def _select(
    x: np.ndarray,
    k: float,
    chunk: int,
    bracket: Callable[..., None] | None,
    sample: np.ndarray | None = None,
) -> tuple[float, int]:
    """The sampled selection fed as the runtime feeds it: (the result, the passes it took)."""
    sel = SampledKth(k, x.size, "F64" if x.dtype == np.float64 else "F32", bracket, c.radix_histogram())
    if sample is not None:
        sel.sample(sample)
    passes = 0
    while not sel.done:
        for lo in range(0, x.size, chunk):
            sel.add(x[lo : lo + chunk], lo, sel.round)
        sel.end_round()
        passes += 1
    return sel.result(), passes


def _cases(dtype: type) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    n = 40_000
    normal = rng.standard_normal(n).astype(dtype)
    rows = (np.abs(rng.standard_normal((200, n // 200))) * rng.uniform(0.05, 5, (200, 1))).astype(dtype)
    quantised = (np.round(np.abs(normal) * 8) / 8).astype(dtype)  # few distinct values: ties, as bf16 gives
    specials = normal.copy()
    specials[:50] = 0.0
    specials[50:100] = -0.0
    specials[100:103] = [np.inf, -np.inf, np.nan]
    specials[103] = -np.nan
    return {
        "normal": normal,
        "rows differ in scale": rows.ravel(),
        "ties": quantised,
        "zeros": np.zeros(n, dtype),
        "mostly zeros": np.where(rng.uniform(size=n) < 0.7, 0, normal).astype(dtype),
        "specials": specials,
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sampled_selection_is_the_sorted_answer(dtype: type) -> None:
    bracket = c.bracket_count()
    for name, x in _cases(dtype).items():
        n = x.size
        for k in (0, 1, 2.5, 7, n // 3, n // 2, n - 1, n, n + 1, math.inf, -math.inf):
            want = _reference(x, k)
            for chunk, counter in ((n, bracket), (4096, bracket), (5000, None)):
                got, _ = _select(x, k, chunk, counter)
                assert got == want or (math.isnan(got) and math.isnan(want)), (name, k, chunk)
                assert math.copysign(1, got) == math.copysign(1, want), (name, k, "sign of zero")


def test_a_gathered_sample_brackets_in_one_pass_and_a_misleading_one_falls_back() -> None:
    rng = np.random.default_rng(2)
    x = (np.abs(rng.standard_normal(200_000)) * rng.uniform(0.1, 3, (200_000 // 500, 1)).repeat(500)).astype(
        np.float32
    )
    k = x.size // 2
    good = np.take(x, sample_positions(x.size))
    assert _select(x, k, 16_384, c.bracket_count(), good) == (_reference(x, k), 1)
    misleading = good * 10  # a bracket far above the answer: radix rounds (2 for float32) follow
    assert _select(x, k, 16_384, c.bracket_count(), misleading) == (_reference(x, k), 3)


def test_the_bracket_comes_from_the_sample_alone_not_the_first_chunk() -> None:
    """A tensor whose first chunk is unlike the rest (the first rows of an embedding): the sample
    spread over the tensor brackets the answer, and the first chunk must not pull it away."""
    rng = np.random.default_rng(8)
    x = np.abs(rng.standard_normal(400_000)).astype(np.float32)
    x[:16_384] *= 100
    k = x.size // 2
    assert _select(x, k, 16_384, c.bracket_count(), np.take(x, sample_positions(x.size))) == (
        _reference(x, k),
        1,
    )


def test_a_bracket_that_holds_too_many_keys_falls_back_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(4).standard_normal(100_000).astype(np.float32)
    sel = SampledKth(50_000, x.size, "F32", c.bracket_count(), c.radix_histogram())
    sel.sample(x[::5])
    sel.add(x[:10], 0, 0)  # fixes the bracket from the sample
    assert sel.stash is not None
    sel.stash = sel.stash[:16]  # room for far fewer keys than the bracket holds
    sel.add(x[10:], 10, 0)
    sel.end_round()
    assert not sel.done and sel.radix is not None
    while not sel.done:
        sel.add(x, 0, sel.round)
        sel.end_round()
    assert sel.result() == _reference(x, 50_000)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("portable", [False, True])
def test_compiled_bracket_counts_and_keeps_like_numpy(dtype: type, portable: bool) -> None:
    """Both C paths (AVX-512 where the machine has it, and the plain one) against numpy: the four
    counts, the kept keys in element order, and the count past a full stash; for a bracket inside
    the keys and for the edges of its inside test (lo = hi, hi = lo + 1, the whole key range)."""
    x = _cases(dtype)["specials"][:39_997]  # not a multiple of the vector width
    keys = np.sort(key_array(x))
    top = 2 ** BITS[dtype] - 1
    k = int(keys[20_000])
    brackets = [
        (int(keys[15_000]), int(keys[16_000])),
        (k, k),
        (k, k + 1),
        (k - 1, k + 1),
        (0, top),
        (top, top),
    ]
    unsigned = np.uint64 if dtype == np.float64 else np.uint32
    count = c.BracketCount(portable=portable)
    for lo, hi in brackets:
        want_inside = key_array(x)[(key_array(x) > lo) & (key_array(x) < hi)]
        want = [
            int((key_array(x) > hi).sum()),
            int((key_array(x) == hi).sum()),
            want_inside.size,
            int((key_array(x) == lo).sum()),
        ]
        for cap in (x.size, 100):
            stash, counts = np.zeros(cap, unsigned), np.zeros(4, np.int64)
            for start in range(0, x.size, 7_001):
                count(np.ascontiguousarray(x[start : start + 7_001]), lo, hi, stash, counts)
            assert counts.tolist() == want, (lo, hi)
            if cap >= want_inside.size:
                assert (stash[: want_inside.size] == want_inside).all()


def test_sample_positions_spread_over_the_tensor() -> None:
    n = 10_000_000
    p = sample_positions(n)
    assert p.size >= SAMPLE_MIN and (np.diff(p) > 0).all() and p[-1] < n
    rows = np.unique(p // 4096)  # every row of a 4096-column matrix is sampled
    assert rows.size == n // 4096 + (n % 4096 > 0) or rows.size > 0.99 * (n / 4096)
    columns = np.bincount(p % 4096, minlength=4096)
    assert (columns > 0).mean() > 0.9  # and the columns, not a few repeated ones
    assert sample_positions(1000).tolist() == list(range(1000))
    runs = p.reshape(-1, SAMPLE_RUN)  # whole runs of neighbours, each at a multiple of the run
    assert (runs[:, 0] % SAMPLE_RUN == 0).all() and (runs - runs[:, :1] == np.arange(SAMPLE_RUN)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_a_checkpoint_gathers_runs_as_the_elements_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The gather by runs (one item per run, a window at a time for a large tensor) takes the same
    elements as a take of the whole tensor, whatever the tensor's size: whole runs, strata that
    meet (20 000 elements), a tensor sampled whole that is no multiple of the run, the last window
    cut short, an empty tensor; and scattered positions gathered one by one (``run`` 1) the same
    way."""
    monkeypatch.setattr(endpoints, "KEEP_GATHERED", 4096)  # bytes: every tensor here by windows
    g = torch.Generator().manual_seed(3)
    sizes = {"large": 1_000_003, "met": 20_000, "whole": 1_001, "tiny": 3, "empty": 0}
    state = {name: torch.randn(n, generator=g).to(dtype) for name, n in sizes.items()}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    source = endpoints.CheckpointSource(Checkpoint.open(path))
    try:
        for name, n in sizes.items():
            full = state[name].view(bits).numpy()
            for positions, run in ((sample_positions(n), SAMPLE_RUN), (np.arange(0, n, 7), 1)):
                got = source.gather(name, positions, run)
                assert got is not None
                assert got.tobytes() == full[positions].tobytes(), name
    finally:
        source.close()


def _family(tmp: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """A base and three fine-tunes whose rows differ in scale (bf16: the ties of bf16 deltas;
    float32: selections over float64 keys)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(600, 1, generator=g) * 3 + 0.05
    base = {"w": torch.randn(600, 700, generator=g).to(dtype), "b": torch.randn(700, generator=g).to(dtype)}
    paths = {}
    for i, name in enumerate(("base", "m1", "m2", "m3")):
        state = base if i == 0 else {
            "w": (base["w"].float() + 0.01 * scale * torch.randn(600, 700, generator=g)).to(dtype),
            "b": (base["b"].float() + 0.01 * torch.randn(700, generator=g)).to(dtype),
        }  # fmt: skip
        paths[name] = str(tmp / f"{name}.safetensors")
        save_file(state, paths[name])
    return paths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_through_the_cli_is_the_same_when_every_bracket_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Brackets that hold no answer (moved above every key): every selection then repeats its pass
    for the radix rounds, and the output bits do not change."""
    paths = _family(tmp_path, dtype)
    expr = "base + ties(m1 - base, m2 - base, m3 - base, density=0.4)"
    binds = [f"--bind={k}={v}" for k, v in paths.items()]

    def run(out: str, *extra: str) -> dict[str, torch.Tensor]:
        assert (
            cli.main(["eval", expr, *binds, "-o", str(tmp_path / out), "-q", "--chunk", "65536", *extra]) == 0
        )
        return load_file(str(tmp_path / out))

    fused: list[bool] = []
    run_bracketed = compiled.Kernels.run_bracketed

    def counted(self: compiled.Kernels, *args: Any, **kwargs: Any) -> bool:
        fused.append(run_bracketed(self, *args, **kwargs))
        return fused[-1]

    monkeypatch.setattr(compiled.Kernels, "run_bracketed", counted)
    sampled = run("sampled.safetensors")
    assert fused and all(fused)  # the pass's kernel counted its operands block by block
    monkeypatch.setattr(compiled.Kernels, "run_bracketed", lambda *a, **k: False)
    unfused = run("unfused.safetensors")  # the operands stored, then counted
    monkeypatch.undo()
    eager = run("eager.safetensors", "--kernels", "eager")
    passes: list[int] = []
    end_round = SampledKth.end_round

    def counting(self: SampledKth) -> None:
        end_round(self)
        if self.done:
            passes.append(self.round)

    fix_bracket = SampledKth._fix_bracket

    def above_everything(self: SampledKth) -> None:
        fix_bracket(self)
        self.lo = self.hi = (1 << self.bits) - 1

    monkeypatch.setattr(SampledKth, "end_round", counting)
    monkeypatch.setattr(SampledKth, "_fix_bracket", above_everything)
    missed = run("missed.safetensors")
    assert max(passes) == (3 if dtype == torch.bfloat16 else 5)  # the bracket pass, then the radix rounds
    for name in sampled:
        assert torch.equal(sampled[name], eager[name]) and torch.equal(sampled[name], missed[name])
        assert torch.equal(sampled[name], unfused[name])
    monkeypatch.undo()
    passes.clear()
    monkeypatch.setattr(SampledKth, "end_round", counting)
    run("again.safetensors")
    assert passes and max(passes) == 1  # the sampled bracket held every answer
    assert os.path.getsize(tmp_path / "again.safetensors") == os.path.getsize(
        tmp_path / "sampled.safetensors"
    )


def test_ties_matches_a_float64_reference_on_rows_of_different_scale(tmp_path: Path) -> None:
    paths = _family(tmp_path)
    out = tmp_path / "o.safetensors"
    binds = [f"--bind={k}={v}" for k, v in paths.items()]
    expr = "base + ties(m1 - base, m2 - base, m3 - base, density=0.4)"
    assert cli.main(["eval", expr, *binds, "-o", str(out), "-q", "--chunk", "65536"]) == 0
    got = load_file(str(out))["w"]
    base = load_file(paths["base"])["w"].double()
    tvs = [load_file(paths[m])["w"].double() - base for m in ("m1", "m2", "m3")]
    trimmed = []
    for t in tvs:
        k = math.floor(0.4 * t.numel())
        threshold = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    total = sum(trimmed)
    elected = torch.where(total >= 0, 1.0, -1.0)
    agree = [(torch.sign(t) == elected).double() for t in trimmed]
    count = sum(agree)
    merged = sum(t * a for t, a in zip(trimmed, agree, strict=True)) / torch.where(count == 0, 1.0, count)
    want = (base + merged).bfloat16()
    differ = got != want  # (float32 accumulation, then one rounding: the exact answer almost everywhere)
    assert differ.double().mean() < 1e-3
    assert ((got.double() - want.double()).abs()[differ] <= want.double().abs()[differ] * 2**-7).all()


@pytest.mark.parametrize(
    "keys",
    [
        np.random.default_rng(3).integers(0, 2**32, 50_001, dtype=np.uint64).astype(np.uint32),  # distinct
        np.random.default_rng(4).integers(0, 40, 50_001, dtype=np.uint32),  # repeats: sorted instead
        np.full(5, 7, dtype=np.uint32),
        np.random.default_rng(5).integers(0, 2**64 - 1, 3_000, dtype=np.uint64),
    ],
    ids=["distinct", "repeating", "all equal", "64-bit"],
)
@pytest.mark.parametrize("picks", [[0], [1, 2], [2, 1, 2], [0, 4], [4]])
def test_ordering_at_positions_matches_a_sort(keys: np.ndarray, picks: list[int]) -> None:
    """The keys a selection brackets with, and its answer, are read at positions that
    :func:`order_at` fills as a sort would, whether it selects or sorts (keys that repeat)."""
    picks = [p * (keys.size - 1) // 4 for p in picks]
    ordered = keys.copy()
    order_at(ordered, picks)
    expected = np.sort(keys)
    assert [ordered[p] for p in picks] == [expected[p] for p in picks]
    assert np.array_equal(np.sort(ordered), expected)  # a reordering, nothing lost
