"""The command line, end to end: what a user types and what they get back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tvlang import cli

from .conftest import MISSION, NAMES

PROGRAM = """\
base        = load("{base}")
amazon_sent = load("{amazon_sent}") - base
amazon_lm   = load("{amazon_lm}") - base
yelp_lm     = load("{yelp_lm}") - base
toxic       = load("{toxic}") - base
param lam = 0.4
output merged = base + lam*(amazon_sent - amazon_lm + yelp_lm) - toxic
"""


@pytest.fixture
def program(bf16_files: dict[str, str], tmp_path) -> str:
    path = tmp_path / "sentiment.tv"
    rel = {n: os.path.relpath(p, tmp_path) for n, p in bf16_files.items()}
    path.write_text(PROGRAM.format(**rel))
    return str(path)


def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_output_with_metadata(program: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "merged.safetensors")
    code, _, err = run("run", program, "-o", out, capsys=capsys)
    assert code == 0, err
    assert "wrote" in err and re.search(r"100%.* \d+\.\d+ [KMGT]?i?B/s", err), err  # the progress summary
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["tvlang.expression"] == "base + lam*(amazon_sent - amazon_lm + yelp_lm) - toxic"
    assert meta["tvlang.params"] == '{"lam": 0.4}'


def test_set_overrides_param(program: str, tmp_path, capsys) -> None:
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert run("run", program, "-o", a, "-q", capsys=capsys)[0] == 0
    assert run("run", program, "-o", b, "-q", "--set", "lam=0", capsys=capsys)[0] == 0
    ta, tb = load_file(a), load_file(b)
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)
    code, _, err = run("run", program, "-o", b, "-q", "--force", "--set", "lam=zero", capsys=capsys)
    assert code == 1 and "not a number" in err and "Traceback" not in err


def test_eval_with_bindings_matches_run(bf16_files: dict[str, str], program: str, tmp_path, capsys) -> None:
    via_run, via_eval = str(tmp_path / "r.safetensors"), str(tmp_path / "e.safetensors")
    assert run("run", program, "-o", via_run, "-q", capsys=capsys)[0] == 0
    binds = ["--bind", f"base={bf16_files['base']}"]
    for n in NAMES[1:]:
        binds += ["--task", f"{n}={bf16_files[n]}"]
    code, _, err = run("eval", MISSION, *binds, "-o", via_eval, "-q", capsys=capsys)
    assert code == 0, err
    a, b = load_file(via_run), load_file(via_eval)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_reads_headers_only(program: str, capsys) -> None:
    code, out, _ = run("check", program, capsys=capsys)
    assert code == 0 and "ok:" in out and "merged (model" in out


def test_plan_shows_ir_passes_and_totals(program: str, capsys) -> None:
    code, out, _ = run("plan", program, capsys=capsys)
    assert code == 0
    for needle in (
        "# IR as written",
        "# IR after passes",
        "wsum 0.4*(%1 - %0)",
        "totals:",
        "peak working memory",
    ):
        assert needle in out
    assert run("explain", program, "--all", capsys=capsys)[0] == 0


def test_existing_output_needs_force(program: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "m.safetensors")
    assert run("run", program, "-o", out, "-q", capsys=capsys)[0] == 0
    code, _, err = run("run", program, "-o", out, "-q", capsys=capsys)
    assert code == 1 and "E500" in err
    assert run("run", program, "-o", out, "-q", "--force", capsys=capsys)[0] == 0


def test_refuses_to_overwrite_an_input(program: str, bf16_files: dict[str, str], capsys) -> None:
    code, _, err = run("run", program, "-o", bf16_files["toxic"], "-q", "--force", capsys=capsys)
    assert code == 1 and "E502" in err


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("base + ", "E100"),
        ("base + toxic", "E201"),
        ("base + tox", "E200"),
    ],
)
def test_user_errors_exit_1_with_position(
    source: str, code: str, bf16_files: dict[str, str], tmp_path, capsys
) -> None:
    rc, _, err = run(
        "eval",
        source,
        "--bind",
        f"base={bf16_files['base']}",
        "--bind",
        f"toxic={bf16_files['toxic']}",
        "-o",
        str(tmp_path / "x.safetensors"),
        capsys=capsys,
    )
    assert rc == 1
    assert f"error[{code}]" in err and "--> <expr>:1:" in err and "Traceback" not in err
    assert not os.listdir(tmp_path)


def test_missing_program_and_bad_memory(tmp_path, capsys) -> None:
    assert run("run", str(tmp_path / "nope.tv"), "-o", "x", capsys=capsys)[0] == 1
    rc, _, err = run("check", "-e", "a", "--memory", "lots", capsys=capsys)
    assert rc == 1 and "E402" in err


def test_mismatched_shapes_name_tensor_and_position(bf16_files: dict[str, str], tmp_path, capsys) -> None:
    other = {k: v for k, v in load_file(bf16_files["toxic"]).items()}
    first = next(iter(other))
    other[first] = torch.zeros(3, 3, dtype=torch.bfloat16)
    from safetensors.torch import save_file

    bad = str(tmp_path / "bad.safetensors")
    save_file(other, bad)
    prog = tmp_path / "p.tv"
    prog.write_text(f'base = load("{bf16_files["base"]}")\n\noutput o = base + 0.5*(load("bad") - base)\n')
    rc, _, err = run("check", str(prog), capsys=capsys)
    assert rc == 1 and "E304" in err and first in err and "[3, 3]" in err and "p.tv:3:" in err


def test_failed_run_leaves_nothing(program: str, tmp_path, capsys, monkeypatch) -> None:
    import tvlang.runtime

    calls = 0

    def failing(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("simulated failure mid-run")
        return real(*args, **kwargs)

    real = tvlang.runtime.write_to_sink  # both kernel paths write through it
    monkeypatch.setattr(tvlang.runtime, "write_to_sink", failing)
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, _, err = run("run", program, "-o", str(outdir / "merged"), "-q", "--threads", "1", capsys=capsys)
    assert rc == 2 and "internal error" in err  # an unexpected exception is a bug: exit 2 with traceback
    assert os.listdir(outdir) == []  # no output, no temporary left behind


def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    code, out, _ = run("demo", "--dir", str(tmp_path), capsys=capsys)
    assert code == 0
    assert "demo ok" in out and "correctly rounded" in out
    assert os.path.exists(tmp_path / "merged" / "config.json")


def test_module_entry_point_exit_codes(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tvlang", "eval", "a +", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "error[E100]" in proc.stderr and "Traceback" not in proc.stderr
