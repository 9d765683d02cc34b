"""Safety guarantees (docs/safety.md): non-finite values, kill -9 and Ctrl-C, a full disk,
determinism, hostile source text, and load() confined to its roots."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tvlang
import tvlang.api
import tvlang.executors
import tvlang.io.safetensors as st_mod
import tvlang.runtime
from tvlang import cli
from tvlang.backends.cpu import Scratch, all_finite
from tvlang.errors import TvError

from .conftest import MISSION, NAMES

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def binds(files: dict[str, str]) -> list[str]:
    out = ["--bind", f"base={files['base']}"]
    for n in NAMES[1:]:
        out += ["--task", f"{n}={files[n]}"]
    return out


def sha256_of(path: str | Path) -> str:
    """Of a file, or of a directory's files (names and contents, in name order)."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------


def _poisoned(tmp_path: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """A clean base and a fine-tune with NaN and ±inf in two tensors (spread over several chunks)."""
    base = {f"t{i}": torch.linspace(-1, 1, 10_000).bfloat16() for i in range(3)}
    ft = {k: (v.float() + 0.01).bfloat16() for k, v in base.items()}
    ft["t0"][[5, 5000, 9999]] = float("nan")
    ft["t0"][7000] = float("inf")
    ft["t2"][[1, 2]] = -float("inf")
    a, b = str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors")
    save_file(base, a)
    save_file(ft, b)
    return a, b, ft


def test_nonfinite_input_is_an_error_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = _poisoned(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(
        capsys, "eval", "base + 0.5*(ft - base)", "--bind", f"base={a}", "--bind", f"ft={b}",
        "-o", str(out / "m.safetensors"), "-q", "--threads", "2", "--chunk", "1000",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert "error[E308]" in err and "input `ft`" in err and b in err
    # the count covers the whole tensor, not just the chunk where the run stopped
    assert "tensor `t0`" in err and "3 NaN" in err and "1 ±inf" in err
    assert os.listdir(out) == []  # the usual abort path: nothing committed, no temporary left


def test_nonfinite_warn_writes_and_summarises_per_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, ft = _poisoned(tmp_path)
    out = str(tmp_path / "m.safetensors")
    code, err = run_cli(
        capsys, "eval", "base + 0.5*(ft - base)", "--bind", f"base={a}", "--bind", f"ft={b}",
        "-o", out, "-q", "--threads", "2", "--chunk", "1000", "--nonfinite", "warn",
    )  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning")]
    assert lines == [
        f"warning[E308]: tensor `t0`: input `ft` ({b}) has 3 NaN and 1 ±inf values (propagated)",
        f"warning[E308]: tensor `t2`: input `ft` ({b}) has 2 ±inf values (propagated)",
    ]
    got = load_file(out)
    assert torch.equal(torch.isnan(got["t0"]), torch.isnan(ft["t0"]))  # propagated where they were
    assert int(torch.isinf(got["t2"]).sum()) == 2


def test_nonfinite_propagate_is_silent_and_bits_match_warn(tmp_path: Path) -> None:
    a, b, _ = _poisoned(tmp_path)
    results = {
        mode: tvlang.evaluate("base + 0.5*(ft - base)", {"base": a, "ft": b}, nonfinite=mode, chunk=999)
        for mode in ("warn", "propagate")
    }
    for k, t in results["warn"].items():
        assert torch.equal(t.view(torch.int16), results["propagate"][k].view(torch.int16))


def test_counts_are_exact_across_chunks_threads_and_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50_000, generator=gen), "v": torch.randn(333, generator=gen)}
    ft = {k: v.clone() for k, v in base.items()}
    mask = torch.rand(50_000, generator=gen) < 0.01
    ft["w"][mask] = float("nan")
    ft["w"][:17] = float("inf")
    nan, inf = int(torch.isnan(ft["w"]).sum()), int(torch.isinf(ft["w"]).sum())
    prog = tvlang.compile(
        "output one = base + 0.3*(ft - base)\noutput two = base - 0.1*(ft - base)",
        bindings={"base": base, "ft": ft},
    )
    prog.run(options=tvlang.Options(nonfinite="warn", threads=2, chunk=777))
    err = capsys.readouterr().err
    # two outputs read the same chunk: the input is counted once, not once per output
    assert err.splitlines() == [
        f"warning[E308]: tensor `w`: input `ft` (memory) has {nan:,} NaN and {inf} ±inf values (propagated)"
    ]


def test_overflow_when_rounding_is_e309(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(tmp_path / "wide.safetensors")
    save_file({"w": torch.tensor([1e5, 1.0, -7e4, 65504.0]), "ids": torch.arange(3)}, src)
    out = tmp_path / "o"
    out.mkdir()
    code, err = run_cli(
        capsys, "eval", "a", "--bind", f"a={src}", "--dtype", "fp16", "-o", str(out / "x"), "-q"
    )
    assert code == 1 and "error[E309]" in err and "tensor `w`" in err
    assert "2 finite results overflow to ±inf when rounded to F16" in err and "--dtype fp32" in err
    assert os.listdir(out) == []
    code, err = run_cli(
        capsys, "eval", "a", "--bind", f"a={src}", "--dtype", "fp16", "-o", str(out / "x"), "-q",
        "--nonfinite", "warn",
    )  # fmt: skip
    assert code == 0 and err.count("warning[E309]") == 1
    assert load_file(str(out / "x" / "model.safetensors"))["w"].tolist() == [
        math.inf,
        1.0,
        -math.inf,
        65504.0,
    ]


def test_overflow_in_the_accumulator_is_e309() -> None:
    big = {"w": torch.tensor([3e38, 1.0]).bfloat16()}
    neg = {"w": torch.tensor([-3e38, 1.0]).bfloat16()}
    with pytest.raises(tvlang.TvInputError) as info:
        tvlang.evaluate("a + b - c", {"a": big, "b": big, "c": neg})
    assert (
        info.value.code == "E309" and "1 sum of finite inputs overflows the accumulator" in info.value.message
    )
    # fp32 output accumulates in float64, where the same sum is finite (and then overflows in rounding)
    with pytest.raises(tvlang.TvInputError, match="rounded to F32"):
        tvlang.evaluate("a + b - c", {"a": big, "b": big, "c": neg}, dtype="fp32")


def test_nonfinite_option_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(tvlang.TvParamError) as info:
        tvlang.evaluate("a", {"a": {"w": torch.zeros(1)}}, nonfinite="ignore")
    assert info.value.code == "E402"
    with pytest.raises(SystemExit):
        cli.main(["eval", "a", "--bind", "a=x", "-o", "y", "--nonfinite", "ignore"])
    capsys.readouterr()


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn],
)
def test_all_finite_finds_every_position_and_kind(dtype: torch.dtype) -> None:
    scratch = Scratch()
    bads = [math.nan] if dtype == torch.float8_e4m3fn else [math.nan, math.inf, -math.inf]
    for n in (1, 2, 15, 64, 4099):
        x = torch.zeros(n, dtype=dtype)
        assert all_finite(x, scratch)
        for pos in {0, n // 2, n - 1}:
            for bad in bads:
                y = x.clone()
                y[pos] = bad
                assert not all_finite(y, scratch), (n, pos, bad)
    assert all_finite(torch.empty(0, dtype=dtype), scratch)


def test_check_reuses_its_buffers() -> None:
    """The hot-path check allocates nothing per chunk: its two result tensors are reused."""
    scratch = Scratch()
    x = torch.randn(1000).bfloat16()
    all_finite(x, scratch)
    lo, hi = scratch.bounds(torch.bfloat16)
    ptrs = (lo.data_ptr(), hi.data_ptr())
    for _ in range(3):
        all_finite(x, scratch)
    assert (lo.data_ptr(), hi.data_ptr()) == ptrs and scratch.bounds(torch.bfloat16)[0] is lo


# ------------------------------------------------------------------------------------------
# kill -9 and Ctrl-C
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three 16 MiB checkpoints: with --chunk 256 --threads 1 a merge takes several seconds."""
    d = tmp_path_factory.mktemp("slow")
    paths = {}
    for i, name in enumerate("abc"):
        paths[name] = str(d / f"{name}.safetensors")
        save_file(
            {f"t{j}": torch.full((1 << 20,), float(i + j), dtype=torch.bfloat16) for j in range(8)},
            paths[name],
        )
    return paths


def _start(slow_inputs: dict[str, str], out: Path, *extra: str) -> subprocess.Popen[str]:
    args = ["eval", "a + 0.5*(b - c)", *(f"--bind={k}={v}" for k, v in slow_inputs.items())]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "tvlang", *args, "-o", str(out), "-q", "--chunk", "256", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_temp(proc: subprocess.Popen[str], directory: Path, timeout: float = 120) -> None:
    """Until the writer's hidden temporary sibling exists (data is being written), then a little more."""
    deadline = time.monotonic() + timeout
    while not any(".tvlang-tmp-" in n for n in os.listdir(directory)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be interrupted: make it slower"


@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_mid_run_never_exposes_a_partial_output(
    slow_inputs: dict[str, str], tmp_path: Path, previous: bool
) -> None:
    out = tmp_path / "merged.safetensors"
    before = None
    if previous:  # an earlier output at the path, being replaced with --force
        tvlang.evaluate("a + 0.25*(b - c)", slow_inputs, out=out)
        before = sha256_of(out)
    proc = _start(slow_inputs, out, "--threads", "1", *(["--force"] if previous else []))
    try:
        _wait_for_temp(proc, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert sha256_of(out) == before  # the old output is untouched, byte for byte
    else:
        assert not out.exists()
    # A killed process cannot clean up: only its hidden temporary may remain (docs/safety.md).
    leftovers = [n for n in os.listdir(tmp_path) if n != out.name]
    assert leftovers and all(n.startswith(".merged.safetensors.tvlang-tmp-") for n in leftovers)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_ctrl_c_mid_run_exits_130_and_leaves_nothing(
    slow_inputs: dict[str, str], tmp_path: Path, threads: str
) -> None:
    out = tmp_path / "merged"
    proc = _start(slow_inputs, out, "--threads", threads)
    try:
        _wait_for_temp(proc, tmp_path)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: no output was written" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # no output, and the temporary directory was removed


def test_ctrl_c_stops_worker_threads_promptly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt in the main thread (waiting on workers) stops them after their chunk,
    rather than letting them finish the whole merge before the abort."""
    state = {"w": torch.ones(200_000), "v": torch.ones(200_000)}
    calls = {"n": 0, "at_interrupt": 0}
    real = tvlang.runtime.write_to_sink  # both kernel paths write through it
    main = threading.main_thread().ident
    assert main is not None

    def counting(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 10:
            calls["at_interrupt"] = calls["n"]
            signal.pthread_kill(main, signal.SIGINT)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tvlang.runtime, "write_to_sink", counting)
    with pytest.raises(KeyboardInterrupt):
        tvlang.evaluate(
            "0.5*a + 0.5*b", {"a": state, "b": state}, out=tmp_path / "o.safetensors", threads=2, chunk=100
        )
    # the workers stop within a few GIL switches (measured: ~150 of the 4,000 chunks; all of them before)
    assert calls["n"] - calls["at_interrupt"] < 1000
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = where / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _pair(tmp_path: Path, numel: int) -> list[str]:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(numel, dtype=torch.bfloat16)}, str(a))
    save_file({"w": torch.zeros(numel, dtype=torch.bfloat16)}, str(b))
    return ["--bind", f"a={a}", "--bind", f"b={b}"]


def test_disk_full_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with small_tmpfs(tmp_path) as mnt:
        code, err = run_cli(
            capsys, "eval", "0.5*a + 0.5*b", *_pair(tmp_path, 1_500_000), "-o", str(mnt / "m"), "-q"
        )
        assert code == 1 and "error[E500]" in err and "are free" in err and "Traceback" not in err
        assert os.listdir(mnt) == []


@pytest.mark.parametrize("name", ["m.safetensors", "m"])
def test_disk_full_while_writing_real(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The free-space check passes, then something else fills the disk before the data is written."""
    with small_tmpfs(tmp_path) as mnt:
        real = tvlang.executors.execute  # the local executor's runtime

        def fill_then_execute(*args: object, **kwargs: object) -> object:
            with open(mnt / "filler", "wb") as f:
                f.write(b"x" * 1_500_000)
            return real(*args, **kwargs)

        monkeypatch.setattr(tvlang.executors, "execute", fill_then_execute)
        out = mnt / name
        code, err = run_cli(capsys, "eval", "0.5*a + 0.5*b", *_pair(tmp_path, 500_000), "-o", str(out), "-q")
        assert code == 1 and "Traceback" not in err, err
        assert f"error[E503]: disk full while writing {out}\n" in err
        assert os.listdir(mnt) == ["filler"]


@pytest.mark.parametrize("name", ["m.safetensors", "m"])
@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errno.ENOSPC, "error[E503]: disk full while writing {out}\n"),
        (errno.EIO, "error[E500]: {out}: cannot write: "),
    ],
)
def test_disk_full_while_writing_simulated(
    bf16_files: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    err: int,
    expected: str,
) -> None:
    real = os.pwrite
    calls = 0

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 12:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(st_mod.os, "pwrite", pwrite)
    out = tmp_path / "o" / name
    out.parent.mkdir()
    code, stderr = run_cli(
        capsys, "eval", MISSION, *binds(bf16_files), "-o", str(out), "-q", "--threads", "2", "--chunk", "500",
        "--shard-size", "40K",
    )  # fmt: skip
    assert calls > 12 and code == 1 and "Traceback" not in stderr
    assert expected.format(out=out) in stderr  # the output, never a temporary
    assert os.strerror(err) in stderr and ".tvlang-tmp-" not in stderr
    assert os.listdir(out.parent) == []


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["m.safetensors", "m"])
def test_output_files_are_bit_identical(bf16_files: dict[str, str], tmp_path: Path, layout: str) -> None:
    variants = [
        {},
        {},  # the same run again
        {"chunk": 7, "threads": 2},
        {"chunk": 4096, "threads": 2},
        {"chunk": 1000, "threads": 3},
        {"memory": 64 << 10, "threads": 1},
        {"memory": 1 << 30, "threads": 2},
        {"nonfinite": "propagate", "chunk": 333},
    ]
    digests = set()
    for i, opts in enumerate(variants):
        out = tmp_path / str(i) / layout
        out.parent.mkdir()
        tvlang.evaluate(MISSION, _api_bindings(bf16_files), out=out, shard_size=20_000, **opts)
        digests.add(sha256_of(out))
    assert len(digests) == 1


