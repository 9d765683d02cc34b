"""The hot path never imports torch: CLI merges on the compiled CPU kernels, ``check`` and ``plan``.

Each command runs in a fresh process (tests/torch_free_runner.py), which reports whether torch
entered ``sys.modules``; every merge's files must equal, byte for byte, the same merge run with
``--kernels eager`` (the torch path, run in this process: torch is here already).
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tvlang.backends.device import gpu_possible
from tvlang.cli import main
from tvlang.codegen.c import compiler
from tvlang.demo import make_playground
from tvlang.synth import llama_shapes

pytestmark = pytest.mark.skipif(
    compiler() is None, reason="no C compiler: merges run on the eager (torch) path"
)

RUNNER = Path(__file__).with_name("torch_free_runner.py")
ROOT = Path(__file__).resolve().parents[1]

PROGRAMS = {
    "ties.tv": """\
base = load("ckpt/base")
a = load("ckpt/amazon_sent") - base
b = load("ckpt/yelp_lm") - base
c = load("ckpt/toxic") - base
output tensor_scope = base + ties(a, b, c, weights=[0.5, 0.3, 0.2], density=0.5)
output model_scope = base + ties(a, b, c, weights=[0.5, 0.3, 0.2], density=0.4, scope="model")
""",
    "dare.tv": """\
base = load("ckpt/base")
a = load("ckpt/amazon_sent") - base
b = load("ckpt/yelp_lm") - base
output dare_ties = base + dare_ties(a, b, weights=[0.6, 0.4], density=0.5, seed=3)
output dare_l1 = base + dare(a, 0.3, seed=1, rescale="l1")
""",
    "slerp.tv": """\
output s = slerp(load("ckpt/amazon_sent"), load("ckpt/yelp_lm"), 0.3)
""",
    "lora.tv": """\
base = load("ckpt/base")
ft = load("ckpt/amazon_sent")
output m = base + 0.5*(ft - base) + lora("ckpt/adapter")
""",
    "sweep.tv": """\
base = load("ckpt/base")
ft = load("ckpt/amazon_sent")
param lam = 0.4
output m = base + lam*(ft - base)
""",
}

# (name, arguments): every merge is run twice, compiled (torch-free) and eager (the reference)
MERGES = [
    ("linear, sharded HF in, single file out", ["run", "sentiment.tv", "-o", "{out}.safetensors"]),
    ("linear, sharded HF out", ["run", "sentiment.tv", "--shard-size", "200K", "-o", "{out}"]),
    ("ties, tensor and model scope", ["run", "ties.tv", "-o", "{out}"]),
    ("dare", ["run", "dare.tv", "-o", "{out}"]),
    ("slerp", ["run", "slerp.tv", "-o", "{out}"]),
    ("lora input", ["run", "lora.tv", "-o", "{out}"]),
    ("sweep", ["run", "sweep.tv", "--set", "lam=0.1,0.2", "-o", "{out}"]),
]


def run_cli(cwd: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(RUNNER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, done.stdout + done.stderr
    return report


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torch-free")
    make_playground(str(root), llama_shapes(hidden=64, layers=2, vocab=256))
    for name, text in PROGRAMS.items():
        (root / name).write_text(text)
    return root


def same_files(a: Path, b: Path) -> None:
    """Every file of output ``a`` equals ``b``'s (the model card names its own output: skipped)."""
    if a.is_file():
        assert filecmp.cmp(a, b, shallow=False), a.name
        return
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(n.suffix == ".safetensors" for n in names)
    for name in names:
        if name.name != "README.md":
            assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize(("label", "args"), MERGES, ids=[m[0] for m in MERGES])
def test_merge_without_torch_equals_the_torch_path(
    playground: Path, label: str, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slug = label.replace(" ", "_").replace(",", "")
    compiled = [a.format(out=f"compiled_{slug}") for a in args]
    eager = [a.format(out=f"eager_{slug}") for a in args]
    assert run_cli(playground, *compiled, "-q")["torch"] is False
    monkeypatch.chdir(playground)
    assert main([*eager, "-q", "--kernels", "eager"]) == 0
    out = next(a for a in compiled if a.startswith("compiled_"))
    same_files(playground / out, playground / out.replace("compiled_", "eager_", 1))


@pytest.mark.parametrize(
    "args",
    [
        ["check", "sentiment.tv"],
        ["plan", "ties.tv"],
        ["plan", "ties.tv", "--stage", "c"],
        ["run", "sentiment.tv", "--device", "auto", "-q", "-o", "auto.safetensors", "--force"],
    ],
    ids=["check", "plan", "plan --stage c", "run --device auto"],
)
def test_commands_without_torch(playground: Path, args: list[str]) -> None:
    if "auto" in args and gpu_possible():
        pytest.skip("a GPU driver is present: --device auto asks torch for the GPU")
    assert run_cli(playground, *args)["torch"] is False


def test_imports_without_torch() -> None:
    code = (
        "import sys, tvlang.api, tvlang.cli, tvlang.config, tvlang.plan, tvlang.runtime, tvlang.io, "
        "tvlang.io.lora, tvlang.io.lora_out, tvlang.io.vocab, tvlang.io.endpoints, tvlang.io.card, "
        "tvlang.hub, tvlang.io.overlap, tvlang.driver, tvlang.options; print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_random_keys_in_python_integers_match_the_int64_tensor_formula() -> None:
    import torch

    from tvlang.backends.interpreter import _hash_text, fmix64, random_key

    for seed in (0, 1, 7, 2**63 - 1, 2**63, 2**64 - 1, -5):
        for stream, tensor in (("a", "w"), ("dare_ties#1", "model.layers.0.mlp.up_proj.weight"), ("", "")):
            k = torch.tensor([(seed & 0xFFFFFFFFFFFFFFFF) - (1 << 64) if seed >= 1 << 63 else seed])
            k = fmix64(fmix64(k ^ _hash_text(stream)) ^ _hash_text(tensor))
            assert random_key(seed, stream, tensor) == int(k.item()), (seed, stream, tensor)


def test_order_keys_give_back_their_floats() -> None:
    import numpy as np
    import torch

    from tvlang.backends.reductions import key_to_float, order_keys

    values = np.array([0.0, -0.0, 1.5, -2.25, 3e-310, -1e300, np.inf, -np.inf, 1e-45, 7.0])
    for dtype, bits in ((torch.float64, 64), (torch.float32, 32)):
        t = torch.from_numpy(values).to(dtype)
        keys = order_keys(t).tolist()
        back = [key_to_float(k & ((1 << bits) - 1), bits) for k in keys]
        assert back == t.tolist() and [np.signbit(b) for b in back] == [np.signbit(v) for v in t.tolist()]


def test_is_torch_while_another_thread_imports_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker can ask while another thread's ``import torch`` is half done (no ``Tensor`` yet)."""
    import types

    import numpy as np

    from tvlang.chunks import is_torch

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert not is_torch(np.zeros(2)) and not is_torch(object())
