"""``tvlang plan`` output and its generated C kernels against golden files (tests/golden/plan/):
each NAME.tv, planned on tiny synthetic checkpoints, gives NAME.plan.txt (the full plan) and
NAME.c.txt (``--stage c``).  The checkpoints' directory prints as ``<dir>``.
``TVLANG_REGEN_GOLDEN=1`` rewrites them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tvlang
from tests.conftest import golden
from tvlang import passes
from tvlang.cli import main
from tvlang.errors import TvParamError
from tvlang.ir import Graph, verify
from tvlang.passes import STAGES
from tvlang.synth import make_family

HERE = Path(__file__).parent / "golden" / "plan"
CASES = sorted(p.stem for p in HERE.glob("*.tv"))
SHAPES = {
    "embed.weight": (40, 8),
    "layers.0.mlp.weight": (8, 8),
    "layers.0.norm.weight": (8,),
    "lm_head.weight": (100, 96),  # 9,600 elements: several chunks of 4,096 under a 64K budget
}
# pinned so the plan does not depend on the machine (its CPUs, a C compiler)
PINNED = ["--threads", "2", "--kernels", "eager"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plan-golden")
    make_family(str(d), ("base", "a", "b"), SHAPES, dtype=torch.bfloat16)
    for case in CASES:
        shutil.copy(HERE / f"{case}.tv", d / f"{case}.tv")
    return d


def _plan(capsys: pytest.CaptureFixture[str], workdir: Path, *args: str) -> str:
    assert main(["plan", *args, *PINNED]) == 0
    return capsys.readouterr().out.replace(str(workdir) + os.sep, "<dir>/").replace(str(workdir), "<dir>")


@pytest.mark.parametrize("case", CASES)
def test_plan_matches_golden(case: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    golden(f"plan/{case}.plan.txt", _plan(capsys, workdir, str(workdir / f"{case}.tv")))


@pytest.mark.parametrize("case", CASES)
def test_c_kernels_match_golden(case: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    golden(f"plan/{case}.c.txt", _plan(capsys, workdir, str(workdir / f"{case}.tv"), "--stage", "c"))


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason='triton is not installed ("tvlang[gpu]")'
)
def test_cuda_plan_matches_golden(workdir: Path) -> None:
    """``--device cuda`` (here in Triton's interpreter) plans the GPU's chunks, a staging slot's share
    of the budget in whole 4096-element blocks, and says where they run (tests/triton_checks.py's
    ``plan_chunks_are_streamed`` checks that the executor streams exactly these)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    args = [str(workdir / "linear.tv"), "--device", "cuda", "--memory", "64K", "--stage", "plan", *PINNED]
    proc = subprocess.run(
        [sys.executable, "-m", "tvlang", "plan", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.replace(str(workdir) + os.sep, "<dir>/")
    assert "3 chunks of 4,096" in out and "interpreter (on the CPU), chunks through 3 staging slots" in out
    golden("plan/linear.cuda.txt", out)


def test_each_stage_alone(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--stage`` prints one stage: the pieces of the full output, the IR after each pass, and
    ``--triton`` is ``--stage triton``."""
    tv = str(workdir / "ties.tv")
    full = _plan(capsys, workdir, tv)
    out = {stage: _plan(capsys, workdir, tv, "--stage", stage) for stage in STAGES}
    assert out["source"] == (HERE / "ties.tv").read_text()
    written, rest = full.split("\n\n# IR after passes (fold_constants, linearize)\n")
    assert out["written"] == written.removeprefix("# IR as written\n") + "\n"
    after, plan = rest.split("\n\n# plan\n")
    assert out["plan"] == plan
    assert out["passes"].startswith("# IR after fold_constants\n%0 = input base")
    assert out["passes"].endswith("# IR after linearize\n" + after + "\n")
    assert out["c"] == (HERE / "ties.c.txt").read_text()
    assert "@triton.jit" in out["triton"] and out["triton"] == _plan(capsys, workdir, tv, "--triton")


def test_unknown_stage_is_an_error(workdir: Path) -> None:
    program = tvlang.compile_file(str(workdir / "linear.tv"))
    with pytest.raises(TvParamError, match="unknown stage 'ir'") as info:
        program.explain(stage="ir")
    assert info.value.code == "E402"


def test_verify_switch_runs_the_verifier_after_every_pass(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TVLANG_VERIFY=1``: the IR verifier checks the graph as written and after each pass."""
    seen: list[Graph] = []

    def counting(graph: Graph) -> None:
        seen.append(graph)
        verify(graph)

    monkeypatch.setattr(passes, "verify", counting)
    tv = str(workdir / "linear.tv")
    _plan(capsys, workdir, tv, "--stage", "passes")
    assert seen == []
    monkeypatch.setenv(passes.VERIFY_ENV, "1")
    _plan(capsys, workdir, tv, "--stage", "passes")
    assert len(seen) == 1 + len(passes.PIPELINE)
