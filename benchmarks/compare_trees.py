"""Two source trees of tvlang on the same merges, interleaved in one run: did a change slow anything?

    python benchmarks/compare_trees.py --old /tmp/old [--new .] [--size 256M] [--repeat 5]

Make the old tree with ``git archive COMMIT tvlang grammar | tar -x -C /tmp/old`` (and
``echo COMMIT > /tmp/old/COMMIT``).  Each case is one ``tvlang run`` of a mergekit config on a
generated Llama-shaped bf16 family (``benchmarks/out/data/compare/``), each run a fresh process
with a warm page cache, the two trees alternating so that a busy neighbour hurts both alike.
Reported per case and tree: the median wall time (process start to exit, imports included) and
the median peak resident memory of the process (``ru_maxrss`` from ``wait4``), and the ratio
new / old of each.  The parent never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h
from suite import LABEL, NAMES, mergekit_config

CASES = ("task_arithmetic", "ties", "dare_ties", "slerp")


def ensure_family(size: int) -> list[str]:
    """The generated family (base first), written once by a child process of the new tree."""
    directory = os.path.join(h.OUT, "data", "compare", f"bf16-{size}")
    if not os.path.exists(os.path.join(directory, "DONE")):
        shutil.rmtree(directory, ignore_errors=True)
        code = (
            "import sys; from tvlang import synth; "
            f"synth.write_family({directory!r}, {list(NAMES)!r}, synth.spec_for_bytes({size}, 'bf16'), "
            "dtype='bf16', shards=2)"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": h.ROOT})
        with open(os.path.join(directory, "DONE"), "w") as f:
            f.write("ok\n")
    return [os.path.join(directory, name) for name in NAMES]


def tree_env(src: str) -> dict[str, str]:
    """The environment that makes a child import tvlang from ``src``; children run in a directory
    holding no tvlang (``python -m`` puts the working directory first on the path)."""
    return {**os.environ, "PYTHONPATH": os.path.abspath(src)}


def check_tree(src: str, cwd: str) -> None:
    code = "import tvlang; print(tvlang.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", code], env=tree_env(src), cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not found.startswith(os.path.abspath(src) + os.sep):
        raise SystemExit(f"a child imports tvlang from {found}, not from {src}")


def run_once(src: str, config: str, out: str) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one ``tvlang run`` of ``config`` with tvlang from ``src``."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvlang", "run", config, "-o", out, "-q"],
        env=tree_env(src),
        cwd=os.path.dirname(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{src}: tvlang run {config} failed:\n{err.decode()}")
    return wall, int(usage.ru_maxrss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the old tree (a snapshot with tvlang/ and grammar/)")
    ap.add_argument("--new", default=h.ROOT, help="the new tree (default: this checkout)")
    ap.add_argument("--size", default="256M", help="bytes per checkpoint")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    size = h.parse_size(args.size)
    paths = ensure_family(size)
    h.warm([os.path.join(d, f) for d in paths for f in sorted(os.listdir(d)) if f.endswith(".safetensors")])
    work = os.path.join(h.OUT, "compare")
    os.makedirs(work, exist_ok=True)
    trees = {"old": args.old, "new": args.new}
    for src in trees.values():
        check_tree(src, work)
    results: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "trees": {k: h.source_commit(v) for k, v in trees.items()},
        "size": args.size,
        "cases": {},
    }
    for case in args.cases.split(","):
        config = os.path.join(work, f"{case}.yml")
        with open(config, "w") as f:
            f.write(mergekit_config(case, paths, "bf16"))
        samples: dict[str, list[tuple[float, int]]] = {"old": [], "new": []}
        for i in range(args.repeat + 1):  # the first round warms caches (kernels, grammar) and is dropped
            for tree in ("old", "new") if i % 2 == 0 else ("new", "old"):
                sample = run_once(trees[tree], config, os.path.join(work, f"out-{tree}"))
                if i:
                    samples[tree].append(sample)
        row = {
            tree: {
                "wall_s": statistics.median(w for w, _ in s),
                "peak_rss_mib": statistics.median(r for _, r in s) / 1024,
            }
            for tree, s in samples.items()
        }
        row["ratio_wall"] = row["new"]["wall_s"] / row["old"]["wall_s"]
        row["ratio_rss"] = row["new"]["peak_rss_mib"] / row["old"]["peak_rss_mib"]
        results["cases"][case] = row
        print(
            f"{LABEL[case]:<28} old {row['old']['wall_s']:6.2f} s {row['old']['peak_rss_mib']:6.0f} MiB   "
            f"new {row['new']['wall_s']:6.2f} s {row['new']['peak_rss_mib']:6.0f} MiB   "
            f"new/old wall {row['ratio_wall']:.2f}  rss {row['ratio_rss']:.2f}",
            flush=True,
        )
    for tree in trees:
        shutil.rmtree(os.path.join(work, f"out-{tree}"), ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
