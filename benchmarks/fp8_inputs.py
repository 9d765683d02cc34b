"""A linear merge of float8 checkpoints into bf16: the compiled C kernels (float8 decoded by a table)
against the eager path, in one run; the outputs are checked to be the same bits::

    python benchmarks/fp8_inputs.py --elements 33554432 --repeat 3
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 25)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.elements // 4096, 4096)
    base = torch.randn(shape, generator=g)
    models = {
        name: {"w": (base + 0.02 * torch.randn(shape, generator=g)).to(fp8)}
        for name, fp8 in (("a", torch.float8_e4m3fn), ("b", torch.float8_e4m3fn), ("c", torch.float8_e5m2))
    }
    src = "0.5*a + 0.3*b + 0.2*c"
    program = tvlang.compile(src, bindings=models)
    print(f"3 float8 inputs of {args.elements / 1e6:.1f} M elements → bf16, median of {args.repeat}")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    results = {m: program.run(options=tvlang.Options(kernels=m, dtype="bf16")) for m in times}  # warm
    for _ in range(args.repeat):
        for mode in times:
            t = time.perf_counter()
            results[mode] = program.run(options=tvlang.Options(kernels=mode, dtype="bf16"))
            times[mode].append(time.perf_counter() - t)
    assert torch.equal(results["eager"]["w"].view(torch.int16), results["compiled"]["w"].view(torch.int16))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(
        f"| eager (s) | compiled (s) | eager ÷ compiled |\n|---|---|---|\n| {e:.2f} | {c:.2f} | {e / c:.1f}× |"
    )


if __name__ == "__main__":
    main()