def _api_bindings(files: dict[str, str]) -> dict[str, object]:
    return {"base": files["base"], **{n: tvlang.task_vector(files[n]) for n in NAMES[1:]}}


# ------------------------------------------------------------------------------------------
# Hostile source text
# ------------------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("TVLANG_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKENS = [
    *("a", "b", "base", "lam", "x", "load", "delta", "param", "output", "out", "__import__", "open", "os"),
    *("0", "1", "2", "0.5", "1e308", "1e-320", "9", "-1", ".5", "1_0", "0x1", "nan", "inf"),
    *("+", "-", "*", "/", "**", "(", ")", ",", "=", "\n", "#", "\\\n", " ", "  ", "\t"),
    *('"a"', "'b'", '"../x"', '"/etc/passwd"', '"a.bin"', '"', "'", '"\\q"', '"\\n"'),
    *("@", "$", ".", ";", ":", "[", "]", "{", "}", "`", "\\", "\x00", "\r", "\u202e", "λ", "é", "\ufeff"),
]
VALID = [
    "a",
    "base + 0.4*(a - base) - 0.1*(b - base)",
    "param lam = 0.3\noutput o = base + lam*(a - base)",
    "x = a - base\ny = b - base\noutput m = base + 0.5*(x + y)\noutput d = x - y",
    'output o = load("a") + (b - base)',
    "0.5*a + 0.5*b",
    "(\n  a\n  + b\n) - base  # comment",
    "param k = 2**-1\nk*a + (1 - k)*b",
    "delta_b = b - base\nbase + lam*delta_b",
]


