"""``tvlang demo``: the mission's example, end to end, on checkpoints it makes itself.

Writes five small Llama-shaped bf16 checkpoints (the base as a sharded Hugging
Face directory), the program ``sentiment.tv``, runs it, and checks every output
value against a float64 reference computed here the naive way.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from tvlang.api import compile_file
from tvlang.numerics import ulp, ulp_error
from tvlang.options import Options
from tvlang.synth import llama_shapes, make_family, make_lora_adapter

PROGRAM = """\
# sentiment.tv: improve sentiment analysis by analogy, forget toxic generation
base        = load("ckpt/base")                 # a sharded Hugging Face directory
amazon_sent = load("ckpt/amazon_sent") - base   # task vectors: fine-tuned minus base
amazon_lm   = load("ckpt/amazon_lm") - base
yelp_lm     = load("ckpt/yelp_lm") - base
toxic       = load("ckpt/toxic") - base
param lam = 0.4
output merged = base + lam*(amazon_sent - amazon_lm + yelp_lm) - toxic
"""

NAMES = ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic")


def run_demo(directory: str | None = None, *, quiet: bool = False) -> int:
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="tvlang-demo-") as tmp:
            return _demo(tmp, quiet)
    os.makedirs(directory, exist_ok=True)
    return _demo(directory, quiet)


def make_playground(directory: str, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, str], str]:
    """The demo's files, in which the README's commands run: ``ckpt/`` (the five checkpoints, the
    base a sharded Hugging Face directory, and a PEFT LoRA adapter, ``ckpt/adapter``) and
    ``sentiment.tv``.  Returns the checkpoints' paths and the program's."""
    paths = make_family(os.path.join(directory, "ckpt"), NAMES, shapes, layout="dir", base_shards=3)
    make_lora_adapter(os.path.join(directory, "ckpt", "adapter"), shapes)
    program_path = os.path.join(directory, "sentiment.tv")
    with open(program_path, "w") as f:
        f.write(PROGRAM)
    return paths, program_path


def _demo(directory: str, quiet: bool) -> int:
    def say(*lines: str) -> None:
        if not quiet:
            print(*lines, sep="\n")

    shapes = llama_shapes(hidden=256, layers=4, vocab=2048)
    paths, program_path = make_playground(directory, shapes)
    say(
        f"wrote 5 bf16 checkpoints ({len(shapes)} tensors each), a LoRA adapter (ckpt/adapter) and "
        f"{program_path}:",
        "",
        PROGRAM,
    )

    program = compile_file(program_path)
    options = Options(progress=not quiet, overwrite=True)
    say("$ tvlang plan sentiment.tv", program.explain(options=options), "")
    out = os.path.join(directory, "merged")
    say("$ tvlang run sentiment.tv -o merged")
    program.run(out, options=options)

    worst, exact_share, beyond = _verify(paths, out)
    say(
        "",
        f"output: {out}  ({', '.join(sorted(os.listdir(out)))})",
        f"checked against a float64 reference: worst error {worst:.3f} ulp, "
        f"{exact_share:.4%} of values correctly rounded",
    )
    if beyond:
        print(
            f"demo FAILED: {beyond} output value(s) further from the exact result than one rounding plus "
            "float32 rounding of the operands",
            file=sys.stderr,
        )
        return 1
    say("demo ok")
    return 0


def _verify(paths: dict[str, str], out: str) -> tuple[float, float, int]:
    """The naive computation, whole state dicts in float64: the worst error in ulps, the share
    correctly rounded, and how many values miss the accuracy bound."""
    from tvlang.chunks import to_torch
    from tvlang.io.checkpoint import Checkpoint

    def load(path: str) -> dict[str, torch.Tensor]:
        ckpt = Checkpoint.open(path)
        with ckpt.reader() as reader:
            return {
                n: to_torch(reader.read(i, 0, i.numel), i.dtype).clone().reshape(i.shape)
                for n, i in ckpt.tensors.items()
            }

    s = {name: load(p) for name, p in paths.items()}
    merged = load(out)
    weights = {"base": 1.6, "amazon_sent": 0.4, "amazon_lm": -0.4, "yelp_lm": 0.4, "toxic": -1.0}
    worst, exact, total, beyond = 0.0, 0, 0, 0
    for name, result in merged.items():
        b = s["base"][name].double()
        tau = {k: s[k][name].double() - b for k in NAMES[1:]}
        ref = b + 0.4 * (tau["amazon_sent"] - tau["amazon_lm"] + tau["yelp_lm"]) - tau["toxic"]
        err = ulp_error(result, ref)
        # One rounding, plus float32 rounding of the operands where the result cancels out of them.
        magnitude = sum(abs(w) * s[k][name].double().abs() for k, w in weights.items())
        allowed = 1.0 + 2.0**-24 * magnitude / ulp(ref, result.dtype)
        beyond += int((err > allowed).sum())
        worst = max(worst, err.max().item())
        exact += int((err <= 0.5).sum())
        total += err.numel()
    return worst, exact / total, beyond
