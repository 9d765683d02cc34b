"""The checker: kinds, the affine rule, names and arguments — golden error reports."""

from __future__ import annotations

import os

import pytest
import torch

import tvlang
from tvlang.errors import TvError
from tvlang.lowering.lower import lower
from tvlang.syntax.parser import parse

from .conftest import golden

# Each case: a program (written next to two empty-named checkpoint files) and its error.
ERROR_CASES = {
    "add_models": 'base = load("base")\ntoxic = load("toxic")\noutput out = base + toxic\n',
    "affine_sum": 'a = load("base")\nb = load("toxic")\noutput out = 0.7*a + 0.7*b\n',
    "scalar_plus_model": 'output out = load("base") + 1\n',
    "model_times_model": 'b = load("base")\noutput out = b * b\n',
    "divide_by_tensor": 'b = load("base")\noutput out = 1 / b\n',
    "divide_by_zero": 'b = load("base")\nt = load("toxic")\noutput out = b + (t - b) / 0\n',
    "power_of_tensor": 'b = load("base")\noutput out = b ** 2\n',
    "unknown_name": 'base = load("base")\noutput out = base + 0.5*(toxc - base)\ntoxic = load("toxic")\n',
    "unknown_function": 'output out = lod("base")\n',
    "bad_kwarg": 'output out = load(pth="base")\n',
    "missing_file": 'output out = load("nowhere")\n',
    "string_value": 'output out = "base"\n',
    "rebound": 'a = load("base")\na = load("toxic")\noutput out = a\n',
    "scalar_output": "param lam = 2\noutput out = lam * 3\n",
    "zero_output": 'a = load("base")\noutput out = a - a\n',
    "no_output": 'a = load("base")\n',
    "bare_not_last": 'load("base")\noutput o = load("base")\n',
    "param_not_number": 'param lam = load("base")\noutput o = load("base")\n',
    "function_as_value": "output o = load\n",
    "path_not_string": 'b = load("base")\noutput o = load(b)\n',
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("check")
    for name in ("base", "toxic"):
        (d / f"{name}.safetensors").write_bytes(b"")  # existence is all lowering checks
    return str(d)


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_reports(case: str, workdir: str) -> None:
    program = parse(ERROR_CASES[case], "merge.tv", workdir)
    with pytest.raises(TvError) as info:
        lower(program)
    report = info.value.render().replace(workdir, "<dir>")
    golden(os.path.join("errors", case + ".txt"), report + "\n")


def test_affine_combinations_are_models_or_deltas(workdir: str) -> None:
    src = (
        'a = load("base")\nb = load("toxic")\n'
        "output soup = 0.5*a + 0.5*b\n"
        "output vec = a - b\n"
        "output analogy = a + b - a\n"  # mass 1 via a partial intermediate
        "output scaled = a + (b - a)/4\n"
    )
    lowered = lower(parse(src, "m.tv", workdir))
    kinds = {name: str(node.kind) for name, node in lowered.graph.outputs}
    assert kinds == {"soup": "model", "vec": "delta", "analogy": "model", "scaled": "model"}


def test_mission_expression_types_with_task_vector_bindings(workdir: str) -> None:
    base = os.path.join(workdir, "base.safetensors")
    tv = {n: tvlang.task_vector(os.path.join(workdir, "toxic.safetensors")) for n in ("amazon_sent",)}
    bindings = {
        "base": base,
        **tv,
        "amazon_lm": tvlang.delta(base),
        "yelp_lm": tvlang.delta(base),
        "toxic": tvlang.task_vector(base),
    }
    prog = tvlang.compile("base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic", bindings=bindings)
    ((name, node),) = prog.graph().outputs
    assert (name, str(node.kind)) == ("out", "model")


def test_param_overrides(workdir: str) -> None:
    src = 'a = load("base")\nb = load("toxic")\nparam lam = 0.25\noutput o = a + lam*(b - a)\n'
    assert lower(parse(src, "m.tv", workdir), params={"lam": 0.5}).params == {"lam": 0.5}
    with pytest.raises(tvlang.TvParamError) as info:
        lower(parse(src, "m.tv", workdir), params={"lan": 0.5})
    assert info.value.code == "E401" and "did you mean `lam`" in info.value.render()


def test_task_binding_needs_base() -> None:
    with pytest.raises(tvlang.TvParamError, match="not bound"):
        tvlang.compile("x", bindings={"x": tvlang.task_vector({"w": torch.zeros(1)})}).graph()


def test_roots_restrict_load(workdir: str, tmp_path: str) -> None:
    prog = tvlang.compile_file(_write(tmp_path, 'output o = load("../x/base")\n'))
    with pytest.raises(tvlang.TvInputError):
        prog.lower(options=tvlang.Options(roots=(str(tmp_path),)))


def _write(d: object, text: str) -> str:
    path = os.path.join(str(d), "p.tv")
    with open(path, "w") as f:
        f.write(text)
    return path