@pytest.fixture(scope="module")
def fuzz_env() -> Iterator[tuple[str, dict[str, object]]]:
    """A directory with nothing in it (so load() paths resolve nowhere) and in-memory bindings."""
    with tempfile.TemporaryDirectory() as d:
        sd = {"w": torch.zeros(2), "v": torch.zeros(3)}
        yield os.path.join(d, "fuzz.tv"), {"base": sd, "a": dict(sd), "b": dict(sd), "lam": 0.3}


# Bugs the fuzzer found in code outside this hardening pass (parser, lowering), each with a
# strict xfail reproducer in test_known_crashes below.  Remove an entry when its bug is fixed.
# Crashes outside TvError the fuzzer has found and that are not fixed yet (none at present):
# (exception type, text in its message).
KNOWN_CRASHES: list[tuple[type[BaseException], str]] = []


def _known(e: BaseException) -> bool:
    e = getattr(e, "orig_exc", None) or e  # lark wraps errors raised in its transformers
    return any(isinstance(e, t) and not isinstance(e, TvError) and s in str(e) for t, s in KNOWN_CRASHES)


def _only_tv_errors(text: str, env: tuple[str, dict[str, object]]) -> None:
    filename, bindings = env
    try:
        tvlang.compile(text, filename=filename, bindings=bindings).graph()
        event("compiled")
    except TvError as e:
        assert e.code.startswith("E") and e.render()  # renders, span and all
        event(f"TvError {e.code}")
    except Exception as e:
        if not _known(e):
            raise
        event(f"known crash {type(e).__name__}")


