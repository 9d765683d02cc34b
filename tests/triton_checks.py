"""Checks of the GPU backend against the CPU backend on the same plans.

Run as a script (``python tests/triton_checks.py [--device interpret|cuda] [names]``) it prints one
JSON object: each check's result or its error.  tests/test_triton.py runs it once in a subprocess,
because ``TRITON_INTERPRET=1`` must be set before triton is imported; benchmarks/gpu_check.py runs
it with ``--device cuda`` on a GPU.

Under the interpreter every output must be bit-identical to the CPU backend's.  On a GPU, results
that depend on a float64 reduction (norms, dot products, sums: slerp, nuslerp, model_stock, L1
rescaling) may differ by one ulp of the output, because the GPU adds each 4096-element block in a
different order than the CPU (a float64 rounding that can move a bf16/fp32 result by one ulp);
everything else (linear merges, masks, k-th largest selections, counts) stays bit-identical.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

DEVICE = "interpret"
BLOCK = 4096  # the interpreter's BLOCK_SIZE (tvlang.codegen.triton.INTERPRETER_BLOCK)
CHECKS: dict[str, Callable[[], dict[str, Any]]] = {}
LAUNCHES = [0]
CHUNKS: list[tuple[int, int]] = []  # (start, elements) of every launch, in order


def check(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    CHECKS[fn.__name__] = fn
    return fn


# -- helpers --------------------------------------------------------------------------------------


def states(
    seed: int, n: int, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype = torch.bfloat16
) -> list[dict[str, torch.Tensor]]:
    """A base and n-1 fine-tunes of it (small deltas, as real fine-tunes)."""
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    out = [{k: v.to(dtype) for k, v in base.items()}]
    for _ in range(n - 1):
        out.append({k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()})
    return out


def bind(s: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    return {"base": s[0], **{f"m{i}": x for i, x in enumerate(s[1:], 1)}}


SHAPES = ((37, 11), (53,), (1,), (BLOCK - 1,), (BLOCK + 1,), (3, 4, 5))


def ulps(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(elements whose bits differ, largest distance in ulps); NaN equals NaN whatever its payload."""
    if not a.is_floating_point():
        return int((a != b).sum()), 0
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    both_nan = torch.isnan(a) & torch.isnan(b)
    ia, ib = a.view(ints).to(torch.int64), b.view(ints).to(torch.int64)
    differ = int(((ia != ib) & ~both_nan).sum())
    top = 1 << (8 * a.element_size() - 1)

    def ordered(i: torch.Tensor) -> torch.Tensor:  # sign-magnitude bits → a line of integers
        return torch.where(i < 0, -(i + top) if a.element_size() < 8 else -(i & (top - 1)), i)

    dist = (ordered(ia) - ordered(ib)).abs().masked_fill(both_nan, 0)
    return differ, int(dist.max()) if dist.numel() else 0


def compare(cpu: Any, gpu: Any, max_ulps: int = 0) -> dict[str, Any]:
    """Every tensor of every output: same names, shapes and dtypes, bits equal (or within max_ulps)."""
    if isinstance(cpu, torch.Tensor) or (
        isinstance(cpu, dict) and all(isinstance(v, torch.Tensor) for v in cpu.values())
    ):
        cpu, gpu = {"out": cpu}, {"out": gpu}
    differing, worst, elements = 0, 0, 0
    for name, sd in cpu.items():
        assert sd.keys() == gpu[name].keys(), (name, sd.keys(), gpu[name].keys())
        for k, a in sd.items():
            b = gpu[name][k]
            assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
            d, u = ulps(a.reshape(-1), b.reshape(-1))
            differing, worst, elements = differing + d, max(worst, u), elements + a.numel()
    assert worst <= max_ulps, f"{differing} of {elements} elements differ, by up to {worst} ulps"
    return {"elements": elements, "differing": differing, "worst_ulps": worst}


def both(expr: str, bindings: dict[str, Any], max_ulps: int = 0, **options: Any) -> dict[str, Any]:
    """The expression on the CPU backend and on the GPU backend, compared."""
    import tvlang

    cpu = tvlang.evaluate(expr, bindings=bindings, device="cpu", **options)
    before = LAUNCHES[0]
    gpu = tvlang.evaluate(expr, bindings=bindings, device="cuda", **options)
    result = compare(cpu, gpu, max_ulps)
    result["launches"] = LAUNCHES[0] - before
    return result


