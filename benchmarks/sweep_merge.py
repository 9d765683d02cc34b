"""A λ sweep: ten outputs from one pass over the inputs, against ten separate runs.

Uses the harness of ``linear_merge.py`` (generated checkpoints, fresh processes, ``VmHWM``)::

    python benchmarks/sweep_merge.py --size 1G --json benchmarks/out/sweep.json

The program is the mission's expression with ``param lam``; the sweep is
``--set lam=0.1:1:0.1`` (10 values) in one run, the baseline the same ten values as ten
runs of ``--set lam=V``.  Outputs are deleted between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_merge as lm

PROGRAM = """\
base = load("{base}")
amazon_sent = load("{amazon_sent}") - base
amazon_lm = load("{amazon_lm}") - base
yelp_lm = load("{yelp_lm}") - base
toxic = load("{toxic}") - base
param lam = 0.4
output merged = base + lam*(amazon_sent - amazon_lm + yelp_lm) - toxic
"""
VALUES = [round(0.1 * i, 1) for i in range(1, 11)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--json")
    p.add_argument("--src", default=lm.ROOT)
    args = p.parse_args()
    lm.SRC = os.path.abspath(args.src)
    paths = lm.ensure_data(args.size, lm.parse_size(args.size))
    program = os.path.join(lm.OUT, "sweep.tv")
    with open(program, "w") as f:
        f.write(PROGRAM.format(**dict(zip(lm.NAMES, paths, strict=True))))
    out = os.path.join(lm.OUT, "sweep-out")

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        lm.warm(paths)
        os.sync()

    fresh()
    t = time.perf_counter()
    sweep = lm.run_child("tvlang", ["run", program, "-o", out, "-q", "--set", "lam=0.1:1:0.1"])
    sweep_wall = time.perf_counter() - t
    written = sorted(os.listdir(out))
    assert len(written) == len(VALUES), written
    separate = []
    for v in VALUES:
        fresh()
        separate.append(lm.run_child("tvlang", ["run", program, "-o", os.path.join(out, "one.safetensors"), "-q",
                                                "--set", f"lam={v}"]))  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    separate_wall = sum(float(r["wall_s"]) for r in separate)
    separate_work = sum(float(r["work_s"]) for r in separate)
    row = {
        "command": "python " + shlex.join(sys.argv),
        "size": args.size,
        "outputs": len(VALUES),
        "sweep_wall_s": sweep_wall,
        "sweep_work_s": float(sweep["work_s"]),
        "sweep_peak_rss_mib": int(sweep["hwm_kib"]) / 1024,
        "separate_wall_s": separate_wall,
        "separate_work_s": separate_work,
        "ratio_wall": separate_wall / sweep_wall,
        "ratio_work": separate_work / float(sweep["work_s"]),
        "tvlang_commit": lm.source_commit(lm.SRC),
        "others_load": float(sweep["others_load"]),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "command"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    os.makedirs(lm.OUT, exist_ok=True)
    main()
