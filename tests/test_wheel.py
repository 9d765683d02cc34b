"""The built wheel carries the grammar: an installed tvlang parses without the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_wheel_parses(tmp_path) -> None:
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (pip install -e '.[test]')")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            ROOT,
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("tvlang-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "tvlang/grammar/tvlang.lark" in zf.namelist()
        zf.extractall(tmp_path / "site")
    code = (
        "import tvlang, tvlang.syntax.parser as p;"
        "assert tvlang.__file__.startswith({!r}), tvlang.__file__;"
        "print(len(p.parse('output o = base + 0.4*(ft - base)').statements))".format(str(tmp_path / "site"))
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"
