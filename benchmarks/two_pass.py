"""What a second pass over the inputs costs, against what TIES costs (issue 16: TIES ≤ 2× linear).

    python benchmarks/two_pass.py [--size 1G] [--repeat 5]

TIES needs each task vector's k-th largest magnitude per tensor before it can write an element, so
it reads every input twice: once to select, once to merge.  This runs, on the generated bf16 family
of benchmarks/compare_trees.py, five merges alternately, a fresh ``tvlang run`` each:

* **linear**: the task arithmetic of the suite, ``base + 0.4*(t1 - t2 + t3) - t4`` (one pass);
* **two passes**: the same merge scaled by ``s / s``, where ``s`` sums the four task vectors: a
  first pass of plain sums over all five inputs, then the linear pass (the cheapest two-pass
  program of the same inputs and output that tvlang plans; its per-block float64 sums are not free);
* **TIES** (density 0.5, four task vectors) and **task arithmetic** from their mergekit configs;
* **TIES's merge pass alone**: TIES's element-wise arithmetic as tvlang lowers it (trim, sign
  election, disjoint mean), each task vector's threshold given as a number instead of selected: one
  pass, so TIES's time less this one is what its selection pass costs.

First the inputs are dropped from the page cache and read back in order (``harness.reread``), and
memory freed during the runs stays in the guest (``harness.freed_memory_kept``), as compare_trees.py
does.  Prints the median wall times and the ratios to the linear merge.
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
from compare_trees import ensure_family
from suite import mergekit_config

LINEAR = "base + (0.4*(t1 - base) - 0.4*(t2 - base) + 0.4*(t3 - base) - (t4 - base))"
TWO_PASS = f"s = sum(t1 - base) + sum(t2 - base) + sum(t3 - base) + sum(t4 - base)\n\
output merged = base + ({LINEAR.removeprefix('base + ')}) * (s / s)"
# TIES's element-wise program (tvlang.lowering.methods) with fixed thresholds in place of the k-th
# largest magnitudes: the same operations per element, no selection pass.
TIES_MERGE_PASS = (
    "".join(
        f"k{i} = where(abs(t{i} - base) >= {c}, t{i} - base, 0)\n"
        for i, c in enumerate((1e-3, 2e-3, 3e-3, 4e-3), 1)
    )
    + "e = where(k1 + k2 + k3 + k4 >= 0, 1, -1)\n"
    + "".join(f"a{i} = sign(k{i}) == e\n" for i in range(1, 5))
    + "c = a1 + a2 + a3 + a4\n"
    + "output merged = base + (k1*a1 + k2*a2 + k3*a3 + k4*a4) / where(c == 0, 1, c)"
)


def programs(dirs: list[str], into: str) -> dict[str, str]:
    """The merges' files, by label."""
    loads = "".join(
        f"{name} = load({path!r})\n".replace("'", '"')
        for name, path in zip(("base", "t1", "t2", "t3", "t4"), dirs, strict=True)
    )
    texts = {
        "linear": f"{loads}output merged = {LINEAR}\n",
        "two passes": f"{loads}{TWO_PASS}\n",
        "task arithmetic": mergekit_config("task_arithmetic", dirs, "bf16"),
        "TIES": mergekit_config("ties", dirs, "bf16"),
        "TIES's merge pass alone": f"{loads}{TIES_MERGE_PASS}\n",
    }
    paths = {}
    for label, text in texts.items():
        suffix = ".yml" if "merge_method" in text else ".tv"
        paths[label] = os.path.join(into, label.replace(" ", "_").replace("'", "") + suffix)
        with open(paths[label], "w") as f:
            f.write(text)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes per checkpoint")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dirs = ensure_family(h.parse_size(args.size))
    into = os.path.join(h.OUT, "two_pass")
    os.makedirs(into, exist_ok=True)
    cases = programs(dirs, into)
    h.reread(sorted(os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.endswith(".safetensors")))
    env = {**os.environ, "PYTHONPATH": h.ROOT}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached
    times: dict[str, list[float]] = {label: [] for label in cases}
    with h.freed_memory_kept() as kept, tempfile.TemporaryDirectory(prefix="tvlang-two-pass-") as work:
        if not kept:
            print(h.NOT_KEPT, flush=True)
        out = os.path.join(work, "out")
        for _ in range(args.repeat + 1):  # the first round warms up (kernels compiled, bytecode)
            for label, path in cases.items():
                shutil.rmtree(out, ignore_errors=True)
                argv = [sys.executable, "-m", "tvlang", "run", path, "-o", out, "-q", "--force"]
                start = time.perf_counter()
                subprocess.run(argv, env=env, cwd=work, check=True)
                times[label].append(time.perf_counter() - start)
    linear = statistics.median(times["linear"][1:])
    print(f"| merge ({args.size} × 5 bf16, medians of {args.repeat}) | wall, s | ÷ linear |")
    print("|---|---:|---:|")
    for label, runs in times.items():
        m = statistics.median(runs[1:])
        print(f"| {label} | {m:.2f} | {m / linear:.2f}× |")


if __name__ == "__main__":
    main()
