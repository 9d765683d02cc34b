"""The GPU backend: generated Triton kernels and the streaming executor, against the CPU backend.

The kernels run in Triton's interpreter on CPU tensors, in one subprocess (``TRITON_INTERPRET=1``
must be set before triton is imported, and an interpreter crash must not take pytest down); it
runs every check of tests/triton_checks.py and reports each as JSON.  ``TVLANG_TEST_DEVICE=cuda``
runs the same checks on a real GPU instead (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import tvlang
from tests.triton_checks import CHECKS
from tvlang.cli import main
from tvlang.codegen.spec import task_spec
from tvlang.codegen.triton import kernel_name, triton_source

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = os.environ.get("TVLANG_TEST_DEVICE", "interpret")
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason='triton is not installed (pip install "tvlang[gpu]")'
)


@pytest.fixture(scope="module")
def checks() -> dict[str, Any]:
    script = os.path.join(os.path.dirname(__file__), "triton_checks.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, script, "--device", DEVICE], capture_output=True, text=True, timeout=900, env=env
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"the check script printed nothing (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    results: dict[str, Any] = json.loads(lines[-1])["results"]
    return results


@needs_triton
@pytest.mark.parametrize("name", list(CHECKS))
def test_gpu_backend_matches_cpu(checks: dict[str, Any], name: str) -> None:
    result = checks[name]
    assert result["ok"], f"{result['error']}\n{result['trace']}"


def _states(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(40, 3, generator=g).bfloat16(), "b": torch.randn(9, generator=g).bfloat16()}
            for _ in range(n)]  # fmt: skip


def test_generated_source_parses_and_reads_well() -> None:
    s = _states()
    prog = tvlang.compile(
        "base + 0.3*(a - base) + dare(b - base, 0.5, seed=1)", bindings={"base": s[0], "a": s[1], "b": s[2]}
    )
    plan = prog.plan()
    task = plan.tasks[0]
    bound = task_spec(task, {i: plan.inputs[i].tensors[task.name].dtype for i in task.reads})
    source = triton_source(bound.spec)
    tree = ast.parse(source)
    kernels = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == kernel_name(bound.spec)]
    assert len(kernels) == 1
    args = [a.arg for a in kernels[0].args.args]
    assert args[:3] == ["in0", "in1", "in2"] and "out0" in args and "k0" in args
    assert args[-3:] == ["start", "n", "BLOCK_SIZE"]
    for needle in (
        "BLOCK_SIZE: tl.constexpr",
        "p0: tl.float64" if bound.spec.params else "k0: tl.int64",
        "mask = offs < n",
        "tl.load(in0 + offs, mask=mask",
        "tl.store(out0 + offs",
        "libdevice.fma_rn(",
        "_round_bf16(",
        "_uniform(",
    ):
        assert needle in source, needle


def test_cli_plan_triton_prints_each_kernel(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from safetensors.torch import save_file

    s = _states()
    for name, sd in zip(("base", "a", "b"), s, strict=True):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    binds = [f"--bind={n}={tmp_path / n}.safetensors" for n in ("base", "a", "b")]
    assert main(["plan", "-e", "base + ties(a - base, b - base, density=0.5)", *binds, "--triton"]) == 0
    out = capsys.readouterr().out
    assert out.count("@triton.jit\ndef tv_kernel_") >= 2  # the reduction operands and the outputs
    assert "pass 1: reduction operands" in out and "element-wise pass" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error cannot happen")
def test_cli_device_cuda_without_cuda_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from safetensors.torch import save_file

    s = _states(2)
    for name, sd in zip(("base", "a"), s, strict=True):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    binds = [f"--bind={n}={tmp_path / n}.safetensors" for n in ("base", "a")]
    out = str(tmp_path / "out.safetensors")
    code = main(["eval", "base + 0.5*(a - base)", *binds, "-o", out, "--device", "cuda", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "no CUDA device is available" in err and 'pip install "tvlang[gpu]"' in err
    assert "E402" in err and not os.path.exists(out)
    # auto falls back to the CPU backend, which writes what --device cpu writes
    assert main(["eval", "base + 0.5*(a - base)", *binds, "-o", out, "--device", "auto", "-q"]) == 0
    cpu = str(tmp_path / "cpu.safetensors")
    assert main(["eval", "base + 0.5*(a - base)", *binds, "-o", cpu, "--device", "cpu", "-q"]) == 0
    with open(out, "rb") as f1, open(cpu, "rb") as f2:
        assert f1.read() == f2.read()


def test_device_option_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = _states(2)
    with pytest.raises(tvlang.TvError, match="unknown device") as info:
        tvlang.evaluate("base + 0.5*(a - base)", bindings={"base": s[0], "a": s[1]}, device="tpu")
    assert info.value.code == "E402"


def test_gpu_executor_on_cpu_tensors_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from tvlang.backends.gpu import execute_gpu

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = _states(2)
    plan = tvlang.compile("base + 0.5*(a - base)", bindings={"base": s[0], "a": s[1]}).plan()
    with pytest.raises(tvlang.TvError, match="interpreter") as info:
        execute_gpu(plan, [], [], device="cpu")
    assert info.value.code == "E402"


def test_inputs_on_another_device_are_refused() -> None:
    from tvlang.io.endpoints import memory_metas

    metas = memory_metas({"w": torch.zeros(2, 3)}, "x", "cuda")
    assert metas["w"].shape == (2, 3)
    with pytest.raises(tvlang.TvError, match="is on meta") as info:
        memory_metas({"w": torch.empty(3, device="meta")}, "x", "cuda")
    assert info.value.code == "E307"


def test_kernels_take_weights_as_arguments() -> None:
    """Merges that differ only in their coefficients generate the same kernel source (one compile)."""
    sources = []
    for lam in (0.1, -2.5):
        plan = tvlang.compile(
            f"base + {lam}*(a - base)", bindings=dict(zip(("base", "a"), _states(2), strict=True))
        ).plan()
        task = plan.tasks[0]
        bound = task_spec(task, {i: plan.inputs[i].tensors[task.name].dtype for i in task.reads})
        assert bound.spec.weights == (lam, 1.0)  # lam*(a - base) + 1*base
        sources.append(triton_source(bound.spec))
    assert sources[0] == sources[1]
    assert repr(0.1) not in sources[0] and "w0: tl.float64" in sources[0]


def test_kernel_dir_refuses_a_directory_others_can_write(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated kernels are imported (executed): never from a directory another user could write."""
    from tvlang.codegen import triton as tcg

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TVLANG_KERNEL_DIR", str(shared))
    monkeypatch.setattr(tcg, "_PRIVATE", [])
    chosen = tcg.kernel_dir()
    assert chosen != shared and (chosen.stat().st_mode & 0o077) == 0
    private = tmp_path / "mine"
    monkeypatch.setenv("TVLANG_KERNEL_DIR", str(private))
    assert tcg.kernel_dir() == private and (private.stat().st_mode & 0o077) == 0
