"""Benchmark: the same linear merge with the local executor and with Ray (a local two-worker cluster).

    python benchmarks/distributed_merge.py --size 1G --repeat 3

1. writes five Llama-shaped bf16 checkpoints of ``--size`` each (:func:`tvlang.synth.write_family`,
   two shards each) under ``benchmarks/out/data/distributed/<size>/``, or reuses them, and a
   1 MiB family for the fixed costs;
2. in one fresh process, runs the 1 MiB merge, then the paper's ``base + 0.4*(t1 - t2 + t3) - t4``
   (fine-tunes bound as task vectors) with the local executor ``--repeat`` times;
3. in another, starts a local Ray cluster (``ray.init(num_cpus=2)``: two worker processes),
   runs the 1 MiB merge on cold workers, then warm, then the big merge ``--repeat`` times with
   ``executor="ray"``, and reads the workers' peak resident memory (``VmHWM``) from the
   executor's summary line after each run (the local process does the same runs in the same order);
4. checks that every Ray output file is byte-identical to the local one.

Both outputs are Hugging Face directories of ``--shard-size`` shards (default 128M: 8 units at
1G; the 1 MiB merge is cut into 256K shards, 4 units, so that both workers run from the start).
Inputs are read once before each process (warm page cache).  Fixed overhead of Ray per run
= 1 MiB merge with Ray − 1 MiB merge locally, both warm; starting the cluster and the first run
on cold workers (each imports torch and tvlang) are reported apart.  The machine is shared: ``others_load`` says how busy the rest of it was.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h

NAMES = ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic")
EXPR = "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic"
SRC = h.ROOT


def merge(paths: dict[str, str], out: str, shard_size: int, executor: str) -> float:
    import tvlang

    bindings: dict[str, Any] = {"base": paths["base"]}
    bindings.update({n: tvlang.task_vector(paths[n]) for n in NAMES[1:]})
    t = time.perf_counter()
    tvlang.evaluate(
        EXPR, bindings, out=out, shard_size=shard_size, overwrite=True, executor=executor, progress=True
    )
    return time.perf_counter() - t


def child_main(kind: str, report: str, args: list[str]) -> None:
    import torch  # noqa: F401

    import tvlang  # noqa: F401

    info: dict[str, Any] = {}
    cpu0 = h.cpu_s()
    if kind == "generate":
        from tvlang import synth

        nbytes = int(args[1])
        vocab = 32000 if nbytes >= 64 * 2**20 else 1024  # a tiny family for the fixed costs
        synth.write_family(args[0], NAMES, synth.spec_for_bytes(nbytes, vocab=vocab), shards=2)
    else:
        big, tiny, out, shard_size, repeat = json.loads(args[0])
        temp = None
        stderr = sys.stderr
        sys.stderr = captured = io.StringIO()
        try:
            if kind == "ray":
                import ray

                temp = tempfile.mkdtemp(prefix="tvray")
                t = time.perf_counter()
                ray.init(
                    address="local",
                    num_cpus=2,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                    _temp_dir=temp,
                )
                info["cluster_start_s"] = time.perf_counter() - t
            # the 1 MiB merge first: on cold workers, then warm; then the big one, warm
            info["tiny_cold_s"] = merge(tiny, out + "-tiny", 2**18, kind)
            info["tiny_s"] = min(merge(tiny, out + "-tiny", 2**18, kind) for _ in range(3))
            info["runs_s"] = [merge(big, out, shard_size, kind) for _ in range(repeat)]
            if kind == "ray":
                ray.shutdown()
        finally:
            sys.stderr = stderr
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
        peaks = [
            int(m) for m in re.findall(r"peak resident memory per worker (\d+) MiB", captured.getvalue())
        ]
        info["worker_peak_mib"] = peaks
    info["cpu_s"] = h.cpu_s()
    info["work_cpu_s"] = h.cpu_s() - cpu0
    info["hwm_kib"] = h.vm_hwm_kib()
    with open(report, "w") as f:
        json.dump(info, f)


def family(label: str, nbytes: int) -> dict[str, str]:
    directory = os.path.join(h.OUT, "data", "distributed", label)
    stamp = os.path.join(directory, "family.json")
    want = {"bytes": nbytes, "names": NAMES, "shards": 2}
    have = None
    if os.path.exists(stamp):
        with open(stamp) as f:
            have = json.load(f)
    if have != json.loads(json.dumps(want)):
        print(f"[{label}] generating 5 checkpoints in {directory} …", file=sys.stderr, flush=True)
        h.run_child(__file__, SRC, "generate", [directory, str(nbytes)])
        with open(stamp, "w") as f:
            json.dump(want, f)
    return {n: os.path.join(directory, n) for n in NAMES}


def files(path: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", type=h.parse_size)
    p.add_argument("--shard-size", default="128M", type=h.parse_size)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=os.path.join(h.OUT, "distributed.json"))
    args = p.parse_args()
    label = f"{args.size / 2**30:g}G" if args.size >= 2**30 else f"{args.size / 2**20:g}M"
    big, tiny = family(label, args.size), family("1M", 2**20)
    outs = {k: os.path.join(h.OUT, f"distributed-{k}") for k in ("local", "ray")}
    res = {}
    for kind in ("local", "ray"):
        for paths in (big, tiny):
            h.warm([os.path.join(d, f) for d in paths.values() for f in os.listdir(d)])
        os.system("sync")
        res[kind] = h.run_child(
            __file__,
            SRC,
            kind,
            [json.dumps([big, tiny, outs[kind], args.shard_size, args.repeat])],
            env={"PYTHONPATH": SRC, "RAY_AUTH_MODE": "disabled"},  # Ray's workers import tvlang from SRC too
        )
    identical = files(outs["local"]) == files(outs["ray"])
    assert identical, "the ray output differs from the local one"
    loc, ray = res["local"], res["ray"]
    nbytes = 6 * args.size  # five read, one written
    local_s, ray_s = statistics.median(loc["runs_s"]), statistics.median(ray["runs_s"])
    summary = {
        "size": label,
        "units": -(-args.size // args.shard_size),
        "local_s": local_s,
        "ray_warm_s": ray_s,
        "ratio_ray_over_local": ray_s / local_s,
        "local_GBps": nbytes / local_s / 1e9,
        "ray_GBps": nbytes / ray_s / 1e9,
        "ray_cluster_start_s": ray["cluster_start_s"],
        "ray_first_run_on_cold_workers_s": ray["tiny_cold_s"],
        "fixed_overhead_per_run_s": ray["tiny_s"] - loc["tiny_s"],
        "tiny_local_s": loc["tiny_s"],
        "tiny_ray_s": ray["tiny_s"],
        "local_process_peak_mib": loc["hwm_kib"] / 1024,
        "ray_worker_peak_mib_after_1MiB": max(ray["worker_peak_mib"][:4]),
        "ray_worker_peak_mib_after_big": max(ray["worker_peak_mib"]),
        "others_load": {k: round(v["others_load"], 2) for k, v in res.items()},
        "byte_identical": identical,
    }
    doc = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "commit": h.source_commit(SRC),
        "machine": h.machine_facts(""),
        "summary": summary,
        "runs": res,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.path.insert(0, sys.argv[2])
        child_main(sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        main()
