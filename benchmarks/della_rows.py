"""DELLA (row ranks) on the compiled C kernels against the eager path, in one run.

DELLA keeps each element with a probability that depends on its magnitude's rank within its row
(``rowrank``).  The C kernels compute a row's stable ranks by a radix sort of order keys, in the same
fused loop as the rest of the method; before, any program of whole rows ran eagerly (torch's stable
argsort, a scatter, and one scratch buffer per instruction).  Both paths give the same bits (checked
here).  Tensors are generated in memory, bf16, Llama-like rows::

    python benchmarks/della_rows.py --rows 2048 --cols 4096 --tensors 4 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import tvlang

CASES = {
    "della l1 (mergekit)": 'base + della(m1 - base, 0.5, 0.3, seed=1, rescale="l1")',
    "della inverse (paper)": 'base + della(m1 - base, 0.5, 0.3, seed=1, rescale="inverse")',
    "della_linear-style, 2 models": "base + 0.5*della(m1 - base, 0.5, 0.2, seed=1)"
    " + 0.5*della(m2 - base, 0.5, 0.2, seed=2)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    base = {f"t{i}": torch.randn(shape, generator=g).bfloat16() for i in range(args.tensors)}
    models = [
        {k: (v.float() + 0.02 * torch.randn(shape, generator=g)).bfloat16() for k, v in base.items()}
        for _ in range(2)
    ]
    bindings = {"base": base, "m1": models[0], "m2": models[1]}
    n = args.tensors * args.rows * args.cols
    print(f"{args.tensors} bf16 tensors of {args.rows}×{args.cols} ({n / 1e6:.1f} M elements each model), "
          f"torch threads {torch.get_num_threads()}, median of {args.repeat}")  # fmt: skip
    print("| case | eager (s) | compiled (s) | eager ÷ compiled |")
    print("|---|---|---|---|")
    for name, src in CASES.items():
        program = tvlang.compile(src, bindings=bindings)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        results = {
            mode: program.run(options=tvlang.Options(kernels=mode)) for mode in times
        }  # warm: kernels built
        for _ in range(args.repeat):
            for mode in ("eager", "compiled"):  # alternating, so machine drift hits both alike
                t = time.perf_counter()
                results[mode] = program.run(options=tvlang.Options(kernels=mode))
                times[mode].append(time.perf_counter() - t)
        for k, v in results["eager"].items():
            assert torch.equal(v.view(torch.int16), results["compiled"][k].view(torch.int16)), k
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"| {name} | {e:.2f} | {c:.2f} | {e / c:.1f}× |")


if __name__ == "__main__":
    main()
