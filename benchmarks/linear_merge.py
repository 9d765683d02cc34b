"""Benchmark: the mission's linear merge, tvlang against the naive whole-state-dict approach.

    python benchmarks/linear_merge.py --size 1G --size 2G --repeat 3 --json benchmarks/out/linear.json

For each ``--size`` (bytes per checkpoint, binary units) it

1. writes five deterministic Llama-shaped bf16 checkpoints with :mod:`tvlang.synth`
   (base + four fine-tunes, one ``.safetensors`` file each) under
   ``benchmarks/out/data/<size>/``, or reuses them if they are already there;
2. runs ``base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic`` (each fine-tune
   bound as a task vector, fine-tune minus base) ``--repeat`` times, alternating
   - **tvlang**: ``python -m tvlang eval EXPR --bind base=… --task NAME=… -o … --force -q``,
   - **naive**: ``safetensors.torch.load_file`` all five state dicts, compute the
     expression tensor by tensor in float32 (as the task-vectors paper's code does,
     whole dicts in memory), cast to bf16 and ``save_file``,
   each in a fresh Python process, after reading every input once (warm page cache)
   and ``sync`` (no write-back of an earlier output during the run);
3. measures per run the process wall time (fork to exit, imports included), the time
   inside the process after its imports ("work"), and the peak resident set:
   ``VmHWM`` of the child read from ``/proc/self/status`` just before it exits, minus
   the same for a child that only imports tvlang, torch and safetensors.  (Not
   ``ru_maxrss``: Linux seeds a child's ``ru_maxrss`` with its parent's peak at exec,
   while ``VmHWM`` belongs to the new address space.)  The parent also samples the
   child's ``RssAnon`` / ``RssFile`` every 10 ms to show what holds the memory;
4. checks that the two outputs hold the same tensors and agree within 1 bf16 ulp
   everywhere (allowing, where the result cancels to far below its operands, for float32
   rounding of the operands: see :func:`verify`), and measures both against a float64
   reference on slices of a few tensors, so that a wrong answer is never benchmarked;
5. prints a Markdown table and writes JSON with the machine facts and the command line.

Throughput is (bytes read + bytes written) / median wall time, in GB/s (10⁹ bytes).
The parent never imports torch, so its own memory stays out of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the other benchmarks use these as linear_merge.NAME
from harness import (
    OUT,
    ROOT,
    cpu_s,
    machine_facts,
    parse_size,
    source_commit,
    source_digest,
    vm_hwm_kib,
    warm,
)
from harness import run_child as _run_child

NAMES = ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic")
EXPR = "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic"
TOOLS = ("tvlang", "naive")


# ------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter and writes a JSON report to the path it is given
# ------------------------------------------------------------------------------------------


def child_main(kind: str, report: str, args: list[str]) -> None:
    import safetensors.torch  # noqa: F401
    import torch

    import tvlang
    import tvlang.cli

    info: dict[str, Any] = {"torch": torch.__version__, "tvlang": tvlang.__version__}
    cpu0, t0 = cpu_s(), time.perf_counter()
    if kind == "tvlang":
        info["rc"] = tvlang.cli.main(args)
    elif kind == "naive":
        naive_merge(args[:-1], args[-1])
    elif kind == "generate":
        generate(args[0], int(args[1]))
    elif kind == "verify":
        info["check"] = verify(args[:-2], args[-2], args[-1])
    info["work_s"] = time.perf_counter() - t0
    info["work_cpu_s"] = cpu_s() - cpu0
    info["cpu_s"] = cpu_s()
    info["hwm_kib"] = vm_hwm_kib()
    with open(report, "w") as f:
        json.dump(info, f)


def naive_merge(paths: list[str], out: str) -> None:
    """The paper's way: whole state dicts in memory, float32 math tensor by tensor."""
    from safetensors.torch import load_file, save_file

    sd = dict(zip(NAMES, (load_file(p) for p in paths), strict=True))
    merged = {}
    for key, b16 in sd["base"].items():
        base = b16.float()
        tv = {n: sd[n][key].float() - base for n in NAMES[1:]}
        merged[key] = (base + 0.4 * (tv["amazon_sent"] - tv["amazon_lm"] + tv["yelp_lm"]) - tv["toxic"]).to(
            b16.dtype
        )
    del sd
    save_file(merged, out, metadata={"format": "pt"})


