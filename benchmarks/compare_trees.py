"""Two source trees of tvlang on the same merges, interleaved in one run: did a change slow anything?

    python benchmarks/compare_trees.py --old /tmp/old [--new .] [--size 256M] [--repeat 5]
    python benchmarks/compare_trees.py --mergekit ~/mergekit-venv/bin/python --size 1G --cases task_arithmetic

Make the old tree with ``git archive COMMIT tvlang grammar | tar -x -C /tmp/old`` (and
``echo COMMIT > /tmp/old/COMMIT``).  Each case is one ``tvlang run`` of a mergekit config on a
generated Llama-shaped bf16 family (``benchmarks/out/data/compare/``), each run a fresh process
with a warm page cache, the two trees alternating so that a busy neighbour hurts both alike.
First the inputs are dropped from the page cache and read back in order, so that every run finds
them in the large folios a sequential read leaves, not in whatever folios they were written or
faulted in with (``--as-cached`` skips that; it moves a 1 GiB merge's time by a quarter); and
memory freed during the runs stays in the guest (``harness.freed_memory_kept``).  ``--busy`` keeps
one CPU busy meanwhile, as another job on a shared machine would.
Reported per case and tree: the median wall time (process start to exit, imports included) and
the median peak resident memory of the process (``ru_maxrss`` from ``wait4``), and the ratio
new / old of each.  The parent never imports torch.
"""

from __future__ import annotations

import argparse
import atexit
import glob
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
from suite import LABEL, MERGEKIT_FLAGS, NAMES, mergekit_config

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


_FLOOR = """
import json, sys, threading, time
import numpy as np
n = 64 << 20
a, b, c = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)
np.add(a, b, out=c)
def timed(parts):
    def part(k):
        lo, hi = k * n // parts, (k + 1) * n // parts
        np.add(a[lo:hi], b[lo:hi], out=c[lo:hi])
    best = float("inf")
    for _ in range(7):
        threads = [threading.Thread(target=part, args=(k,)) for k in range(parts)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = min(best, time.perf_counter() - t)
    return 3 * 4 * n / best / 1e9
print(json.dumps({"one_thread_gbs": timed(1), "two_threads_gbs": timed(2)}))
"""


def stream_add_floor() -> dict[str, float]:
    """The machine's in-memory streaming add (2 reads + 1 write of float32, numpy), in GB/s: one
    thread, and two threads on halves; best of 7 over 256 MiB arrays.  In a child process: the
    children measured later inherit this process's peak RSS through ``ru_maxrss``."""
    done = subprocess.run([sys.executable, "-c", _FLOOR], check=True, capture_output=True, text=True)
    floor: dict[str, float] = json.loads(done.stdout)
    return floor


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def check_tree(src: str, cwd: str) -> None:
    code = "import tvlang; print(tvlang.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", code], env=tree_env(src), cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not found.startswith(os.path.abspath(src) + os.sep):
        raise SystemExit(f"a child imports tvlang from {found}, not from {src}")


