"""Where a linear merge's time goes, step by step, inside one process.

    python benchmarks/phases.py [--size 1G] [--threads 1 2] [--repeat 3]

Runs the mission's task arithmetic on the suite's generated family
(``benchmarks/out/data/suite/bf16-<size>``; run ``suite.py`` once first) and sums, over every
chunk and thread, the seconds spent mapping input chunks, in the fused kernel, writing output
chunks and dropping mapped pages behind the cursor.  The output file is deleted and ``sync`` run
before each run, as the suite does.  Thread-seconds add up across threads, so with two threads
the sum can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tvlang
import tvlang.io.endpoints as endpoints
import tvlang.runtime as runtime

TOTALS: collections.Counter[str] = collections.Counter()
LOCK = threading.Lock()


def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with LOCK:
                TOTALS[key] += time.perf_counter() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    family = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "out", "data", "suite", f"bf16-{args.size}"
    )
    if not os.path.isdir(family):
        sys.exit(f"{family} is missing: run benchmarks/suite.py once to generate it")
    runtime.write_to_sink = timed(runtime.write_to_sink, "write")  # type: ignore[assignment]
    runtime.call = timed(runtime.call, "kernel")  # type: ignore[assignment]
    endpoints.CheckpointSource.read = timed(endpoints.CheckpointSource.read, "map")  # type: ignore[method-assign]
    endpoints.CheckpointSource.release = timed(endpoints.CheckpointSource.release, "release")  # type: ignore[method-assign]
    tasks = ["amazon_sent", "amazon_lm", "yelp_lm", "toxic"]
    bindings = {"base": f"{family}/base", **{n: tvlang.task_vector(f"{family}/{n}") for n in tasks}}
    program = tvlang.compile("base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic", bindings=bindings)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "phases.safetensors")
    print("| threads | wall s | map | kernel | write | release (thread-seconds) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for _ in range(args.repeat):
        for threads in args.threads:
            if os.path.exists(out):
                os.remove(out)
            os.sync()
            TOTALS.clear()
            t = time.perf_counter()
            program.run(out, options=tvlang.Options(overwrite=True, threads=threads))
            wall = time.perf_counter() - t
            cells = " | ".join(f"{TOTALS[k]:.2f}" for k in ("map", "kernel", "write", "release"))
            print(f"| {threads} | {wall:.2f} | {cells} |")
    os.remove(out)


if __name__ == "__main__":
    main()
