"""Alternating runs of ``tvlang run``: each case a (label, tree, config) triple, run in turn, a
fresh process per run, the output removed before each; medians of ``--repeat`` rounds.

    python benchmarks/alternate.py --repeat 6 \\
        head=/tmp/head:ties.yml new=.:ties.yml head-ta=/tmp/head:ta.yml new-ta=.:ta.yml

A tree is a directory with tvlang/ in it (``git archive COMMIT tvlang grammar | tar -x -C DIR``),
or ``.`` for this checkout. Unlike benchmarks/compare_trees.py, the cases run in the order given
and nothing runs between them (no ``sync``): the quickest check of one change against the commit
before it.  Memory freed during the runs stays in the guest (``harness.freed_memory_kept``).  The
parent never imports tvlang.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", metavar="LABEL=TREE:CONFIG")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cases = []
    for case in args.cases:
        label, _, rest = case.partition("=")
        tree, _, config = rest.partition(":")
        if not (label and tree and config):
            raise SystemExit(f"a case is LABEL=TREE:CONFIG, not {case!r}")
        cases.append((label, os.path.abspath(ROOT if tree == "." else tree), os.path.abspath(config)))
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    with h.freed_memory_kept() as kept, tempfile.TemporaryDirectory(prefix="tvlang-alternate-") as work:
        if not kept:
            print(h.NOT_KEPT, flush=True)
        out = os.path.join(work, "out")
        for _ in range(args.repeat):
            for label, tree, config in cases:
                shutil.rmtree(out, ignore_errors=True)
                env = {**os.environ, "PYTHONPATH": tree}
                env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached
                start = time.perf_counter()
                argv = [sys.executable, "-m", "tvlang", "run", config, "-o", out, "-q", "--force"]
                subprocess.run(argv, env=env, cwd=work, check=True)
                times[label].append(time.perf_counter() - start)
    for label, runs in times.items():
        print(
            f"{label:12s} median {statistics.median(runs):.2f} s   runs {' '.join(f'{t:.2f}' for t in runs)}"
        )


if __name__ == "__main__":
    main()
