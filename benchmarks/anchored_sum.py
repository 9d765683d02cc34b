"""Benchmark: the anchored weighted sum against the flat one it replaced, same inputs, same run.

    git archive 025b972 tvlang grammar | tar -x -C /tmp/tv-flat && echo 025b972 > /tmp/tv-flat/COMMIT
    python benchmarks/anchored_sum.py --old /tmp/tv-flat --size 256M --repeat 7

The linear pass once emitted ``wsum 1.6*base + 0.4*ft1 - …`` and now emits
``wsum 0.4*(ft1 - base) - … + 1*base``: one more subtraction per fine-tune and element, formed
once per chunk.  This script times the mission's task-arithmetic merge (``linear_merge.EXPR``
through ``tvlang eval``, a bf16 base and four fine-tunes from :mod:`tvlang.synth`, one
``.safetensors`` file each) with the tvlang tree ``--old`` and the tree ``--new`` (default: this
checkout), alternating old/new in each repetition, each run a fresh process on a warm page cache,
for both CPU kernel modes (``--kernels compiled`` and ``--kernels eager``).  It reports median wall
and work (after the imports) seconds and the ratio new ÷ old (below 1: the new code is faster).
Then the same merge on in-memory state dicts, timed inside the process (the kernels without file
I/O or imports), the trees alternating.

Then, on slices of a few tensors, the share of output values that are the float64 result rounded
once to bf16 (round to nearest, ties to even) for both trees: what the anchored form is for.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_merge as lm
from harness import OUT, ROOT, machine_facts, parse_size, run_child, source_commit, source_digest, warm

MODES = ("compiled", "eager")


def memory_child(report: str, nbytes: int, repeat: int) -> None:
    """The same merge on in-memory state dicts (no file reads or writes, imports not timed):
    ``repeat`` timed ``tvlang.evaluate`` calls per kernel mode, interleaved."""
    import time

    import torch

    import tvlang
    from tvlang.synth import make_state, shapes_for_bytes

    torch.set_num_threads(1)
    shapes = shapes_for_bytes(nbytes)
    base = make_state(shapes, 0)
    states = {"base": base, **{n: make_state(shapes, i, base=base) for i, n in enumerate(lm.NAMES[1:], 1)}}
    bindings = {"base": base, **{n: tvlang.task_vector(states[n]) for n in lm.NAMES[1:]}}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeat + 1):  # the first round compiles and warms up: not counted
        for mode in MODES:
            t0, c0 = time.perf_counter(), time.process_time()
            tvlang.evaluate(lm.EXPR, bindings, kernels=mode, threads=1)
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    with open(report, "w") as fh:
        result = {"seconds": {m: t[1:] for m, t in times.items()}, "cpu": {m: t[1:] for m, t in cpu.items()}}
        json.dump({**result, "cpu_s": 0.0}, fh)


def kernel_child(report: str, n: int, repeat: int) -> None:
    """One chunk of ``n`` elements through the flat and the anchored kernel of the same merge, in
    this process, interleaved: the flat one is the anchored one's weights on the inputs themselves
    (what the linear pass emitted before), run by the same code."""
    import time
    from dataclasses import replace

    import torch

    import tvlang
    from tvlang.backends.compiled import Kernels, call
    from tvlang.backends.cpu import Scratch, run_kernel
    from tvlang.plan.plan import TensorWrite, WeightedSum

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g) * 0.02
    states = {"base": {"w": base.bfloat16()}}
    for name in lm.NAMES[1:]:
        states[name] = {"w": (base + 2e-4 * torch.randn(n, generator=g)).bfloat16()}
    bindings = {"base": states["base"], **{m: tvlang.task_vector(states[m]) for m in lm.NAMES[1:]}}
    plan = tvlang.compile(lm.EXPR, bindings=bindings).plan(options=tvlang.Options(kernels="compiled"))
    task = plan.tasks[0]
    anchored = task.writes[0].kernel
    assert isinstance(anchored, WeightedSum) and any(m is not None for _, _, m in anchored.terms)
    flat_weights: dict[int, float] = {}
    for w, slot, minus in anchored.terms:
        flat_weights[slot] = flat_weights.get(slot, 0.0) + w
        if minus is not None:
            flat_weights[minus] = flat_weights.get(minus, 0.0) - w
    flat = WeightedSum(tuple((w, i, None) for i, w in flat_weights.items()), anchored.acc)
    views = {i: states[plan.inputs[i].ref.label]["w"] for i in task.reads}
    out = torch.empty(n, dtype=torch.bfloat16)
    scratch = Scratch()
    kernels = {
        form: Kernels(plan).task(replace(task, writes=(TensorWrite(0, "BF16", k),)))
        for form, k in (("flat", flat), ("anchored", anchored))
    }
    runs = {
        ("eager", "flat"): lambda: run_kernel(flat, views, out, scratch, {}),
        ("eager", "anchored"): lambda: run_kernel(anchored, views, out, scratch, {}),
        **{("compiled", f): (lambda k=k: call(k, views, [out], {}, [], 0)) for f, k in kernels.items()},  # type: ignore[misc]
    }
    cpu: dict[str, list[float]] = {f"{m}/{f}": [] for m, f in runs}
    for r in range(repeat + 1):  # the first round warms up: not counted
        for (mode, form), fn in runs.items():
            c0 = time.process_time()
            for _ in range(10):
                fn()
            if r:
                cpu[f"{mode}/{form}"].append((time.process_time() - c0) / 10)
    with open(report, "w") as fh:
        json.dump({"cpu": cpu, "cpu_s": 0.0}, fh)


def child_main(kind: str, report: str, args: list[str]) -> None:
    """``accuracy PATHS… OUT``: the correctly rounded share of ``OUT`` on slices of a few tensors;
    ``memory BYTES REPEAT``: :func:`memory_child`."""
    import torch
    from safetensors import safe_open

    from tvlang.numerics import ulp_error

    if kind == "memory":
        memory_child(report, int(args[0]), int(args[1]))
        return
    if kind == "kernel":
        kernel_child(report, int(args[0]), int(args[1]))
        return
    assert kind == "accuracy"
    paths, out = args[:-1], args[-1]
    ins = [safe_open(p, "pt") for p in paths]
    good = total = 0
    worst = 0.0
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
        for k in dict.fromkeys(
            [keys[1], keys[len(keys) // 3], keys[2 * len(keys) // 3], "model.norm.weight"]
        ):
            rows = max(1, (1 << 21) // f.get_slice(k).get_shape()[-1])
            s = {n: x.get_slice(k)[:rows].double() for n, x in zip(lm.NAMES, ins, strict=True)}
            tv = {n: s[n] - s["base"] for n in lm.NAMES[1:]}
            ref = s["base"] + 0.4 * (tv["amazon_sent"] - tv["amazon_lm"] + tv["yelp_lm"]) - tv["toxic"]
            got = f.get_slice(k)[:rows]
            err = ulp_error(got, ref)
            even = got.view(torch.int16) % 2 == 0
            good += int(((err < 0.5) | ((err == 0.5) & even)).sum())
            total += err.numel()
            worst = max(worst, err.max().item())
    with open(report, "w") as fh:
        json.dump({"correctly_rounded": good / total, "elements": total, "max_ulp": worst, "cpu_s": 0.0}, fh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--old", required=True, help="the tvlang tree to compare against (a snapshot of the old code)"
    )
    p.add_argument("--new", default=ROOT, help="the tvlang tree under test (default: this checkout)")
    p.add_argument("--size", default="256M", help="bytes per checkpoint, e.g. 256M")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per tree and mode (median reported)")
    p.add_argument("--memory-size", default="64M", help="bytes per checkpoint for the in-memory runs")
    p.add_argument(
        "--memory-rounds", type=int, default=5, help="child processes per tree, 3 timed calls each"
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    digests = {k: source_digest(v) for k, v in trees.items()}
    paths = lm.ensure_data(args.size, parse_size(args.size))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, t): [] for m in MODES for t in trees}
    outs = {t: os.path.join(OUT, f"anchored-{t}.safetensors") for t in trees}
    for r in range(args.repeat):
        for mode in MODES:
            for tree, src in trees.items():  # alternate, so drift hits both alike
                if os.path.exists(outs[tree]):
                    os.remove(outs[tree])
                warm(paths)
                os.sync()
                cmd = [*lm.tool_args("tvlang", paths, outs[tree]), "--kernels", mode]
                res = run_child(lm.__file__, src, "tvlang", cmd)
                runs[(mode, tree)].append(res)
                print(f"{mode} {tree} run {r + 1}/{args.repeat}: {res['wall_s']:.2f} s wall, "
                      f"{res['work_s']:.2f} s work", file=sys.stderr, flush=True)  # fmt: skip
    accuracy = {}
    if args.repeat:
        accuracy = {t: run_child(__file__, trees["new"], "accuracy", [*paths, outs[t]]) for t in trees}
    # in memory: the kernels without file I/O and imports; the trees alternate, several rounds
    in_memory = {t: {k: {m: [] for m in MODES} for k in ("seconds", "cpu")} for t in trees}
    for _ in range(args.memory_rounds):
        for tree, src in trees.items():
            res = run_child(__file__, src, "memory", [str(parse_size(args.memory_size)), "3"])
            for k in ("seconds", "cpu"):
                for m in MODES:
                    in_memory[tree][k][m].extend(res[k][m])
    chunk = run_child(__file__, trees["new"], "kernel", [str(1 << 20), "30"])["cpu"]
    for out in outs.values():
        if os.path.exists(out):
            os.remove(out)
    summary: dict[str, Any] = {}
    lines = [
        "| kernels | tree | n | median wall s | median work s | others' load (CPUs) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in MODES if args.repeat else ():
        med = {t: {k: statistics.median(float(x[k]) for x in runs[(mode, t)]) for k in ("wall_s", "work_s")}
               for t in trees}  # fmt: skip
        for t in trees:
            load = statistics.median(float(x["others_load"]) for x in runs[(mode, t)])
            lines.append(
                f"| {mode} | {t} | {args.repeat} | {med[t]['wall_s']:.2f} | {med[t]['work_s']:.2f} | {load:.2f} |"
            )
        ratio = {k: med["new"][k] / med["old"][k] for k in ("wall_s", "work_s")}
        lines.append(
            f"| {mode} | **new ÷ old** | | **{ratio['wall_s']:.3f}** | **{ratio['work_s']:.3f}** | |"
        )
        summary[mode] = {"median": med, "ratio_new_over_old": ratio}
    lines += [
        "",
        f"In memory ({args.memory_size} per checkpoint, state dicts in, state dict out, 1 thread):",
        "",
        "| kernels | old median wall s | new median wall s | new ÷ old | old median CPU s | new median CPU s | new ÷ old |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        old, new = (statistics.median(in_memory[t]["seconds"][mode]) for t in ("old", "new"))
        old_cpu, new_cpu = (statistics.median(in_memory[t]["cpu"][mode]) for t in ("old", "new"))
        lines.append(
            f"| {mode} | {old:.3f} | {new:.3f} | **{new / old:.3f}** | {old_cpu:.3f} | {new_cpu:.3f} "
            f"| **{new_cpu / old_cpu:.3f}** |"
        )
        summary.setdefault(mode, {})["in_memory"] = {
            "old_s": old, "new_s": new, "old_cpu_s": old_cpu, "new_cpu_s": new_cpu,
            "ratio_new_over_old": new / old, "cpu_ratio_new_over_old": new_cpu / old_cpu,
        }  # fmt: skip
    lines += [
        "",
        "One 1M-element bf16 chunk through the kernel alone (this checkout; the flat form is the old one's "
        "arithmetic), median process CPU time of 30 × 10 calls, interleaved:",
        "",
        "| kernels | flat µs | anchored µs | anchored ÷ flat |",
        "|---|---:|---:|---:|",
    ]
    for mode in MODES:
        flat_us, anch_us = (statistics.median(chunk[f"{mode}/{f}"]) * 1e6 for f in ("flat", "anchored"))
        lines.append(f"| {mode} | {flat_us:.0f} | {anch_us:.0f} | **{anch_us / flat_us:.3f}** |")
        summary.setdefault(mode, {})["chunk"] = {"flat_us": flat_us, "anchored_us": anch_us}
    lines.append("")
    for t in accuracy:
        a = accuracy[t]
        lines.append(f"{t}: {a['correctly_rounded']:.4%} of {a['elements']:,} sampled bf16 values correctly rounded, "
                     f"worst {a['max_ulp']:.2f} ulp")  # fmt: skip
    print("\n".join(lines))
    if any(source_digest(v) != digests[k] for k, v in trees.items()):
        print("warning: a tvlang tree changed during the run", file=sys.stderr)
    if args.json:
        doc = {"command": "python " + shlex.join(sys.argv), "size": args.size, "repeat": args.repeat,
               "trees": {k: {"src": v, "commit": source_commit(v), "sha256": digests[k]} for k, v in trees.items()},
               "machine": machine_facts(importlib.metadata.version("torch")), "summary": summary,
               "accuracy": accuracy, "in_memory": in_memory, "runs": {f"{m}/{t}": v for (m, t), v in runs.items()}}  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.path.insert(0, sys.argv[2])
        child_main(sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        os.makedirs(OUT, exist_ok=True)
        main()