def generate(directory: str, nbytes: int) -> None:
    from tvlang.synth import make_family, shapes_for_bytes

    make_family(directory, NAMES, shapes_for_bytes(nbytes), seed=0)


def verify(paths: list[str], out_tv: str, out_naive: str) -> dict[str, Any]:
    """tvlang vs naive on every value; both vs a float64 reference on slices of a few tensors.

    Two correct float32 computations agree within 1 bf16 ulp of the result, except where
    the result cancels to far below its operands (|result| ≪ u·Σ|wᵢ·xᵢ|, u = 2⁻²⁴): there
    each may be off by a few float32 roundings *of the operands*, which can be several
    ulps of the tiny result.  So the check is |tvlang − naive| ≤ 1 ulp + 16·u·Σ|wᵢ·xᵢ|.
    """
    import torch
    from safetensors import safe_open

    from tvlang.numerics import ulp, ulp_error

    weights = (1.6, 0.4, 0.4, 0.4, 1.0)  # |coefficients| of base, amazon_sent, amazon_lm, yelp_lm, toxic
    ins = [safe_open(p, "pt") for p in paths]
    differ = beyond = total = 0
    apart_max = excess_max = 0.0
    with safe_open(out_tv, "pt") as a, safe_open(out_naive, "pt") as b:
        keys = list(a.keys())
        assert sorted(keys) == sorted(b.keys()), "outputs hold different tensor names"
        for k in keys:
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.shape == y.shape and x.dtype == y.dtype == torch.bfloat16, k
            total += x.numel()
            mask = x.view(torch.int16) != y.view(torch.int16)
            if not mask.any():
                continue
            xd, yd = x[mask].double(), y[mask].double()
            diff, u = (xd - yd).abs(), ulp(yd, torch.bfloat16)
            differ += int(mask.sum())
            apart_max = max(apart_max, (diff / u).max().item())
            far = diff > u
            if far.any():
                scale = sum(
                    w * f.get_tensor(k)[mask][far].double().abs() for w, f in zip(weights, ins, strict=True)
                )
                beyond += int(far.sum())
                excess_max = max(excess_max, ((diff[far] - u[far]) / (2**-24 * scale)).max().item())
        spots = list(
            dict.fromkeys([keys[0], keys[len(keys) // 3], keys[2 * len(keys) // 3], "model.norm.weight"])
        )
        vs_exact = {"tvlang": 0.0, "naive": 0.0}
        for k in spots:
            rows = max(1, (1 << 22) // a.get_slice(k).get_shape()[-1])
            s = {n: f.get_slice(k)[:rows].double() for n, f in zip(NAMES, ins, strict=True)}
            tv = {n: s[n] - s["base"] for n in NAMES[1:]}
            ref = s["base"] + 0.4 * (tv["amazon_sent"] - tv["amazon_lm"] + tv["yelp_lm"]) - tv["toxic"]
            for tool, f in (("tvlang", a), ("naive", b)):
                vs_exact[tool] = max(vs_exact[tool], ulp_error(f.get_slice(k)[:rows], ref).max().item())
    return {"ok": excess_max <= 16, "elements": total, "bits_differ": differ, "max_ulp_apart": apart_max,
            "beyond_1_ulp": beyond, "beyond_1_ulp_max_excess_in_u_sum": excess_max,
            "spot_tensors": spots, "spot_max_ulp_vs_float64": vs_exact}  # fmt: skip


# ------------------------------------------------------------------------------------------
# Parent: no torch here
# ------------------------------------------------------------------------------------------


def run_child(kind: str, args: list[str]) -> dict[str, Any]:
    """Run one of this script's children (see :func:`child_main`) on the tvlang tree ``SRC``."""
    return _run_child(__file__, SRC, kind, args)


def ensure_data(label: str, nbytes: int) -> list[str]:
    directory = os.path.join(OUT, "data", label)
    paths = [os.path.join(directory, n + ".safetensors") for n in NAMES]
    stamp = os.path.join(directory, "family.json")
    want = {"bytes": nbytes, "names": NAMES, "seed": 0}
    if os.path.exists(stamp) and all(map(os.path.exists, paths)):
        with open(stamp) as f:
            if json.load(f) == json.loads(json.dumps(want)):
                return paths
    print(f"[{label}] generating 5 checkpoints in {directory} …", file=sys.stderr, flush=True)
    t = time.perf_counter()
    run_child("generate", [directory, str(nbytes)])
    with open(stamp, "w") as f:
        json.dump(want, f)
    print(f"[{label}] generated in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return paths


def tool_args(tool: str, paths: list[str], out: str) -> list[str]:
    if tool == "naive":
        return [*paths, out]
    binds = [f"--bind=base={paths[0]}"] + [
        f"--task={n}={p}" for n, p in zip(NAMES[1:], paths[1:], strict=True)
    ]
    return ["eval", EXPR, *binds, "-o", out, "--force", "-q"]


def bench_size(label: str, nbytes: int, repeat: int) -> dict[str, Any]:
    paths = ensure_data(label, nbytes)
    outs = {t: os.path.join(OUT, f"{label}-{t}.safetensors") for t in TOOLS}
    warm(paths)
    baseline = [run_child("baseline", []) for _ in range(max(1, repeat))]
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    for r in range(repeat):
        for tool in TOOLS:  # alternate, so drift hits both alike
            if os.path.exists(outs[tool]):
                os.remove(outs[tool])
            warm(paths)
            os.sync()  # no write-back of an earlier output during this run
            res = run_child(tool, tool_args(tool, paths, outs[tool]))
            runs[tool].append(res)
            print(f"[{label}] {tool} run {r + 1}/{repeat}: {res['wall_s']:.2f} s, "
                  f"VmHWM {int(res['hwm_kib']) / 1024:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    check = run_child("verify", [*paths, outs["tvlang"], outs["naive"]])["check"]
    if not check["ok"]:
        raise SystemExit(f"[{label}] outputs disagree by more than 1 ulp: {check}")
    bytes_in = sum(os.path.getsize(p) for p in paths)
    bytes_out = os.path.getsize(outs["tvlang"])
    base_kib = statistics.median(int(b["hwm_kib"]) for b in baseline)
    summary = {}
    for tool, rs in runs.items():
        wall = statistics.median(float(r["wall_s"]) for r in rs)
        hwm = max(int(r["hwm_kib"]) for r in rs)
        sampled = {k: max(int(r["sampled_peak_kib"].get(k, 0)) for r in rs) for k in ("RssAnon", "RssFile")}
        summary[tool] = {
            "median_wall_s": wall,
            "best_wall_s": min(float(r["wall_s"]) for r in rs),
            "median_work_s": statistics.median(float(r["work_s"]) for r in rs),
            "median_work_cpu_s": statistics.median(float(r["work_cpu_s"]) for r in rs),
            "median_others_load": statistics.median(float(r["others_load"]) for r in rs),
            "gb_per_s": (bytes_in + bytes_out) / wall / 1e9,
            "peak_rss_mib": hwm / 1024,
            "peak_rss_over_baseline_mib": (hwm - base_kib) / 1024,
            "sampled_peak_mib": {k: v / 1024 for k, v in sampled.items()},
            "runs": rs,
        }
    for out in outs.values():
        os.remove(out)
    return {"size": label, "bytes_per_checkpoint": bytes_in // len(paths), "bytes_read": bytes_in,
            "bytes_written": bytes_out, "baseline_rss_mib": base_kib / 1024, "baseline_runs": baseline,
            "check": check, "tools": summary}  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    cols = ("size", "tool", "median wall s", "best wall s", "work s", "work CPU s", "GB/s", "peak RSS MiB",
            "over baseline MiB", "RssAnon / RssFile MiB", "others' load (CPUs)")  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]

    def row(*cells: object) -> None:
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    for res in results:
        size, tools, b = res["size"], res["tools"], res["baseline_runs"]

        def med(key: str, rs: list[dict[str, Any]] = b) -> float:
            return statistics.median(float(r[key]) for r in rs)

        anon, file = (
            statistics.median(r["sampled_peak_kib"][k] / 1024 for r in b) for k in ("RssAnon", "RssFile")
        )
        # fmt: off
        row(size, "baseline (imports only)", f"{med('wall_s'):.2f}", f"{min(r['wall_s'] for r in b):.2f}",
            "–", "–", "–", f"{res['baseline_rss_mib']:.0f}", 0, f"{anon:.0f} / {file:.0f}", f"{med('others_load'):.2f}")
        for tool in TOOLS:
            t = tools[tool]
            row(size, tool, *(f"{t[k]:.2f}" for k in ("median_wall_s", "best_wall_s", "median_work_s",
                "median_work_cpu_s", "gb_per_s")), f"{t['peak_rss_mib']:.0f}", f"{t['peak_rss_over_baseline_mib']:.0f}",
                "{RssAnon:.0f} / {RssFile:.0f}".format(**t["sampled_peak_mib"]), f"{t['median_others_load']:.2f}")
        n, v = tools["naive"], tools["tvlang"]

        def ratio(key: str, n: dict[str, Any] = n, v: dict[str, Any] = v) -> str:
            return f"{n[key] / max(v[key], 1e-9):.1f}×"

        row(size, "**naive / tvlang**", f"**{ratio('median_wall_s')}**", ratio("best_wall_s"), ratio("median_work_s"),
            ratio("median_work_cpu_s"), "", "", f"**{ratio('peak_rss_over_baseline_mib')}**", "", "")
        # fmt: on
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", action="append", type=str, help="bytes per checkpoint, e.g. 1G (repeatable)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per tool and size (median reported)")
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--src",
        default=ROOT,
        help="import tvlang from this tree (default: this checkout); while others edit the checkout, "
        "a snapshot: git archive HEAD tvlang grammar | tar -x -C DIR; git rev-parse HEAD > DIR/COMMIT",
    )
    args = p.parse_args()
    global SRC
    SRC = os.path.abspath(args.src)
    digest = source_digest(SRC)
    sizes = args.size or ["1G"]
    results = []
    for label in sizes:
        results.append(bench_size(label, parse_size(label), args.repeat))
    if source_digest(SRC) != digest:
        print(f"warning: the tvlang sources under {SRC} changed during the run", file=sys.stderr)
    doc = {
        "command": "python " + shlex.join(sys.argv),
        "cwd": os.getcwd(),
        "expression": EXPR,
        "tvlang_src": SRC,
        "tvlang_commit": source_commit(SRC),
        "tvlang_sources_sha256": digest,
        "machine": machine_facts(str(results[0]["baseline_runs"][0]["torch"])),
        "repeat": args.repeat,
        "results": results,
    }
    print(table(results))
    for res in results:
        c = res["check"]
        print(
            f"\n{res['size']}: {c['bits_differ']:,} of {c['elements']:,} bf16 values differ between tvlang and naive, "
            f"by ≤ {c['max_ulp_apart']:.2f} ulp; {c['beyond_1_ulp']} by more than 1 ulp (cancellation: within "
            f"1 ulp + {c['beyond_1_ulp_max_excess_in_u_sum']:.2f}·u·Σ|wᵢxᵢ|); spot slices vs float64: "
            f"{c['spot_max_ulp_vs_float64']}"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


SRC = ROOT  # the tree whose tvlang the children import (--src)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.path.insert(0, sys.argv[2])
        child_main(sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        os.makedirs(OUT, exist_ok=True)
        main()