def on_gpu(reduction_sums: bool) -> int:
    """Ulps allowed: 0, except 1 on a real GPU for outputs that depend on float64 reduction sums."""
    return 1 if reduction_sums and DEVICE == "cuda" else 0


# -- linear merges ---------------------------------------------------------------------------------


@check
def linear_bf16_ragged() -> dict[str, Any]:
    s = states(1, 5, SHAPES)
    expr = "base + 0.4*(m1 - base - m2 + m3) - 0.7*(m4 - base)"
    results = {f"chunk {c}": both(expr, bind(s), chunk=c) for c in (None, BLOCK - 1, BLOCK + 1, 1000)}
    assert all(r["launches"] > 0 for r in results.values())
    return results


@check
def plan_chunks_are_streamed() -> dict[str, Any]:
    """The plan decides the GPU's chunks (a staging slot's share of the memory budget, whole blocks):
    the executor launches exactly the plan's chunks, and the bits are the CPU backend's."""
    import tvlang
    from tvlang.plan.plan import SLOTS, gpu_bytes_per_element

    s = states(3, 3, ((20000,),))
    expr = "base + 0.4*(m1 - base) - 0.7*(m2 - base)"
    program = tvlang.compile(expr)
    probe = program.plan(bindings=bind(s), options=tvlang.Options(device="cuda"))
    per_element = gpu_bytes_per_element(probe, probe.tasks[0])
    memory = SLOTS * per_element * 2 * BLOCK + 100  # two blocks per chunk
    plan = program.plan(bindings=bind(s), options=tvlang.Options(device="cuda", memory=memory))
    chunk = plan.tasks[0].chunk
    assert plan.device in ("cuda", "interpret") and chunk == 2 * BLOCK, (plan.device, chunk)
    assert f"3 chunks of {chunk:,}" in plan.explain()
    del CHUNKS[:]
    result = both(expr, bind(s), memory=memory)
    expected = [(start, min(chunk, 20000 - start)) for start in range(0, 20000, chunk)]
    assert expected == CHUNKS, (CHUNKS, expected)
    forced = states(4, 3, ((5000,),))
    del CHUNKS[:]
    result_forced = both(expr, bind(forced), chunk=1000, memory=memory)  # the user's chunk wins
    assert [n for _, n in CHUNKS] == [1000] * 5, CHUNKS
    return {"planned": result, "forced": result_forced, "chunk": chunk}


