"""Never surprise: inputs are never overwritten, every input is checked, edge cases are errors.

Each test builds its own checkpoints, because a failure here would destroy them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tvlang import cli
from tvlang.synth import llama_shapes, make_family

NAMES = ("base", "ft")
SHAPES = llama_shapes(hidden=16, layers=2, vocab=32)


@pytest.fixture
def ckpt(tmp_path: Path) -> dict[str, str]:
    """A base as a 3-shard HF directory (with config.json) and a fine-tune directory."""
    return make_family(str(tmp_path / "ckpt"), NAMES, SHAPES, layout="dir", base_shards=3)


def digest(root: str) -> dict[str, str]:
    """Every file below ``root`` (or the file itself) and a hash of its bytes."""
    paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in sorted(paths)}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def merge(ckpt: dict[str, str], out: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    expr = "base + 0.5*(ft - base)"
    return run(capsys, "eval", expr, "--bind", f"base={ckpt['base']}", "--bind", f"ft={ckpt['ft']}",
               "-o", out, "--force", "-q")  # fmt: skip


# -- 1. an output never overlaps an input -----------------------------------------------------------


def _shard(ckpt: dict[str, str]) -> str:
    return os.path.join(
        ckpt["base"], sorted(f for f in os.listdir(ckpt["base"]) if f.startswith("model-"))[0]
    )


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda c: os.path.join(c["ft"], "model.safetensors"), id="file-inside-input-dir"),
        pytest.param(lambda c: _shard(c), id="shard-of-the-base"),
        pytest.param(lambda c: os.path.join(c["base"], "new.safetensors"), id="new-file-in-input-dir"),
        pytest.param(lambda c: os.path.join(c["ft"], "..", "ft"), id="dotdot-to-input-dir"),
        pytest.param(lambda c: os.path.dirname(c["base"]), id="directory-holding-inputs"),
        pytest.param(lambda c: c["base"], id="the-base-itself"),
    ],
)
def test_output_overlapping_an_input_is_refused(ckpt, tmp_path, capsys, target) -> None:
    before = {**digest(ckpt["base"]), **digest(ckpt["ft"])}
    code, err = merge(ckpt, target(ckpt), capsys)
    assert code == 1 and "error[E502]" in err, err
    assert "Traceback" not in err
    assert {**digest(ckpt["base"]), **digest(ckpt["ft"])} == before


def test_symlink_to_an_input_is_refused(ckpt, tmp_path, capsys) -> None:
    link = tmp_path / "looks_new.safetensors"
    link.symlink_to(os.path.join(ckpt["ft"], "model.safetensors"))
    before = digest(ckpt["ft"])
    code, err = merge(ckpt, str(link), capsys)
    assert code == 1 and "E502" in err and "resolves to" in err, err
    assert digest(ckpt["ft"]) == before


def test_hard_link_to_an_input_is_refused(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.link(_shard(ckpt), out / "model.safetensors")
    code, err = merge(ckpt, str(out), capsys)
    assert code == 1 and "E502" in err and "hard link" in err, err
    assert (out / "model.safetensors").samefile(_shard(ckpt))


def test_output_beside_the_inputs_is_fine(ckpt, tmp_path, capsys) -> None:
    code, err = merge(ckpt, str(tmp_path / "ckpt" / "merged"), capsys)
    assert code == 0, err


# -- 3. an input whose weight cancels is still opened and checked ---------------------------------


@pytest.fixture
def odd(tmp_path: Path) -> str:
    """A model of another architecture (wider hidden size)."""
    return make_family(str(tmp_path / "odd"), ("odd",), llama_shapes(hidden=24, layers=2, vocab=32))["odd"]


def write_tv(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prog.tv"
    path.write_text(text)
    return str(path)


def test_cancelled_input_of_another_architecture(ckpt, odd, tmp_path, capsys) -> None:
    prog = write_tv(
        tmp_path,
        f'base = load("{ckpt["base"]}")\nother = load("{odd}")\noutput out = base + (other - base)\n',
    )
    for command in ("run", "check"):
        code, err = run(
            capsys, command, prog, *(["-o", str(tmp_path / "out"), "-q"] if command == "run" else [])
        )
        assert code == 1 and "error[E304]" in err, err
        assert "prog.tv:1:" in err and "has shape" in err  # at the load() of the cancelled base
    assert not (tmp_path / "out").exists()


def test_cancelled_input_that_is_corrupt(ckpt, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    prog = write_tv(
        tmp_path, f'base = load("{bad}")\nft = load("{ckpt["ft"]}")\noutput out = base + (ft - base)\n'
    )
    code, err = run(capsys, "run", prog, "-o", str(tmp_path / "out"), "-q")
    assert code == 1 and "error[E301]" in err and "prog.tv:1:" in err, err
    assert not (tmp_path / "out").exists()


def test_cancelled_input_is_shown_and_never_read(ckpt, tmp_path, capsys) -> None:
    prog = write_tv(
        tmp_path,
        f'base = load("{ckpt["base"]}")\nft = load("{ckpt["ft"]}")\noutput out = base + (ft - base)\n',
    )
    code = cli.main(["plan", prog])
    out = capsys.readouterr().out
    assert code == 0 and "weight 0: headers checked, never read" in out
    assert "in1" not in out  # one input is read: ft


def test_cancelled_input_in_a_mergekit_config(ckpt, odd, tmp_path, capsys) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {odd}\nmodels:\n"
        f"  - model: {ckpt['ft']}\n    parameters:\n      weight: 1.0\ndtype: bfloat16\n"
    )
    code, err = run(capsys, "run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert code == 1 and "E304" in err and "merge.yml:2:" in err, err
    assert not (tmp_path / "out").exists()


# -- 4. every command takes every form of program -------------------------------------------------


def test_check_and_plan_take_job_files_and_mergekit_configs(ckpt, tmp_path, capsys) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"expression: base + lam*(ft - base)\nparams: {{lam: 0.3}}\n"
        f"bindings:\n  base: {ckpt['base']}\n  ft: {ckpt['ft']}\noutput: {tmp_path / 'out'}\n"
    )
    mk = tmp_path / "merge.yml"
    mk.write_text(
        f"merge_method: task_arithmetic\nbase_model: {ckpt['base']}\nmodels:\n"
        f"  - model: {ckpt['ft']}\n    parameters:\n      weight: 0.3\ndtype: bfloat16\n"
    )
    for config in (job, mk):
        assert cli.main(["check", str(config)]) == 0
        assert "ok: 2 input(s)" in capsys.readouterr().out
        assert (
            cli.main(["plan", str(config), "--set", "lam=0.5"] if config is job else ["plan", str(config)])
            == 0
        )
        out = capsys.readouterr().out
        assert "# plan" in out and "wsum" in out
    assert "# program (translated from" in out and 'load("' in out  # the mergekit config's program
    assert not (tmp_path / "out").exists()  # check and plan write nothing


def test_plan_of_a_job_points_errors_at_the_job(tmp_path, capsys) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"expression: base + 0.5*(ft - base)\nbindings:\n  base: {tmp_path / 'nope'}\n  ft: {tmp_path / 'nope2'}\n"
    )
    assert cli.main(["plan", str(job)]) == 1
    err = capsys.readouterr().err
    assert "error[E300]" in err and "job.yaml:3:" in err, err


# -- 5. config.json says the output's dtype --------------------------------------------------------


def _load_hf(path: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, SHAPES["model.embed_tokens.weight"][0]) and bool(
        torch.isfinite(logits).all()
    )
    return model


@pytest.mark.parametrize(
    ("flag", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16), (None, torch.bfloat16)]
)
def test_config_says_the_output_dtype(ckpt, tmp_path, capsys, flag, dtype) -> None:
    out = str(tmp_path / "out")
    args = ["eval", "base + 0.5*(ft - base)", "--bind", f"base={ckpt['base']}", "--bind", f"ft={ckpt['ft']}"]
    assert cli.main([*args, "-o", out, "-q", *(["--dtype", flag] if flag else [])]) == 0, (
        capsys.readouterr().err
    )
    config = json.loads(Path(out, "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    assert config["torch_dtype"] == config["dtype"] == name
    model = _load_hf(out)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_mergekit_out_dtype_reaches_the_config(ckpt, tmp_path, capsys) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {ckpt['base']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {ckpt['ft']}\n    parameters: {{weight: 0.5}}\ndtype: float16\n"
    )
    assert cli.main(["run", str(config), "-o", str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert {p.dtype for p in _load_hf(str(tmp_path / "out")).parameters()} == {torch.float16}


# -- 6. numbers at the edges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "code", "caret"),
    [
        ("base + 1e39*(ft - base)", "E210", "beyond the float32 range"),
        ("base + 1e30*1e30*(ft - base)", "E210", "beyond the float32 range"),
        ("base + 1e400*(ft - base)", "E103", "`1e400` is too large"),
    ],
)
def test_huge_coefficients_are_positioned_errors(ckpt, tmp_path, capsys, expr, code, caret) -> None:
    args = [
        "eval",
        expr,
        "--bind",
        f"base={ckpt['base']}",
        "--bind",
        f"ft={ckpt['ft']}",
        "-o",
        str(tmp_path / "o"),
    ]
    status, err = run(capsys, *args)
    assert status == 1 and f"error[{code}]" in err and caret in err and "<expr>:1:" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0:1:0", "the step of the range `0:1:0` is 0; it must be positive"),
        ("1:0:0.5", "stops (0) below its start (1)"),
        ("0:1", "is not a range `start:stop:step`"),
        ("0:1:1e-9", "has 1,000,000,001 values; a run writes at most 4096"),
        ("nan", "is not a finite number"),
        ("x", "is not a number, a list"),
    ],
)
def test_set_values_are_diagnosed_precisely(ckpt, capsys, value, message) -> None:
    args = [
        "check",
        "-e",
        "base + lam*(ft - base)",
        "--bind",
        f"base={ckpt['base']}",
        "--bind",
        f"ft={ckpt['ft']}",
    ]
    status, err = run(capsys, *args, "--set", f"lam={value}")
    assert status == 1 and "error[E402]" in err and message in err and "--set:1:5" in err, err


def test_sweep_outputs_have_shell_and_glob_safe_names(ckpt, tmp_path, capsys) -> None:
    args = ["eval", "base + lam*(ft - base)", "--bind", f"base={ckpt['base']}", "--bind", f"ft={ckpt['ft']}"]
    assert cli.main([*args, "--set", "lam=0:1:0.5", "-o", str(tmp_path / "sweep"), "-q"]) == 0
    names = sorted(os.listdir(tmp_path / "sweep"))
    assert names == ["out.lam=0", "out.lam=0.5", "out.lam=1"]
    assert not any(set(n) & set("[]*?{}$'\" ") for n in names)
    assert len(glob.glob(str(tmp_path / "sweep" / "out.lam=*"))) == 3


def _python() -> list[str]:
    return [sys.executable, "-m", "tvlang"]


def _signals_as_a_shell() -> None:
    """A child inherits ignored and blocked signals (libraries imported by earlier tests set some):
    start it as a shell would, with SIGINT and SIGTERM delivered."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.skipif(
    not os.path.exists("/proc/self/maps"), reason="finds the moment torch loads through /proc"
)
def test_ctrl_c_during_start_up_is_a_clean_exit(ckpt, tmp_path) -> None:
    args = ["eval", "base + 0.5*(ft - base)", "--bind", f"base={ckpt['base']}", "--bind", f"ft={ckpt['ft']}"]
    args += ["--kernels", "eager"]  # the compiled path never loads torch: the eager one does, slowly
    proc = subprocess.Popen(
        [*_python(), *args, "-o", str(tmp_path / "o")],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_signals_as_a_shell,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # wait until torch is being loaded
        with open(f"/proc/{proc.pid}/maps") as maps:
            if "libtorch" in maps.read():
                break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err and not (tmp_path / "o").exists()


# -- 8. signals and leftovers ----------------------------------------------------------------------


def _temporaries(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".tvlang-" in n]


def test_sigterm_aborts_and_cleans_up(tmp_path) -> None:
    big = make_family(str(tmp_path / "big"), NAMES, llama_shapes(hidden=256, layers=4, vocab=2048))
    out = tmp_path / "out"
    args = ["eval", "base + 0.5*(ft - base)", "--bind", f"base={big['base']}", "--bind", f"ft={big['ft']}"]
    # eager kernels on tiny chunks: slow enough to be caught while writing
    slow = ["--kernels", "eager", "--chunk", "4096", "--threads", "1", "-q"]
    proc = subprocess.Popen(
        [*_python(), *args, *slow, "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_signals_as_a_shell,
    )
    deadline = time.monotonic() + 60
    while not _temporaries(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert not out.exists() and _temporaries(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_removed(ckpt, tmp_path, capsys) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tvlang-tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".out.tvlang-tmp-{os.getpid()}-89abcdef"  # a live run's: never touched
    alive.mkdir()
    code, err = merge(ckpt, str(tmp_path / "out"), capsys)
    assert code == 0 and not stale.exists() and alive.exists()
    assert f"removed {stale}, left by an interrupted run (process {dead.pid})" in err


def test_free_space_is_checked_for_all_outputs_together(ckpt, tmp_path, monkeypatch) -> None:
    import shutil as shutil_module

    import tvlang

    prog = tvlang.compile(
        "param lam = 0.5\nbase + lam*(ft - base)", bindings={"base": ckpt["base"], "ft": ckpt["ft"]}
    )
    one = prog.plan(params={"lam": 0.5}).outputs[0].nbytes
    real = shutil_module.disk_usage

    def tight(path: str) -> object:
        return real(path)._replace(free=int(one * 1.5))

    monkeypatch.setattr("tvlang.io.safetensors.shutil.disk_usage", tight)
    prog.run(str(tmp_path / "one"), params={"lam": 0.5})  # one output fits
    with pytest.raises(tvlang.TvOutputError, match=r"needs \d+ bytes but only \d+ are free") as err:
        prog.run(str(tmp_path / "two"), params={"lam": [0.25, 0.75]})
    assert "2 outputs" in str(err.value)
    assert not (tmp_path / "two").exists()