def run_once(argv: list[str], env: dict[str, str], cwd: str, out: str) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one merge writing ``out``.  Every tool's output goes
    first, not only this one's: another tool's 1 GiB output, left in the page cache, moved the
    next run's time by up to 2x in either direction on this project's machine."""
    for old in glob.glob(os.path.join(os.path.dirname(out), "out-*")):
        shutil.rmtree(old, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err.decode()}")
    return wall, int(usage.ru_maxrss)


def main() -> None:
    with h.freed_memory_kept() as kept:
        if not kept:
            print(h.NOT_KEPT, flush=True)
        compare(kept)


def compare(kept: bool) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="the old tree (a snapshot with tvlang/ and grammar/)")
    ap.add_argument("--new", default=h.ROOT, help="the new tree (default: this checkout)")
    ap.add_argument(
        "--mergekit", help="also run mergekit-yaml from this interpreter's environment on each config"
    )
    ap.add_argument("--size", default="256M", help="bytes per checkpoint")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mergekit-repeat", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--as-cached",
        action="store_true",
        help="leave the inputs in the page cache as they are (default: drop and read them back in "
        "order first, so every run finds them in the same large folios)",
    )
    ap.add_argument(
        "--busy",
        action="store_true",
        help="keep one CPU busy with a spinning process during the runs (a shared machine's load)",
    )
    args = ap.parse_args()
    if args.busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        atexit.register(spinner.kill)
    size = h.parse_size(args.size)
    paths = ensure_family(size)
    inputs = [os.path.join(d, f) for d in paths for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    (h.warm if args.as_cached else h.reread)(inputs)
    work = os.path.join(h.OUT, "compare")
    os.makedirs(work, exist_ok=True)
    trees = {"new": args.new, **({"old": args.old} if args.old else {})}
    for src in trees.values():
        check_tree(src, work)
    floor = stream_add_floor()
    print(
        f"stream add (numpy, in memory): {floor['one_thread_gbs']:.1f} GB/s one thread, "
        f"{floor['two_threads_gbs']:.1f} GB/s two",
        flush=True,
    )
    results: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "trees": {k: h.source_commit(v) for k, v in trees.items()},
        "size": args.size,
        "stream_add": floor,
        "freed_memory_kept": kept,
        "busy": args.busy,
        "cases": {},
    }
    for case in args.cases.split(","):
        config = os.path.join(work, f"{case}.yml")
        with open(config, "w") as f:
            f.write(mergekit_config(case, paths, "bf16"))
        tools: dict[str, tuple[list[str], dict[str, str], int]] = {
            tree: ([sys.executable, "-m", "tvlang", "run", config, "-o", os.path.join(work, f"out-{tree}"), "-q"],
                   tree_env(src), args.repeat)
            for tree, src in trees.items()
        }  # fmt: skip
        if args.mergekit:
            yaml = os.path.join(os.path.dirname(args.mergekit), "mergekit-yaml")
            argv = [yaml, config, os.path.join(work, "out-mergekit"), *MERGEKIT_FLAGS]
            tools["mergekit"] = (argv, dict(os.environ), args.mergekit_repeat)
        samples: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
        names = list(tools)
        for i in range(max(n for _, _, n in tools.values()) + 1):  # round 0 warms caches; dropped
            for name in names[i % len(names) :] + names[: i % len(names)]:  # a rotating order
                argv, env, n = tools[name]
                if i > n:
                    continue
                sample = run_once(argv, env, work, argv[argv.index("-o") + 1] if "-o" in argv else argv[2])
                if i:
                    samples[name].append(sample)
        row: dict[str, Any] = {
            name: {
                "wall_s": statistics.median(w for w, _ in s),
                "peak_rss_mib": statistics.median(r for _, r in s) / 1024,
            }
            for name, s in samples.items()
        }
        for other in ("old", "mergekit"):
            if other in row:
                row[f"ratio_wall_{other}"] = row["new"]["wall_s"] / row[other]["wall_s"]
                row[f"ratio_rss_{other}"] = row["new"]["peak_rss_mib"] / row[other]["peak_rss_mib"]
        moved = sum(dir_bytes(p) for p in (paths[:2] if case == "slerp" else paths)) + dir_bytes(paths[0])
        row["new"]["end_to_end_gbs"] = moved / row["new"]["wall_s"] / 1e9  # (bytes read + written) / wall
        row["new"]["of_stream_add"] = row["new"]["end_to_end_gbs"] / floor["one_thread_gbs"]
        results["cases"][case] = row
        cells = "   ".join(
            f"{name} {row[name]['wall_s']:6.2f} s {row[name]['peak_rss_mib']:6.0f} MiB" for name in tools
        )
        ratios = "  ".join(
            f"new/{o} wall {row[f'ratio_wall_{o}']:.3f} rss {row[f'ratio_rss_{o}']:.2f}"
            for o in ("old", "mergekit")
            if o in row
        )
        print(
            f"{LABEL[case]:<28} {cells}   {ratios}   new end to end {row['new']['end_to_end_gbs']:.1f} GB/s "
            f"= {row['new']['of_stream_add']:.2f} of one thread's stream add",
            flush=True,
        )
    for name in ("new", "old", "mergekit"):
        shutil.rmtree(os.path.join(work, f"out-{name}"), ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