@FUZZ
@given(text=st.lists(st.sampled_from(TOKENS), max_size=40).map("".join))
def test_fuzz_token_soup_raises_only_tv_errors(fuzz_env: tuple[str, dict[str, object]], text: str) -> None:
    _only_tv_errors(text, fuzz_env)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 8)))
        how = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        piece = draw(st.sampled_from(TOKENS) | st.text(max_size=3))
        if how == "delete":
            text = text[:i] + text[j:]
        elif how == "insert":
            text = text[:i] + piece + text[i:]
        elif how == "replace":
            text = text[:i] + piece + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@FUZZ
@given(text=mutated())
def test_fuzz_mutated_programs_raise_only_tv_errors(
    fuzz_env: tuple[str, dict[str, object]], text: str
) -> None:
    _only_tv_errors(text, fuzz_env)


NUMBERS = st.sampled_from(["0", "1", "2", "0.5", "3", "1e308", "1e-308", "5e-324", "1e400", "1e-12", "0.0"])
ATOMS = st.one_of(
    NUMBERS, st.sampled_from(["a", "b", "base", "lam", "nope", '"a"', 'load("a")', 'delta("b")'])
)


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.tuples(children, st.sampled_from(["+", "-", "*", "/", "**"]), children).map(
        lambda t: f"{t[0]} {t[1]} {t[2]}"
    )
    call = st.tuples(
        st.sampled_from(["load", "delta", "f", "__import__"]), st.lists(children, max_size=2)
    ).map(lambda t: f"{t[0]}({', '.join(t[1])})")
    return st.one_of(binary, children.map(lambda c: f"({c})"), children.map(lambda c: f"-{c}"), call)