def _passes_once(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``calls`` with every repeated run of a reduction pass (its begin … end block, the same
    again right after) kept once."""
    blocks: list[list[tuple[Any, ...]]] = []
    for call in calls:
        if call[0] == "begin" or not blocks:
            blocks.append([])
        blocks[-1].append(call)
    kept = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    return [c for b in kept for c in b]


@check
def one_loop_for_both_backends() -> dict[str, Any]:
    """Both back-ends run the executor's one loop (tvlang/executor.py): for TIES, per tensor and
    over the whole model, the GPU back-end sees the very begin / chunk / end calls the CPU back-end
    sees, in the same order (the model-wide rounds, then each tensor's reduction passes and its
    output pass; a reduction pass repeated for the device's radix rounds), and writes the same bits."""
    import tvlang
    from tvlang import runtime
    from tvlang.backends import gpu
    from tvlang.executor import OperandPass

    seen: list[tuple[Any, ...]] = []
    names = ("begin", "reduce_chunk", "output_chunk", "operand_chunk", "end")
    originals = {(cls, n): getattr(cls, n) for cls in (runtime.CpuBackend, gpu.GpuBackend) for n in names}

    def recorded(name: str, original: Any) -> Any:
        def wrapper(self: Any, p: Any, *args: Any) -> Any:
            label = ("operand", p.operand, p.round_) if isinstance(p, OperandPass) else ("pass", p.q)
            seen.append((name, p.task.name, label, *args[:2]))
            return original(self, p, *args)

        return wrapper

    for (cls, n), original in originals.items():
        setattr(cls, n, recorded(n, original))
    out: dict[str, Any] = {}
    try:
        s = states(8, 3, ((3 * BLOCK + 5,), (37, 11), (1,)))
        for expr in (
            "base + ties(m1 - base, m2 - base, density=0.4)",
            'base + ties(m1 - base, m2 - base, density=0.4, scope="model")',
        ):
            calls = {}
            for device in ("cpu", "cuda"):
                del seen[:]
                tvlang.evaluate(expr, bindings=bind(s), device=device, threads=1, chunk=BLOCK)
                calls[device] = list(seen)
            # The device selects a tensor's k-th largest values by radix rounds, so it runs each such
            # reduction pass again (float32: twice); the CPU's sampled bracket takes the pass once.
            assert _passes_once(calls["cuda"]) == calls["cpu"], (calls["cpu"][:20], calls["cuda"][:20])
            if "scope" not in expr:
                assert len(calls["cuda"]) > len(calls["cpu"])
            kinds = {c[0] for c in calls["cpu"]}
            assert {"begin", "output_chunk", "end"} <= kinds and kinds & {"reduce_chunk", "operand_chunk"}
            out[expr] = {"calls": len(calls["cpu"]), **both(expr, bind(s), chunk=BLOCK)}
    finally:
        for (cls, n), original in originals.items():
            setattr(cls, n, original)
    return out


@check
def linear_dtypes() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        s = states(2, 3, SHAPES[:3] + SHAPES[5:], dtype)
        for out_dtype in (None, "bf16", "fp16", "fp32", "fp64"):
            r = both("base + 0.3*(m1 - base) + 0.55*(m2 - base)", bind(s), dtype=out_dtype)
            out[f"{str(dtype)[6:]}→{out_dtype or 'same'}"] = r
    mixed = states(3, 3, SHAPES[:2])
    mixed[1] = {k: v.to(torch.float16) for k, v in mixed[1].items()}
    mixed[2] = {k: v.float() for k, v in mixed[2].items()}
    out["mixed bf16/fp16/fp32→bf16"] = both("base + 0.5*(m1 - base) + 0.25*(m2 - base)", bind(mixed))
    return out


@check
def linear_anchors() -> dict[str, Any]:
    """Anchored sums: a soup (the largest weight is the anchor), a task vector (the anchor's own
    coefficient is zero, but it is subtracted), a base whose weight folds to zero (never read), and
    several outputs with different anchors in one kernel (each difference formed once)."""
    import tvlang

    s = states(11, 4, SHAPES[:2] + SHAPES[4:5])
    out = {
        "soup": both("0.3*m1 + 0.7*m2", bind(s)),
        "task vector": both("0.3*(m1 - base) + 0.7*(m2 - base)", bind(s)),
        "base weight zero": both("base + 0.5*(m1 - base) + 0.5*(m2 - base)", bind(s)),
    }
    src = "output a = base + 0.3*(m1 - base)\noutput b = 0.25*m2 + 0.75*m3\noutput c = m3 - base\n"
    cpu = tvlang.compile(src, bindings=bind(s)).run(options=tvlang.Options(device="cpu"))
    before = LAUNCHES[0]
    gpu = tvlang.compile(src, bindings=bind(s)).run(options=tvlang.Options(device="cuda"))
    out["outputs with different anchors"] = {**compare(cpu, gpu), "launches": LAUNCHES[0] - before}
    return out


@check
def sweep_many_outputs() -> dict[str, Any]:
    import tvlang

    s = states(4, 3, SHAPES[:2] + SHAPES[4:5])
    src = "param lam = 0.1\noutput merged = base + lam*(m1 - base) - 0.3*lam*(m2 - base)\n"
    lams = [round(0.1 * i, 3) for i in range(12)]
    cpu = tvlang.compile(src, bindings=bind(s)).run(
        params={"lam": lams}, options=tvlang.Options(device="cpu")
    )
    before = LAUNCHES[0]
    gpu = tvlang.compile(src, bindings=bind(s)).run(
        params={"lam": lams}, options=tvlang.Options(device="cuda")
    )
    result = compare(cpu, gpu)
    assert len(cpu) == len(lams)
    result["outputs"], result["launches"] = len(cpu), LAUNCHES[0] - before
    return result


@check
def stacked_layers() -> dict[str, Any]:
    """layers()/stack(): each output tensor reads the input tensors it maps to (renamed sources)."""
    g = torch.Generator().manual_seed(11)
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.w" for i in range(4)), "lm_head.weight"]
    base = {n: torch.randn(37, 11, generator=g) for n in names}
    s = [
        {k: v.to(torch.bfloat16) for k, v in base.items()},
        {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()},
    ]
    expr = (
        "stack(layers(base, 0, 2), slerp(layers(base, 1, 3), layers(m1, 1, 3), t=gradient([0.2, 0.7])), "
        "scale(layers(m1, 3, 4), 0.5))"
    )
    return both(expr, bind(s))


@check
def integer_tensors_pass_through() -> dict[str, Any]:
    s = states(5, 2, SHAPES[:2])
    for sd in s:
        sd["ids"] = torch.arange(17, dtype=torch.int64)
    return both("base + 0.5*(m1 - base)", bind(s))


@check
def float8_inputs() -> dict[str, Any]:
    """float8 inputs are bytes that the kernels decode exactly (every float8 value is a float32),
    all 256 of each format included; a float8 output is rounded by torch, on the CPU path."""
    out = {}
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        s = states(6, 3, SHAPES[:2], torch.float32)
        s[1] = {k: v.to(fp8) for k, v in s[1].items()}
        every = torch.arange(256, dtype=torch.uint8).view(fp8)
        s[0]["all"], s[1]["all"], s[2]["all"] = torch.linspace(-1, 1, 256), every, torch.linspace(2, 3, 256)
        name = str(fp8)[6:]
        r = both("base + 0.5*(m1 - base) + 0.5*(m2 - base)", bind(s), nonfinite="propagate", dtype="fp32")
        assert r["launches"] > 0, "no Triton kernel ran"
        out[f"{name} linear"] = r
        trim = 'base + magnitude_prune(m1 - base, 0.3, scope="model")'
        out[f"{name} model-wide trim"] = both(trim, bind(s), nonfinite="propagate", dtype="bf16")
        s8 = [{k: v.to(fp8) for k, v in sd.items()} for sd in s]
        out[f"{name} output"] = both("base + 0.5*(m1 - base)", bind(s8), nonfinite="propagate")
    return out


@check
def files_in_files_out() -> dict[str, Any]:
    """Checkpoints on disk, sharded base, written by the checkpoint writer: identical files."""
    import tvlang
    from tvlang.synth import llama_shapes, make_family

    with tempfile.TemporaryDirectory() as d:
        shapes = llama_shapes(hidden=32, layers=1, vocab=96)
        paths = make_family(os.path.join(d, "ckpt"), ("base", "a", "b"), shapes, layout="dir", base_shards=2)
        expr = "base + 0.4*(a - base) + ties(a - base, b - base, density=0.5)"
        bindings = {k: paths[k] for k in ("base", "a", "b")}
        for device in ("cpu", "cuda"):
            tvlang.evaluate(
                expr, bindings=bindings, out=os.path.join(d, f"out-{device}.safetensors"), device=device
            )
        blobs = []
        for device in ("cpu", "cuda"):
            with open(os.path.join(d, f"out-{device}.safetensors"), "rb") as fh:
                blobs.append(fh.read())
        if DEVICE != "cuda":
            assert blobs[0] == blobs[1], "output files differ"
        return {"bytes": len(blobs[0]), "identical": blobs[0] == blobs[1]}


# -- merge methods (element-wise programs and their reduction passes) ---------------------------------

METHODS: dict[str, tuple[str, int, bool]] = {  # expression, models, depends on float64 reduction sums
    "ties": ("base + ties(m1 - base, m2 - base, m3 - base, weights=[0.5, 0.3, 0.2], density=0.3)", 4, False),
    "ties_count": ('base + ties(m1 - base, m2 - base, density=0.5, elect="count", divide="count")', 3, False),
    "ties_none": ('base + ties(m1 - base, m2 - base, density=1.0, divide="none")', 3, False),
    "dare": ("base + dare(m1 - base, 0.7, seed=5)", 2, False),
    "dare_l1": ('base + dare(m1 - base, 0.6, seed=2, rescale="l1")', 2, True),
    "dare_ties": ("base + dare_ties(m1 - base, m2 - base, density=0.6, seed=4)", 3, False),
    "dare_linear": (
        "base + dare_linear(m1 - base, m2 - base, weights=[0.6, 0.4], density=0.5, seed=9)",
        3,
        False,
    ),
    "della": ('base + della(m1 - base, 0.5, 0.3, seed=2, rescale="inverse")', 2, False),
    "magnitude_prune": ("base + magnitude_prune(m1 - base, 0.3)", 2, False),
    "magnitude_prune_model": ('base + magnitude_prune(m1 - base, 0.3, scope="model")', 2, False),
    "ties_model": ('base + ties(m1 - base, m2 - base, density=0.3, scope="model")', 3, False),
    "breadcrumbs": ("base + breadcrumbs(m1 - base, 0.5, 0.05)", 2, False),
    "linear": ("linear(m1, m2, m3, weights=[1, 2, 1])", 4, False),
    "lerp": ("lerp(base, m1, 0.3)", 2, False),
    "slerp": ("slerp(m1, m2, 0.3)", 3, True),
    "nuslerp": ("base + nuslerp(m1 - base, m2 - base, 0.6)", 3, True),
    "model_stock": ("model_stock(base, m1, m2, m3)", 4, True),
    "model_stock_row": ('model_stock(base, m1, m2, m3, per="row")', 4, True),
    "nearswap": ("nearswap(base, m1, 0.05)", 2, False),
    "ram": ("base + ram(m1 - base, m2 - base, m3 - base, epsilon=0.02)", 4, False),
    # its reductions are counts: exact in any order
    "ramplus": ("base + ramplus(m1 - base, m2 - base, m3 - base, r=0.5, alpha=3, epsilon=0.02)", 4, False),
    "sce": ("base + sce(m1 - base, m2 - base, m3 - base, select_topk=0.4)", 4, True),
    "multislerp": ("multislerp(m1, m2, m3, weights=[0.2, 0.5, 0.3])", 4, True),
    "karcher": ("karcher(m1, m2, m3)", 4, True),
    "nuslerp_row": ('base + nuslerp(m1 - base, m2 - base, 0.4, per="row")', 3, True),
    "nuslerp_column": ('nuslerp(m1, m2, 0.4, per="column")', 3, True),
    "arcee_fusion": ("arcee_fusion(base, m1)", 2, True),
    "building_blocks": (
        "where(abs(m1 - base) > 0.1, m1 - base, 0) + clamp(m2 - base, -0.05, 0.05) + sign(m1 - m2) * 0.01"
        " + min(m1 - base, 0) - max(m2 - base, 0) + (m1 - base >= 0)*0.001 + 0.5*(m1 - base)/2",
        3,
        False,
    ),
    "user_defined": (
        "def prune(d, density) = where(abs(d) >= kth(abs(d), floor(density*numel(d))), d, 0)\n"
        "def scaled(d) = d * (norm(d) / max(norm(d), 1)) + mean(d) - sum(d)/numel(d) + count(d)*0\n"
        "output o = base + scaled(prune(m1 - base, 0.4)) + quantile(m2 - base, 0.9)*0*(m2 - base)",
        3,
        True,
    ),
}


ROW_METHODS = ("della", "model_stock_row", "nuslerp_row", "nuslerp_column", "arcee_fusion")


def _method(name: str) -> dict[str, Any]:
    expr, models, sums = METHODS[name]
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        s = states(10 + len(name), models, SHAPES, dtype)
        r = both(expr, bind(s), on_gpu(sums))
        if name not in ROW_METHODS:  # functions of whole rows: their element-wise pass runs on the CPU path
            assert r["launches"] > 0, "no Triton kernel ran"
        out[str(dtype)[6:]] = r
    chunked = states(20, models, ((300, 70), (5000,)))
    out["chunk 4097"] = both(expr, bind(chunked), on_gpu(sums), chunk=BLOCK + 1)
    return out


for _name in METHODS:
    CHECKS[f"method_{_name}"] = lambda _n=_name: _method(_n)  # type: ignore[misc]


# -- special values, non-finite policies -------------------------------------------------------------


def _special(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    vals = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1e-40,
        -1e-40,
        3e38,
        -3e38,
        float("inf"),
        float("-inf"),
        float("nan"),
        2.0,
    ]
    x = torch.tensor(vals, dtype=torch.float32)
    a = x.repeat_interleave(len(vals))
    b = x.repeat(len(vals))
    z = torch.zeros_like(a)
    return [{"w": z.to(dtype)}, {"w": a.to(dtype)}, {"w": b.to(dtype)}]


@check
def special_values_propagate() -> dict[str, Any]:
    """±0, subnormals, huge values, ±inf and NaN through every element-wise function; NaN payloads
    are not compared (the CPU's own vector and scalar paths disagree on them)."""
    exprs = [
        "0.5*(m1 - base) + 0.25*(m2 - base)",
        "min(m1 - base, m2 - base) + max(m1 - base, m2 - base)",
        "clamp(m1 - base, -1, 2) + sign(m2 - base) + abs(m1 - base)",
        "where(m1 - base, m2 - base, -(m1 - base)) + (m1 - base < m2 - base) + (m1 - base == m2 - base)"
        " + (m1 - base != m2 - base) + (m1 - base >= 1) + (m1 - base <= 1) + (m1 - base > 1)",
        "(m1 - base) / where(m2 - base == 0, 1, m2 - base) + 1/where(m2 - base == 0, 3, m2 - base)",
        "floor(m1 - base) + ceil(m2 - base) + sqrt(abs(m1 - base))",
        "2 - (m1 - base) + (m1 - base)*(m2 - base)",
    ]
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        s = _special(dtype)
        for i, e in enumerate(exprs):
            out[f"{str(dtype)[6:]} #{i}"] = both(e, bind(s), nonfinite="propagate")
    return out


@check
def nan_to_num_function() -> dict[str, Any]:
    """nan_to_num (added through the op table): NaN, ±inf replaced, everything else kept, in a kernel."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        expr = "nan_to_num((m1 - base) / (m2 - base), 0.5, 7, -3) + nan_to_num(m2 - base, 1, 1, 1)"
        r = both(expr, bind(_special(dtype)), nonfinite="propagate")
        assert r["launches"] > 0, "no Triton kernel ran"
        out[str(dtype)[6:]] = r
    return out


@check
def transcendental_functions() -> dict[str, Any]:
    """sin, cos, acos, exp and log in a kernel: libdevice's (numpy's under the interpreter) against
    torch's, within one ulp of the output (the last bit of the accumulation dtype may differ)."""
    expr = (
        "base + 0.1*sin(m1 - base) + 0.1*cos(m2 - base) + 0.1*acos(clamp(m1 - base, -1, 1))"
        " + 0.01*exp(m2 - base) + 0.01*log(abs(m1 - base) + 1)"
    )
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        r = both(expr, bind(states(40, 3, SHAPES, dtype)), 1)
        assert r["launches"] > 0, "no Triton kernel ran"
        out[str(dtype)[6:]] = r
    return out


@check
def nonfinite_error_and_warn() -> dict[str, Any]:
    """A NaN input or an overflow: the same error (code and text) and the same warnings as the CPU."""
    import tvlang

    s = states(30, 3, SHAPES[:2])
    s[1]["t0"][3, 4] = float("nan")
    s[2]["t1"][7] = float("inf")
    out: dict[str, Any] = {}
    for expr in (
        "base + 0.5*(m1 - base) + 0.5*(m2 - base)",
        "base + ties(m1 - base, m2 - base, density=0.5)",
    ):
        errors = []
        for device in ("cpu", "cuda"):
            try:
                tvlang.evaluate(expr, bindings=bind(s), device=device)
                errors.append("no error")
            except tvlang.TvError as e:
                errors.append(e.render())
        assert errors[0] == errors[1] and errors[0] != "no error", errors
        out[f"error: {expr[:30]}"] = errors[0].splitlines()[0]
        out[f"warn: {expr[:30]}"] = both(expr, bind(s), nonfinite="warn")
    big = states(31, 2, SHAPES[:2], torch.float32)
    big[1]["t1"][0] = 3e38
    out["overflow to bf16"] = both("base + 2*(m1 - base)", bind(big), dtype="bf16", nonfinite="warn")
    return out


# -- the pieces -------------------------------------------------------------------------------------


@check
def exact_fma_matches_fractions() -> dict[str, Any]:
    """The interpreter's fma (tvlang's numpy emulation) is the correctly rounded one the GPU has."""
    from fractions import Fraction

    import numpy as np

    from tvlang.codegen.triton import exact_fma

    rng = np.random.default_rng(0)
    x, y, z = (rng.standard_normal(2000) * 2.0 ** rng.integers(-20, 20, 2000) for _ in range(3))
    z[::2] = -(x[::2] * y[::2]) * (1 + 1e-9 * rng.standard_normal(1000))  # cancellation
    r64 = exact_fma(x, y, z)
    wrong64 = sum(
        float(Fraction(a) * Fraction(b) + Fraction(c)) != r for a, b, c, r in zip(x, y, z, r64, strict=True)
    )
    x32, y32, z32 = x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)
    r32 = exact_fma(x32, y32, z32)
    wrong32 = 0
    for a, b, c, r in zip(x32, y32, z32, r32, strict=True):
        q = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        lo, hi = np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))
        err = abs(Fraction(float(r)) - q)
        wrong32 += err > abs(Fraction(float(lo)) - q) or err > abs(Fraction(float(hi)) - q)
    assert wrong64 == 0 and wrong32 == 0, (wrong64, wrong32)
    plain = int((((x32 * y32) + z32).astype(np.float32) != r32).sum())
    return {"samples": 2000, "two_roundings_would_differ": plain}


