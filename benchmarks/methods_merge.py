"""TIES and DARE merges of five bf16 checkpoints beside the linear merge: wall time and peak RSS.

Uses the harness of ``linear_merge.py`` (same generated checkpoints, same fresh-process runs,
same ``VmHWM``-over-import-baseline memory measure) and runs tvlang on several expressions
over one family of checkpoints, alternating them so machine drift hits all alike::

    python benchmarks/methods_merge.py --size 1G --repeat 2 --json benchmarks/out/methods.json
    python benchmarks/methods_merge.py --size 100M --repeat 3 --in-process   # on a busy machine

Task vectors are bound as fine-tuned minus base (``--task``).  The reduction passes are
counted in the bytes read: a per-tensor top-k on bf16 inputs takes 2 radix passes before the
element-wise pass, so TIES reads every input 3 times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_merge as lm

TASKS = lm.NAMES[1:]
CASES = {
    "linear (task arithmetic)": lm.EXPR,
    "ties, density 0.5": f"base + ties({', '.join(TASKS)}, density=0.5)",
    "dare_ties, density 0.5": f"base + dare_ties({', '.join(TASKS)}, density=0.5, seed=0)",
    "dare, p 0.5 (paper rescale)": "base + "
    + " + ".join(f"dare({t}, 0.5, seed={i})" for i, t in enumerate(TASKS)),
    "sce, select_topk 0.5": f"base + sce({', '.join(TASKS)}, select_topk=0.5)",
    "ram": f"base + ram({', '.join(TASKS)})",
    "multislerp": f"base + multislerp({', '.join(TASKS)}, weights=[1, 1, 1, 1])",
    "karcher": f"base + karcher({', '.join(TASKS)})",
    "nuslerp per row": f'base + nuslerp({TASKS[0]}, {TASKS[1]}, 0.5, per="row")',
    "nuslerp per column": f'base + nuslerp({TASKS[0]}, {TASKS[1]}, 0.5, per="column")',
    "arcee_fusion": f"arcee_fusion(base, base + {TASKS[0]})",
}


def tvlang_args(expr: str, paths: list[str], out: str) -> list[str]:
    binds = [f"--bind=base={paths[0]}"] + [f"--task={n}={p}" for n, p in zip(TASKS, paths[1:], strict=True)]
    return ["eval", expr, *binds, "-o", out, "--force", "-q"]


def in_process(paths: list[str], out: str, repeat: int) -> None:
    """Each case compiled and run in this process: median wall and CPU time (all threads) of the run."""
    import time

    sys.path.insert(0, lm.SRC)
    import tvlang

    bindings: dict[str, Any] = {"base": paths[0]}
    bindings.update({n: tvlang.task_vector(q) for n, q in zip(TASKS, paths[1:], strict=True)})
    times: dict[str, list[tuple[float, float]]] = {c: [] for c in CASES}
    for _ in range(repeat):
        for case, expr in CASES.items():
            program = tvlang.compile(expr, bindings=bindings)
            lm.warm(paths)
            wall, cpu = time.perf_counter(), time.process_time()
            program.run(out, options=tvlang.Options(overwrite=True))
            times[case].append((time.perf_counter() - wall, time.process_time() - cpu))
    os.remove(out)
    linear_cpu = statistics.median(c for _, c in times[next(iter(CASES))])
    print("| case | median wall s | median CPU s | × linear (CPU) |\n|---|---:|---:|---:|")
    for case, ts in times.items():
        wall_s, cpu_s = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        print(f"| {case} | {wall_s:.2f} | {cpu_s:.2f} | {cpu_s / linear_cpu:.1f}× |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="bytes per checkpoint, e.g. 1G")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per case (median reported)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--src", default=lm.ROOT, help="import tvlang from this tree (see linear_merge.py)")
    p.add_argument(
        "--only", help="comma-separated words: run the cases whose name has one (linear always runs)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="time each case inside this process (wall and CPU time of the run alone, no imports): "
        "steadier than fresh processes when other jobs share the machine",
    )
    args = p.parse_args()
    if args.only:
        words = args.only.split(",")
        for case in list(CASES)[1:]:
            if not any(w in case for w in words):
                del CASES[case]
    lm.SRC = os.path.abspath(args.src)
    paths = lm.ensure_data(args.size, lm.parse_size(args.size))
    out = os.path.join(lm.OUT, f"{args.size}-method.safetensors")
    if args.in_process:
        in_process(paths, out, args.repeat)
        return
    lm.warm(paths)
    baseline_kib = statistics.median(int(lm.run_child("baseline", [])["hwm_kib"]) for _ in range(2))
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    for r in range(args.repeat):
        for case, expr in CASES.items():
            if os.path.exists(out):
                os.remove(out)
            lm.warm(paths)
            os.sync()
            res = lm.run_child("tvlang", tvlang_args(expr, paths, out))
            runs[case].append(res)
            print(f"[{case}] run {r + 1}/{args.repeat}: {res['wall_s']:.1f} s, "
                  f"VmHWM {int(res['hwm_kib']) / 1024:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    if os.path.exists(out):
        os.remove(out)
    bytes_in = sum(os.path.getsize(q) for q in paths)
    linear_wall = statistics.median(float(r["wall_s"]) for r in runs[next(iter(CASES))])
    rows = []
    for case, rs in runs.items():
        wall = statistics.median(float(r["wall_s"]) for r in rs)
        rows.append({
            "case": case,
            "expression": CASES[case],
            "median_wall_s": wall,
            "median_work_s": statistics.median(float(r["work_s"]) for r in rs),
            "vs_linear": wall / linear_wall,
            "peak_rss_over_baseline_mib": (max(int(r["hwm_kib"]) for r in rs) - baseline_kib) / 1024,
            "median_others_load": statistics.median(float(r["others_load"]) for r in rs),
            "runs": rs,
        })  # fmt: skip
    lines = [
        "| case | median wall s | work s (after imports) | × linear | peak RSS over baseline MiB | others' load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['median_wall_s']:.1f} | {row['median_work_s']:.1f} | {row['vs_linear']:.1f}× "
            f"| {row['peak_rss_over_baseline_mib']:.0f} | {row['median_others_load']:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({
                "command": "python " + shlex.join(sys.argv),
                "size": args.size,
                "bytes_per_checkpoint": bytes_in // len(paths),
                "tvlang_commit": lm.source_commit(lm.SRC),
                "baseline_rss_mib": baseline_kib / 1024,
                "results": rows,
            }, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    os.makedirs(lm.OUT, exist_ok=True)
    main()
