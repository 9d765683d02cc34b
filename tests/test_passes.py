"""IR passes: printed IR before and after, the verifier after every pass, and random programs."""

from __future__ import annotations

import math

import pytest
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


# -- the anchored form ----------------------------------------------------------------------------


def _optimized(src: str, **roles: object) -> str:
    z = {"w": torch.zeros(2)}
    bindings: dict[str, object] = {n: z for n in ("base", "a", "b", "c")}
    bindings.update(roles)
    return format_graph(tvlang.compile(src, bindings=bindings).graph())


def _sum(text: str) -> str:
    """The last line before the outputs: the output's weighted sum (or whatever it became)."""
    return [line for line in text.splitlines() if not line.startswith("output")][-1]


def test_anchor_is_the_base_the_task_vectors_are_taken_against() -> None:
    text = _optimized("base + 0.5*(a - base) - 0.3*(b - base) + 0.7*(c - base)")
    assert text.splitlines()[0] == "%0 = input base : model"  # the anchor comes first in listings
    assert _sum(text) == "%4 = wsum 0.5*(%1 - %0) - 0.3*(%2 - %0) + 0.7*(%3 - %0) + 1*%0 : model"
    # the base need not come first in the expression
    assert _sum(_optimized("0.5*(a - base) + base")) == "%2 = wsum 0.5*(%1 - %0) + 1*%0 : model"


def test_anchor_without_a_base_is_the_largest_weight_first_of_equals() -> None:
    assert _sum(_optimized("0.3*a + 0.7*b")) == "%2 = wsum 0.3*(%1 - %0) + 1*%0 : model"
    assert _optimized("0.3*a + 0.7*b").splitlines()[0] == "%0 = input b : model"
    soup = _optimized("0.5*a + 0.5*b")
    assert soup.splitlines()[0] == "%0 = input a : model" and _sum(soup).endswith("+ 1*%0 : model")


def test_task_vector_keeps_its_anchor_with_coefficient_zero() -> None:
    # `a - b`: the anchor b is read (it is subtracted) but never added
    assert _sum(_optimized("a - b")) == "%2 = sub %0, %1 : delta"
    text = _optimized("0.3*(a - base) + 0.7*(b - base)")
    assert _sum(text) == "%3 = wsum 0.3*(%0 - %1) + 0.7*(%2 - %1) : delta"


def test_zero_weight_base_is_not_the_anchor() -> None:
    # the base's weight folds to 1 - 1/2 - 1/2 = 0: it is never opened, and `a` anchors the sum
    text = _optimized("base + 0.5*(a - base) + 0.5*(b - base)")
    assert "base" not in text and _sum(text) == "%2 = wsum 0.5*(%1 - %0) + 1*%0 : model"


def test_stored_task_vectors_and_adapters_are_added_not_differenced(tmp_path: object) -> None:
    text = _optimized("base + 0.4*tv + 0.5*(a - base)", tv=tvlang.delta({"w": torch.zeros(2)}))
    assert _sum(text) == "%3 = wsum 0.4*%1 + 0.5*(%2 - %0) + 1*%0 : model"
    assert _sum(_optimized("0.5*tv", tv=tvlang.delta({"w": torch.zeros(2)}))) == "%1 = wsum 0.5*%0 : delta"


def test_outputs_share_their_anchor_and_differences() -> None:
    z = {"w": torch.zeros(2)}
    src = "output x = base + 0.2*(a - base)\noutput y = base + 0.8*(a - base) - 0.1*(b - base)"
    graph = tvlang.compile(src, bindings={"base": z, "a": z, "b": z}).graph()
    x, y = (node for _, node in graph.outputs)
    assert x.args[0] is y.args[0]  # one `a - base` node: each chunk forms it once
    assert format_graph(graph).count("input base") == 1


def test_linearize_is_idempotent(tmp_path: object) -> None:
    graph = _mission_program(tmp_path).graph()
    assert format_graph(optimize(graph, verify_each=True)) == format_graph(graph)
    soup = tvlang.compile("0.2*a + 0.3*b + 0.5*c", bindings={n: {"w": torch.zeros(2)} for n in "abc"}).graph()
    assert format_graph(optimize(soup)) == format_graph(soup)


def test_verifier_requires_anchored_sums() -> None:
    from tvlang.ir import MODEL, Graph, InputRef, IRVerifyError, Node

    a, b = (Node(Op.INPUT, (), InputRef(f"/{n}", n, MODEL), MODEL) for n in "ab")
    flat = Node(Op.WSUM, (a, b), (0.5, 0.5), MODEL)  # the form the linear pass no longer emits
    with pytest.raises(IRVerifyError, match="not anchored"):
        verify(Graph((("out", flat),)))
    verify(optimize(Graph((("out", flat),))))  # linearize anchors it: 0.5*(b - a) + 1*a
