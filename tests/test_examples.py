"""Every example program runs through the CLI on generated checkpoints."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
from safetensors.torch import load_file

from tvlang import cli
from tvlang.synth import llama_shapes, make_family, make_lora_adapter

from .conftest import NAMES

# examples/hub reads the Hugging Face cache: tests/test_hub.py runs it against a cache fixture.
EXAMPLES = sorted(
    p
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*", "*.tv"))
    if os.sep + "hub" + os.sep not in p
)


@pytest.mark.parametrize("program", EXAMPLES, ids=os.path.basename)
def test_example_runs(program: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    shapes = llama_shapes(32, 2, 64)
    make_family(str(tmp_path / "ckpt"), NAMES, shapes, layout="dir", base_shards=2)
    make_lora_adapter(str(tmp_path / "ckpt" / "adapter"), shapes)  # for examples/lora
    local = tmp_path / os.path.basename(program)
    shutil.copy(program, local)
    assert cli.main(["check", str(local)]) == 0
    assert cli.main(["run", str(local), "-o", str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err
    written = [
        os.path.relpath(os.path.join(d, f), tmp_path / "out")
        for d, _, fs in os.walk(tmp_path / "out")
        for f in fs
    ]
    assert any(f.endswith(".safetensors") for f in written), written


def test_soup_outputs_have_expected_kinds(tmp_path) -> None:
    make_family(str(tmp_path / "ckpt"), NAMES, llama_shapes(32, 2, 64), layout="file")
    program = next(p for p in EXAMPLES if p.endswith("soup_and_forget.tv"))
    shutil.copy(program, tmp_path / "p.tv")
    assert cli.main(["run", str(tmp_path / "p.tv"), "-o", str(tmp_path / "out"), "-q"]) == 0
    vec = load_file(str(tmp_path / "out" / "toxic_vector.safetensors"))
    base = load_file(str(tmp_path / "ckpt" / "base.safetensors"))
    toxic = load_file(str(tmp_path / "ckpt" / "toxic.safetensors"))
    name = next(iter(vec))
    assert (vec[name].float() - (toxic[name].float() - base[name].float())).abs().max() < 1e-2
