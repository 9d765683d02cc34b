"""IR passes: printed IR before and after, the verifier after every pass, and random programs."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tvlang
from tvlang.ir import Op, format_graph, verify
from tvlang.passes import PIPELINE, optimize

from .conftest import golden

MISSION_TV = """\
base        = load("ckpt/base")
amazon_sent = load("ckpt/amazon_sent") - base
amazon_lm   = load("ckpt/amazon_lm") - base
yelp_lm     = load("ckpt/yelp_lm") - base
toxic       = load("ckpt/toxic") - base
param lam = 0.4
output merged = base + lam*(amazon_sent - amazon_lm + yelp_lm) - toxic
output sweep  = base + (1 - lam)*toxic/2 + 0*amazon_lm
"""


def _mission_program(tmp_path: object) -> tvlang.Program:
    import os

    ckpt = os.path.join(str(tmp_path), "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    for n in ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic"):
        open(os.path.join(ckpt, n + ".safetensors"), "wb").close()
    path = os.path.join(str(tmp_path), "m.tv")
    with open(path, "w") as f:
        f.write(MISSION_TV)
    return tvlang.compile_file(path)


def test_printed_ir_before_and_after(tmp_path: object) -> None:
    prog = _mission_program(tmp_path)
    before = prog.graph(optimized=False)
    after = prog.graph()
    golden(
        "ir/mission.txt",
        "# as written\n" + format_graph(before) + "\n\n# after passes\n" + format_graph(after) + "\n",
    )


def test_zero_weight_input_disappears(tmp_path: object) -> None:
    after = _mission_program(tmp_path).graph()
    labels = [ref.label for ref in after.inputs()]
    # `0*amazon_lm` leaves amazon_lm in `merged` only; `sweep` reads just base and toxic.
    sweep = dict(after.outputs)["sweep"]
    read = {n.arg.label for n in sweep.toposort() if n.op is Op.INPUT}
    assert sorted(read) == ["ckpt/base", "ckpt/toxic"]
    assert labels.count("ckpt/amazon_lm") == 1


def test_verifier_holds_after_every_pass(tmp_path: object) -> None:
    graph = _mission_program(tmp_path).graph(optimized=False)
    verify(graph)
    for p in PIPELINE:
        graph = p(graph)
        verify(graph)


def test_cse_is_structural() -> None:
    base = {"w": torch.zeros(2)}
    prog = tvlang.compile(
        "output a = base + 0.5*(t - base)\noutput b = base + 0.5*(t - base)",
        bindings={"base": base, "t": {"w": torch.ones(2)}},
    )
    g = prog.graph(optimized=False)
    assert g.outputs[0][1] is g.outputs[1][1]


# -- random well-typed linear programs: optimised == unoptimised == float64 reference ---------------

names = st.sampled_from(["a", "b", "c", "d"])
coef = st.sampled_from([0.5, 0.25, 2.0, -1.0, 0.1, 3.0, 0.3])


@st.composite
def delta_expr(draw: st.DrawFn, depth: int = 0) -> str:
    """A random expression of kind delta (model weights sum to 0)."""
    choice = draw(st.integers(0, 4 if depth < 3 else 0))
    if choice == 0:
        x, y = draw(names), draw(names)
        return f"({x} - {y})"
    if choice == 1:
        return f"{draw(coef)}*{draw(delta_expr(depth + 1))}"
    if choice == 2:
        return f"({draw(delta_expr(depth + 1))} + {draw(delta_expr(depth + 1))})"
    if choice == 3:
        return f"-{draw(delta_expr(depth + 1))}"
    return f"{draw(delta_expr(depth + 1))}/{draw(coef)}"


def _reference(expr: str, env: dict[str, float]) -> float:
    return float(eval(expr, {"__builtins__": {}}, env))  # test-only oracle over plain floats


@settings(max_examples=60, deadline=None)
@given(delta_expr(), names)
def test_random_programs_match_reference(expr: str, anchor: str) -> None:
    env = {"a": 1.5, "b": -2.0, "c": 0.75, "d": 4.0}
    src = f"{anchor} + {expr}"
    tensors = {k: {"w": torch.tensor([v], dtype=torch.float64)} for k, v in env.items()}
    prog = tvlang.compile(src, bindings=tensors)
    unopt = prog.graph(optimized=False)
    opt = optimize(unopt, verify_each=True)
    assert opt.outputs[0][1].kind.is_model
    expected = _reference(src, env)
    try:
        result = prog.run()["w"].item()
    except tvlang.TvTypeError as err:  # every weight cancelled: only possible when expr == 0 exactly
        assert err.code == "E207"
        assert math.isclose(expected, env[anchor], abs_tol=1e-9)
        return
    assert math.isclose(result, expected, rel_tol=1e-12, abs_tol=1e-12)
