"""The Python API: strings with bindings, compile once and run many, results in memory or on disk."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import tvlang

from .conftest import MISSION, NAMES


def test_evaluate_state_dicts_modules_and_numbers() -> None:
    base = torch.nn.Linear(3, 2)
    ft = torch.nn.Linear(3, 2)
    out = tvlang.evaluate("base + lam*tau", {"base": base, "tau": tvlang.task_vector(ft), "lam": 0.25})
    for name, t in out.items():
        b, f = base.state_dict()[name], ft.state_dict()[name]
        assert torch.allclose(t, b + 0.25 * (f - b), atol=1e-7)


def test_compile_once_run_many(bf16_files: dict[str, str]) -> None:
    prog = tvlang.compile(
        "param lam = 0.4\noutput o = base + lam*(amazon_sent - base)",
        bindings={"base": bf16_files["base"], "amazon_sent": bf16_files["amazon_sent"]},
    )
    zero = prog.run(params={"lam": 0.0})
    base = load_file(bf16_files["base"])
    assert all(torch.equal(zero[k], base[k]) for k in base)
    one = prog.run(params={"lam": 1.0})
    ft = load_file(bf16_files["amazon_sent"])
    assert all(torch.equal(one[k], ft[k]) for k in ft)


def test_multiple_outputs_to_a_directory(bf16_files: dict[str, str], tmp_path) -> None:
    binds = {"base": bf16_files["base"], **{n: tvlang.task_vector(bf16_files[n]) for n in NAMES[1:]}}
    prog = tvlang.compile(f"output merged = {MISSION}\noutput forget = base - toxic", bindings=binds)
    written = prog.run(str(tmp_path / "outs"))
    assert sorted(written) == ["forget", "merged"]
    assert all(os.path.exists(p) and p.endswith(".safetensors") for p in written.values())
    with pytest.raises(tvlang.TvOutputError):
        prog.run(str(tmp_path / "one.safetensors"))
    mapping = {"merged": tmp_path / "m.safetensors", "forget": tmp_path / "f"}
    prog.run(mapping)
    assert os.path.isdir(tmp_path / "f") and os.path.isfile(tmp_path / "m.safetensors")


def test_explain_is_a_printable_plan(bf16_files: dict[str, str]) -> None:
    prog = tvlang.compile(
        "base + 0.5*(ft - base)", bindings={"base": bf16_files["base"], "ft": bf16_files["toxic"]}
    )
    plan = prog.plan()
    assert plan.bytes_read == 2 * plan.bytes_written
    text = prog.explain()
    # the anchored form: the difference from the base, then the base
    assert "wsum 0.5*(%1 - %0) + 1*%0" in text and "wsum[f32] 0.5*(in1 - in0) + 1*in0" in text


def test_bad_bindings_and_options() -> None:
    with pytest.raises(tvlang.TvParamError):
        tvlang.evaluate("a", {"a": object()})
    with pytest.raises(tvlang.TvParamError):
        tvlang.evaluate("a", {"a": {"w": torch.zeros(1)}}, colour="red")
    with pytest.raises(tvlang.TvParamError):
        tvlang.evaluate("a", {"a": {"w": torch.zeros(1)}}, dtype="int4")
    with pytest.raises(tvlang.TvInputError, match="not a tensor"):
        tvlang.evaluate("a", {"a": {"w": [1.0]}})


def test_mismatched_state_dicts_name_the_tensor() -> None:
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    b = {"w": torch.zeros(2)}
    with pytest.raises(tvlang.TvInputError) as info:
        tvlang.evaluate("0.5*a + 0.5*b", {"a": a, "b": b})
    assert info.value.code == "E303" and "`b`" in str(info.value)