EXPRESSIONS = st.recursive(ATOMS, _combine, max_leaves=12)


SCALARS = st.recursive(
    st.one_of(NUMBERS, st.just("lam")),
    lambda c: (
        st.tuples(c, st.sampled_from(["+", "-", "*", "/", "**"]), c).map(lambda t: f"({t[0]}){t[1]}({t[2]})")
        | c.map(lambda x: f"-{x}")
    ),
    max_leaves=6,
)


@st.composite
def grammatical(draw: st.DrawFn) -> str:
    """Programs that parse, mostly: reach the checker, constant folding and the passes."""
    lines = []
    for i in range(draw(st.integers(0, 2))):
        keyword = draw(st.sampled_from(["", "param ", "output "]))
        lines.append(f"{keyword}v{i} = {draw(SCALARS if keyword == 'param ' else EXPRESSIONS)}")
    last = draw(st.one_of(EXPRESSIONS, SCALARS.map(lambda k: f"base + ({k})*(a - base)")))
    lines.append(("output o = " if any(line.startswith("output") for line in lines) else "") + last)
    return "\n".join(lines)


@FUZZ
@given(text=grammatical())
def test_fuzz_grammatical_programs_raise_only_tv_errors(
    fuzz_env: tuple[str, dict[str, object]], text: str
) -> None:
    _only_tv_errors(text, fuzz_env)


@pytest.mark.parametrize(
    "text",
    [
        "-" * 3000 + "a",
        "+".join(["a"] * 5000),
        "(-8)**0.5*(a - b) + a",
        'load("' + "n" * 300 + '")',
    ],
    ids=["unary-chain", "sum-chain", "complex", "long-name"],
)
def test_former_crashes_are_tv_errors(fuzz_env: tuple[str, dict[str, object]], text: str) -> None:
    """Inputs the fuzzer once crashed on (RecursionError, complex numbers, NAME_MAX) now get a TvError."""
    filename, bindings = fuzz_env
    with pytest.raises(TvError) as info:
        tvlang.compile(text, filename=filename, bindings=bindings).graph()
    assert info.value.span is not None


