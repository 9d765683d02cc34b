"""Plan reuse: what a repeated ``Program.run(into=...)`` saves when nothing changed, and what a
run with a new coefficient (a tuning trial) still pays.

    python benchmarks/plan_reuse.py                  # TIES of two fine-tunes, a 1 GB bf16 model
    python benchmarks/plan_reuse.py --size 100M      # a quick look

Inputs: a Llama-shaped base and two fine-tunes from ``tvlang.synth.write_family`` under
``benchmarks/out/data/plan_reuse/``; the program is
``base + ties(a - base, b - base, weights=[lam, 0.4], density=0.5)``, merged into a state dict of
preallocated bf16 tensors.  Per case, after one warm-up run, ``--runs`` runs:

- ``no reuse``: a new λ each run, the program's kept plan dropped before each (as every run was
  before plans were kept): headers read, plan built, kernels looked up each time;
- ``new λ``: a new λ each run (as a search does): planned again, from the headers already read;
- ``same λ``: the same parameters each run: the plan and its kernels are reused.

Per run: the time of the plan step (``Program._planned``: the key, a ``stat`` per input file and,
on a miss, ``build_plan``), of ``prepare_kernels`` (the kernel look-ups), and the median wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import tvlang  # noqa: E402
import tvlang.api  # noqa: E402
import tvlang.runtime  # noqa: E402
from tvlang.api import parse_size  # noqa: E402
from tvlang.synth import spec_for_bytes, write_family  # noqa: E402

PROGRAM = "param lam = 0.5\nbase + ties(a - base, b - base, weights=[lam, 0.4], density=0.5)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size)
    spec = spec_for_bytes(size)
    data = os.path.join(HERE, "out", "data", "plan_reuse", args.size)
    paths = {n: os.path.join(data, n) for n in ("base", "a", "b")}
    if not all(os.path.isdir(p) for p in paths.values()):
        write_family(data, ["base", "a", "b"], spec)
    prog = tvlang.compile(PROGRAM, bindings=paths)
    ckpt = tvlang.api.Checkpoint.open(paths["base"])
    model = {k: torch.empty(info.shape, dtype=torch.bfloat16) for k, info in ckpt.tensors.items()}

    planning: list[float] = []
    real_build = tvlang.api.build_plan

    def timed_build(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_build(*a, **k)
        finally:
            planning.append(time.perf_counter() - t)

    tvlang.api.build_plan = timed_build  # type: ignore[assignment]
    lookups: list[float] = []
    real_planned = tvlang.api.Program._planned

    def timed_planned(self: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_planned(self, *a, **k)
        finally:
            lookups.append(time.perf_counter() - t)

    tvlang.api.Program._planned = timed_planned  # type: ignore[method-assign]
    kernel_times: list[float] = []
    real_prepare = tvlang.runtime.prepare_kernels

    def timed_prepare(plan: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_prepare(plan)
        finally:
            kernel_times.append(time.perf_counter() - t)

    tvlang.runtime.prepare_kernels = timed_prepare  # type: ignore[assignment]
    prog.run(into=model, params={"lam": 0.5})  # warm-up: kernels built, pages cached
    results = {}
    for case in ("no reuse", "new λ", "same λ"):
        planning.clear()
        lookups.clear()
        kernel_times.clear()
        walls = []
        if case == "same λ":
            prog.run(into=model, params={"lam": 0.5})  # the plan every timed run then reuses
            planning.clear()
            lookups.clear()
            kernel_times.clear()
        for i in range(args.runs):
            lam = 0.5 if case == "same λ" else 0.1 + 0.8 * i / args.runs
            if case == "no reuse":
                prog._last_plan = None
            t = time.perf_counter()
            prog.run(into=model, params={"lam": lam})
            walls.append(time.perf_counter() - t)
        results[case] = {
            "plans built": len(planning),
            "build_plan ms/run": 1e3 * sum(planning) / args.runs,
            "plan step ms/run": 1e3 * sum(lookups) / args.runs,
            "kernels ms/run": 1e3 * sum(kernel_times) / args.runs,
            "median wall s": statistics.median(walls),
        }
    print(f"{len(ckpt.tensors)} tensors, {spec.nbytes() / 1e9:.2f} GB per model, {args.runs} runs per case")
    for case, r in results.items():
        print(
            f"{case}: plans built {r['plans built']}, plan step {r['plan step ms/run']:.1f} ms/run "
            f"(build_plan {r['build_plan ms/run']:.1f}), prepare_kernels {r['kernels ms/run']:.1f} ms/run, "
            f"median run {r['median wall s']:.3f} s"
        )


if __name__ == "__main__":
    main()
