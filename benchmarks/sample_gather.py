"""The selections' sample gather: every tensor's sample from each input of the generated bf16 family,
gathered one element at a time (``run`` 1) and a run of four at a time (``SAMPLE_RUN``), alternating.

    python benchmarks/sample_gather.py [--size 1G] [--repeat 5]

One process, one thread, as a TIES run's first pass gathers before it counts: each round gathers
every tensor of every input through ``CheckpointSource.gather`` and drops its pages again, so every
round pays the mapping's page faults, as a merge does.  The inputs are read back in order first
(``harness.reread``).  Prints the median CPU time (user + system) of each way and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h
from compare_trees import ensure_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes per checkpoint")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dirs = ensure_family(h.parse_size(args.size))
    h.reread(sorted(os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.endswith(".safetensors")))
    sys.path.insert(0, h.ROOT)
    from tvlang.backends.reductions import SAMPLE_RUN, sample_positions
    from tvlang.io.checkpoint import Checkpoint
    from tvlang.io.endpoints import CheckpointSource

    sources = [CheckpointSource(Checkpoint.open(d)) for d in dirs]
    names = list(sources[0].tensors)

    def gather_all(run: int) -> float:
        start = h.cpu_s()
        for name in names:
            numel = sources[0].tensors[name].numel
            positions = sample_positions(numel)
            for source in sources:
                source.gather(name, positions, run)
                source.release(name, 0, numel)
        return h.cpu_s() - start

    times: dict[int, list[float]] = {1: [], SAMPLE_RUN: []}
    gather_all(SAMPLE_RUN)  # warm-up: bytecode, numpy's first calls
    for _ in range(args.repeat):
        for run in times:
            times[run].append(gather_all(run))
    one, runs = (statistics.median(t) for t in times.values())
    print(f"| gather ({args.size} × {len(dirs)} bf16, medians of {args.repeat}) | CPU-s |")
    print("|---|---:|")
    print(f"| one element at a time (`run` 1) | {one:.3f} |")
    print(f"| runs of {SAMPLE_RUN} as one item | {runs:.3f} |")
    print(f"| ratio | {runs / one:.2f} |")


if __name__ == "__main__":
    main()