# ------------------------------------------------------------------------------------------
# Untrusted programs: load() confined to roots, no way to call anything but the builtins
# ------------------------------------------------------------------------------------------


@pytest.fixture
def jail(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    save_file({"w": torch.ones(2)}, str(root / "ok.safetensors"))
    save_file({"w": torch.ones(2)}, str(outside / "secret.safetensors"))
    (root / "escape").symlink_to(outside)  # a symlink inside the root pointing out of it
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    return root, outside


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret",
        "../outside/secret.safetensors",
        "escape/secret",
        "escape",
        "./x/../../outside/secret",
    ],
)
def test_roots_reject_dotdot_and_symlink_escapes(jail: tuple[Path, Path], path: str) -> None:
    root, outside = jail
    if path == "./x/../../outside/secret":
        (root / "x").mkdir()
    prog = tvlang.compile(f'load("{path}")', filename=str(root / "p.tv"))
    with pytest.raises(tvlang.TvInputError) as info:
        prog.run(options=tvlang.Options(roots=(str(root),)))
    assert info.value.code == "E305" and str(outside) in info.value.render()
    assert prog.run(options=tvlang.Options()) is not None  # the same path, readable without roots


def test_roots_apply_to_absolute_paths_and_bindings(jail: tuple[Path, Path]) -> None:
    root, outside = jail
    opts = tvlang.Options(roots=(str(root),))
    secret = str(outside / "secret.safetensors")
    with pytest.raises(tvlang.TvInputError, match="outside the directories"):
        tvlang.compile(f'load("{secret}")', filename=str(root / "p.tv")).run(options=opts)
    with pytest.raises(tvlang.TvInputError, match="outside the directories"):
        tvlang.compile("a", bindings={"a": secret}).run(options=opts)
    assert tvlang.compile('load("ok")', filename=str(root / "p.tv")).run(options=opts)["w"].tolist() == [1, 1]


def test_roots_reject_symlinks_inside_a_checkpoint_directory(jail: tuple[Path, Path], tmp_path: Path) -> None:
    root, outside = jail
    ck = root / "ck"
    ck.mkdir()
    (ck / "model.safetensors").symlink_to(outside / "secret.safetensors")
    (outside / "secret.txt").write_text("secret")
    (ck / "config.json").symlink_to(outside / "secret.txt")
    prog = tvlang.compile('load("ck")', filename=str(root / "p.tv"))
    with pytest.raises(tvlang.TvInputError) as info:
        prog.run(tmp_path / "out", options=tvlang.Options(roots=(str(root),)))
    assert info.value.code == "E305" and not (tmp_path / "out").exists()
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").write_bytes((outside / "secret.safetensors").read_bytes())
    with pytest.raises(tvlang.TvInputError, match=r"config\.json"):  # the side file alone is caught too
        prog.run(tmp_path / "out", options=tvlang.Options(roots=(str(root),)))


@pytest.mark.parametrize(
    "name", ["__import__", "open", "eval", "exec", "getattr", "print", "compile", "breakpoint"]
)
def test_no_way_to_call_anything_but_builtins(name: str) -> None:
    with pytest.raises(tvlang.TvNameError) as info:
        tvlang.compile(f'{name}("os")', bindings={"a": {"w": torch.zeros(1)}}).graph()
    assert info.value.code == "E200" and f"unknown function `{name}`" in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        '__import__("os").system("touch MARKER")',
        "a.__class__",
        "load.__globals__",
        "[x for x in a]",
        "lambda: a",
        "a[0]",
        "a if a else a",
        "f'{a}'",
        "a; b",
        "{}",
        "a := b",
    ],
)
def test_python_syntax_is_not_tvlang(text: str, tmp_path: Path) -> None:
    marker = tmp_path / "touched"
    with pytest.raises(TvError) as info:
        tvlang.compile(text.replace("MARKER", str(marker)), bindings={"a": {"w": torch.zeros(1)}}).graph()
    assert info.value.code.startswith(("E1", "E2"))
    assert not marker.exists()


def test_input_count_limit(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    lines = [f'm{i} = load("x")' for i in range(4097)]
    prog = tvlang.compile("\n".join([*lines, "output o = m0"]), filename=str(tmp_path / "p.tv"))
    with pytest.raises(tvlang.TvInputError) as info:
        prog.graph()
    assert info.value.code == "E306"
