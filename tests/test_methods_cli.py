"""Every merge method through `tvlang run` on sharded bf16 checkpoints, all outputs in one pass."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

import tvlang
from tvlang import cli

PROGRAM = """\
base = load("ckpt/base")
a = load("ckpt/amazon_sent") - base
b = load("ckpt/yelp_lm") - base
c = load("ckpt/toxic") - base
output ties = base + ties(a, b, c, weights=[0.5, 0.3, 0.2], density=0.5)
output ties_peft = base + ties(a, b, density=0.3, elect="count", divide="count")
output dare = base + dare(a, 0.5, seed=7)
output dare_ties = base + dare_ties(a, b, c, weights=[1, 1, 1], density=0.6, seed=1)
output dare_linear = base + dare_linear(a, b, weights=[0.5, 0.5], density=0.6, seed=2)
output pruned = base + magnitude_prune(a, 0.2)
output della = base + ties(della(a, 0.5, 0.2, seed=3), della(b, 0.5, 0.2, seed=3))
output crumbs = base + breadcrumbs(b, 0.5, 0.05)
output soup = linear(load("ckpt/amazon_sent"), load("ckpt/yelp_lm"), weights=[2, 1])
output lerp = lerp(base, load("ckpt/toxic"), 0.25)
output slerp = slerp(base, load("ckpt/toxic"), 0.4)
output nuslerp = base + nuslerp(a, b, 0.3)
output stock = model_stock(base, load("ckpt/amazon_sent"), load("ckpt/yelp_lm"), load("ckpt/toxic"))
output swap = nearswap(base, load("ckpt/amazon_sent"), 0.001)
"""


def _load_dir(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_every_method_runs_on_sharded_bf16(bf16_sharded: dict[str, str], tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name, path in bf16_sharded.items():
        os.symlink(path, ckpt / name)
    (tmp_path / "m.tv").write_text(PROGRAM)
    assert (
        cli.main(["run", str(tmp_path / "m.tv"), "-o", str(tmp_path / "out"), "-q", "--shard-size", "30000"])
        == 0
    )
    outputs = sorted(os.listdir(tmp_path / "out"))
    assert len(outputs) == 14

    # The same program over in-memory copies of the checkpoints gives the same bits.
    states = {n: _load_dir(p) for n, p in bf16_sharded.items()}
    source = PROGRAM
    for n in states:
        source = source.replace(f'load("ckpt/{n}")', f"{n}_sd")
    bindings = {f"{n}_sd": sd for n, sd in states.items()}
    memory = tvlang.compile(source, bindings=bindings).run(options=tvlang.Options(threads=1, chunk=8192))
    for name in outputs:
        written = _load_dir(str(tmp_path / "out" / name))
        assert written.keys() == states["base"].keys()
        for k, t in written.items():
            assert t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all()
            assert torch.equal(t.view(torch.int16), memory[name][k].view(torch.int16)), (name, k)
