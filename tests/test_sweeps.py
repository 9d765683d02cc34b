"""Sweeps: a parameter with several values makes several outputs, all from one pass over the inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tvlang
from tvlang import cli

from .conftest import NAMES

SWEEP = """\
base = load("{base}")
ft = load("{ft}")
param lam = [0.2, 0.5, 0.8]
param beta = 1
output merged = base + lam*beta*(ft - base)
output forget = base - beta*(ft - base)/2
"""


def _program(files: dict[str, str], tmp_path) -> str:
    path = tmp_path / "sweep.tv"
    path.write_text(SWEEP.format(base=files["base"], ft=files[NAMES[1]]))
    return str(path)


def test_sweep_in_the_file_is_one_pass(bf16_files: dict[str, str], tmp_path) -> None:
    prog = tvlang.compile_file(_program(bf16_files, tmp_path))
    plan = prog.plan()
    names = [o.name for o in plan.outputs]
    assert names == ["merged.lam=0.2", "merged.lam=0.5", "merged.lam=0.8", "forget"]
    assert all(len(t.writes) == 4 for t in plan.tasks)  # every output written from one read of each chunk
    together = prog.run()
    for lam in (0.2, 0.5, 0.8):
        alone = prog.run(params={"lam": lam})["merged"]
        for k, t in alone.items():
            assert torch.equal(t, together[f"merged.lam={lam:g}"][k])


def test_sweep_from_the_command_line_writes_each_output(bf16_files: dict[str, str], tmp_path) -> None:
    program = _program(bf16_files, tmp_path)
    out = tmp_path / "out"
    assert cli.main(["run", program, "-o", str(out), "-q", "--set", "lam=0:1:0.5", "--set", "beta=2,1"]) == 0
    written = sorted(os.listdir(out))
    assert len(written) == 3 * 2 + 2  # merged over lam × beta, forget over beta
    assert "merged.lam=0.5,beta=2.safetensors" in written and "forget.beta=1.safetensors" in written
    with safe_open(str(out / "merged.lam=1,beta=1.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["tvlang.params"]) == {"beta": 1.0, "lam": 1.0}
    ft = load_file(bf16_files[NAMES[1]])
    top = load_file(str(out / "merged.lam=1,beta=1.safetensors"))
    assert all(torch.equal(top[k], ft[k]) for k in ft)


def test_python_sweep_and_bad_ranges(bf16_files: dict[str, str], tmp_path) -> None:
    prog = tvlang.compile_file(_program(bf16_files, tmp_path))
    result = prog.run(params={"lam": [0.0, 1.0]})
    assert sorted(result) == ["forget", "merged.lam=0", "merged.lam=1"]
    code = cli.main(["check", _program(bf16_files, tmp_path), "--set", "lam=1:0:0.5"])
    assert code == 1
    with pytest.raises(tvlang.TvParamError):
        prog.plan(params={"lam": []})