@check
def uniform_matches_cpu_generator() -> dict[str, Any]:
    """rand in a kernel equals tvlang.backends.interpreter.uniform, in float32 and float64, at offsets."""
    from tvlang.backends.interpreter import random_key, uniform
    from tvlang.codegen import triton as tcg
    from tvlang.codegen.spec import KernelSpec, Stmt

    key = random_key(7, "m1 - base", "layer.0.weight")
    out = {}
    for acc, dtype in (("F32", torch.float32), ("F64", torch.float64)):
        spec = KernelSpec((), ((0, "ACC"),), (Stmt("rand", (), 0),), acc, 0, 1)
        for start in (0, 12345, 2**40 + 3):
            n = BLOCK + 1
            got = torch.empty(n, dtype=dtype, device=dev())
            tcg.run_spec(spec, [], [got], [], [key], start)
            want = torch.empty(n, dtype=dtype)
            uniform(key, start, start + n, want)
            assert torch.equal(got.cpu(), want), (acc, start)
            out[f"{acc} start {start}"] = "equal"
    return out


def dev() -> str:
    return "cuda" if DEVICE == "cuda" else "cpu"


@check
def resident_inputs() -> dict[str, Any]:
    """In-memory inputs already on the device are read in place (on a GPU); same bits."""
    import tvlang

    s = states(40, 3, SHAPES)
    expr = "base + 0.3*(m1 - base) + ties(m1 - base, m2 - base, density=0.4)"
    cpu = tvlang.evaluate(expr, bindings=bind(s), device="cpu")
    moved = [{k: v.to(dev()) for k, v in sd.items()} for sd in s]
    gpu = tvlang.evaluate(expr, bindings=bind(moved), device="cuda")
    return compare(cpu, gpu)


