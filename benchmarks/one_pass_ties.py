"""What a one-pass TIES would have to redo: the share of elements its sampled brackets leave undecided.

    python benchmarks/one_pass_ties.py [--size 1G] [--density 0.5]

TIES reads its inputs twice: one pass selects each task vector's magnitude threshold (the k-th
largest ``|t - base|`` of the tensor), the next merges.  A single pass could merge with the
thresholds still unknown: before it, the sample (``sample_positions``, as a TIES run gathers it)
brackets each threshold between two keys ``lo <= threshold <= hi``; an element whose every
magnitude lies outside ``[lo, hi)`` is merged exactly by the test ``|d| >= hi``, and only the others
would wait, stored, for the exact thresholds at the end of the pass.

This script measures, over every tensor of the generated bf16 family (base and four fine-tunes,
float32 magnitudes as TIES computes them), how many elements that is: per vector the share of its
magnitudes strictly inside the bracket and equal to ``lo`` (bf16 differences take few distinct
values near the median, so the bracket's ends repeat), and the share of elements with at least one
of the four undecided.  Again with a sample four times as large (runs of 16 elements at the same
places: the same cache lines gathered).  It prints the bytes a one-pass TIES would move for those
elements, against the bytes of the second read it saves.  No timing: shares of elements, exact.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h
from compare_trees import ensure_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes per checkpoint")
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args()
    dirs = ensure_family(h.parse_size(args.size))
    sys.path.insert(0, h.ROOT)
    from tvlang.backends.reductions import SAMPLE_RUN, SampledKth, key_array, sample_positions
    from tvlang.chunks import to_torch
    from tvlang.io.checkpoint import Checkpoint
    from tvlang.io.endpoints import CheckpointSource

    base, *tuned = [CheckpointSource(Checkpoint.open(d)) for d in dirs]
    wide = 4  # runs of 16 instead of 4: four times the sample, the same cache lines
    totals = {"elements": 0, "inside": [0, 0], "at_lo": [0, 0], "undecided": [0, 0], "vectors": 0}
    for name, meta in base.tensors.items():
        n = meta.numel
        if n < 2 or meta.dtype != "BF16":
            continue
        b = to_torch(base.read(name, 0, n), "BF16").float()
        positions = sample_positions(n)
        runs = positions[::SAMPLE_RUN] // (SAMPLE_RUN * wide) * (SAMPLE_RUN * wide)
        larger = np.unique((runs[:, None] + np.arange(SAMPLE_RUN * wide)).ravel())
        larger = larger[larger < n]
        undecided = [np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)]
        for source in tuned:
            mag = (to_torch(source.read(name, 0, n), "BF16").float() - b).abs().numpy()
            keys = key_array(mag)
            for j, sample in enumerate((positions, larger)):
                select = SampledKth(math.floor(args.density * n), n, "F32")
                select.sample(mag[sample])
                bracket = select.bracketing()  # the bracket a TIES run counts against
                assert bracket is not None
                lo, hi = bracket[0], bracket[1]
                totals["inside"][j] += int(np.count_nonzero((keys > lo) & (keys < hi)))
                totals["at_lo"][j] += int(np.count_nonzero(keys == lo)) if lo < hi else 0
                undecided[j] |= (keys >= lo) & (keys < hi)
            source.release(name, 0, n)
        base.release(name, 0, n)
        totals["elements"] += n
        totals["vectors"] += len(tuned) * n
        for j in range(2):
            totals["undecided"][j] += int(np.count_nonzero(undecided[j]))
    elements, vectors = totals["elements"], totals["vectors"]
    read = 2 * (1 + len(tuned))  # bytes per element of the second read (bf16 inputs)
    print(f"| {args.size} × {1 + len(tuned)} bf16, density {args.density} | library sample | 4× sample |")
    print("|---|---:|---:|")
    for label, key, over in (
        ("a vector's magnitudes strictly inside its bracket", "inside", vectors),
        ("a vector's magnitudes equal to the bracket's `lo`", "at_lo", vectors),
        ("elements with some magnitude undecided", "undecided", elements),
    ):
        print(f"| {label} | {totals[key][0] / over:.1%} | {totals[key][1] / over:.1%} |")
    for j, label in enumerate(("library sample", "4× sample")):
        share = totals["undecided"][j] / elements
        stored = share * (read + 8)  # each undecided element's inputs and its position, written and read back
        print(
            f"- {label}: {2 * stored + 4:.2f} B of memory traffic per element (the undecided elements'"
            f" inputs and positions stored and read back, {2 * stored:.2f} B; the output held until the"
            f" end of its tensor, written and read back, 4 B) against the {read} B of the second read"
        )


if __name__ == "__main__":
    main()