@check
def into_a_model_on_the_device() -> dict[str, Any]:
    """``into=`` tensors on the device (a model being tuned there) get the CPU backend's bits, in
    place; a float32 target gets the float32 result."""
    import tvlang

    s = states(41, 3, SHAPES)
    expr = "base + 0.3*(m1 - base) + ties(m1 - base, m2 - base, density=0.4)"
    cpu = tvlang.evaluate(expr, bindings=bind(s), device="cpu")
    target = {k: torch.zeros_like(v, device=dev()) for k, v in cpu.items()}
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    tvlang.evaluate(expr, bindings=bind(s), device="cuda", into=target)
    assert {k: v.data_ptr() for k, v in target.items()} == ptrs
    wide = {k: torch.zeros(v.shape, dtype=torch.float32, device=dev()) for k, v in cpu.items()}
    tvlang.evaluate(expr, bindings=bind(s), device="cuda", into=wide)
    cpu32 = tvlang.evaluate(expr, bindings=bind(s), device="cpu", dtype="fp32")
    return {
        "bf16": compare(cpu, {k: v.cpu() for k, v in target.items()}, on_gpu(True)),
        "fp32": compare(cpu32, {k: v.cpu() for k, v in wide.items()}, on_gpu(True)),
    }


@check
def into_stays_on_the_device() -> dict[str, Any]:
    """Chunks merged into tensors on the device are copied there device→device: the host staging
    path (write_chunk) and the sink's own write are not used, unless a chunk is not finite; then the
    CPU path redoes it and the error, the warnings and the bits are the CPU backend's."""
    import tvlang
    from tvlang.backends import gpu
    from tvlang.io import endpoints

    calls = {"write_chunk": 0, "IntoSink.write": 0}

    def counted(cls: Any, name: str, key: str) -> None:
        original = getattr(cls, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            calls[key] += 1
            return original(*a, **k)

        setattr(cls, name, wrapper)

    counted(gpu._Executor, "write_chunk", "write_chunk")
    counted(endpoints.IntoSink, "write", "IntoSink.write")
    out: dict[str, Any] = {}
    s = states(42, 3, SHAPES)
    for expr in (
        "base + 0.3*(m1 - base) - 0.2*(m2 - base)",
        "base + ties(m1 - base, m2 - base, density=0.4)",
        "base + dare(m1 - base, 0.3, seed=5) + 0.5*(m2 - base)",
    ):
        cpu = tvlang.evaluate(expr, bindings=bind(s), device="cpu", chunk=1000)
        target = {k: torch.zeros_like(v, device=dev()) for k, v in cpu.items()}
        tvlang.evaluate(expr, bindings=bind(s), device="cuda", into=target, chunk=1000)  # ragged chunks
        assert calls == {"write_chunk": 0, "IntoSink.write": 0}, calls
        out[f"into: {expr[:32]}"] = compare(cpu, {k: v.cpu() for k, v in target.items()}, on_gpu(True))
    tvlang.evaluate(expr, bindings=bind(s), device="cuda")  # a new state dict: through the host
    assert calls["write_chunk"] > 0, calls
    out["host path when not into="] = dict(calls)
    bad = states(43, 3, SHAPES[:2])
    bad[1]["t0"][3, 4] = float("nan")
    expr = "base + 0.5*(m1 - base) + 0.5*(m2 - base)"
    errors = []
    for device in ("cpu", "cuda"):
        target = {k: torch.zeros_like(v, device=dev()) for k, v in bad[0].items()}
        try:
            tvlang.evaluate(expr, bindings=bind(bad), device=device, into=target)
            errors.append("no error")
        except tvlang.TvError as e:
            errors.append(e.render())
    assert errors[0] == errors[1] and errors[0] != "no error", errors
    before = calls["IntoSink.write"]
    cpu = tvlang.evaluate(expr, bindings=bind(bad), device="cpu", nonfinite="warn")
    target = {k: torch.zeros_like(v, device=dev()) for k, v in bad[0].items()}
    tvlang.evaluate(expr, bindings=bind(bad), device="cuda", nonfinite="warn", into=target)
    assert calls["IntoSink.write"] == before + 1, calls  # the one chunk with the NaN, by the CPU path
    out["NaN, warn"] = compare(cpu, {k: v.cpu() for k, v in target.items()})
    return out


def main(argv: list[str]) -> int:
    global DEVICE
    args = list(argv)
    if "--device" in args:
        i = args.index("--device")
        DEVICE = args[i + 1]
        del args[i : i + 2]
    if DEVICE == "interpret":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    from tvlang.codegen import triton as tcg

    original = tcg.run_spec

    def counting(*a: Any, **k: Any) -> None:
        LAUNCHES[0] += 1
        CHUNKS.append((a[5], a[2][0].numel()))
        original(*a, **k)

    tcg.run_spec = counting  # type: ignore[assignment]
    names = args or list(CHECKS)
    results: dict[str, Any] = {}
    for name in names:
        t = time.perf_counter()
        try:
            results[name] = {"ok": True, "detail": CHECKS[name]()}
        except Exception as e:  # reported per check, so one failure does not hide the others
            results[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
        results[name]["seconds"] = round(time.perf_counter() - t, 3)
    print(json.dumps({"device": DEVICE, "results": results}, default=str))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    sys.exit(main(sys.argv[1:]))
