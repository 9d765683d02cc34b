"""Benchmark: depth up-scaling (a model's layers 0–24 stacked on its layers 8–32), against a linear
merge that writes an output of the same size, and mergekit on the same YAML when it is installed.

    python benchmarks/stack_merge.py --size 1G --repeat 3 --json benchmarks/out/stack.json

1. Writes (once) a Llama-shaped bf16 model of about ``--size`` bytes with 32 layers, and two models
   of the same width with 48 layers (the stacked output's depth) for the linear merge, with
   :func:`tvlang.synth.write_family` under ``benchmarks/out/data/stack-<size>/``.
2. Runs, alternating, each in a fresh process after warming the page cache and ``sync``:
   - **stack**: ``tvlang run stack.yml``, mergekit's ``passthrough`` with ``slices:`` 0–24 and 8–32;
   - **linear**: ``tvlang run linear.yml``, mergekit's ``linear`` 0.5/0.5 of the two 48-layer models;
   - **copy**: ``tvlang run copy.yml``, mergekit's ``passthrough`` of one 48-layer model (the floor:
     one input tensor read per output tensor, as in the stack);
   - **mergekit stack**: ``mergekit-yaml stack.yml`` in its own environment (``--mergekit-python``,
     default ``~/mergekit-venv/bin/python``), if there is one.
3. Checks that the stacked output holds, bit for bit, the source tensor each output tensor maps to.

Reported per case: median wall time (process start to exit), output bytes per second (the same
output size for both cases, so the ratio is the one that matters), input + output bytes per second,
and peak RSS (``VmHWM``) over a child that only imports the same modules.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import OUT, ROOT, cpu_s, machine_facts, parse_size, run_child, source_commit, vm_hwm_kib, warm

SRC = ROOT
LAYERS = 32
SLICES = ((0, 24), (8, 32))
DEFAULT_MERGEKIT = os.path.expanduser("~/mergekit-venv/bin/python")


def child_main(kind: str, report: str, args: list[str]) -> None:
    info: dict[str, Any] = {}
    if kind == "mergekit":
        import torch
        from mergekit.scripts.run_yaml import main as mergekit_yaml

        cpu0, t0 = cpu_s(), time.perf_counter()
        if args:
            mergekit_yaml.main(args, standalone_mode=False)
    else:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        import tvlang.cli

        cpu0, t0 = cpu_s(), time.perf_counter()
        if kind == "tvlang" and args:
            info["rc"] = tvlang.cli.main(args)
        elif kind == "generate":
            generate(args[0], int(args[1]))
        elif kind == "verify":
            info["check"] = verify(args[0], args[1])
    info.update(
        work_s=time.perf_counter() - t0, work_cpu_s=cpu_s() - cpu0, cpu_s=cpu_s(), hwm_kib=vm_hwm_kib()
    )
    with open(report, "w") as f:
        json.dump(info, f)


def generate(directory: str, nbytes: int) -> None:
    from tvlang.synth import llama_spec, spec_for_bytes, write_family

    spec = spec_for_bytes(nbytes, layers=LAYERS)
    write_family(os.path.join(directory, "one"), ["a"], spec, shards=1)
    deep = llama_spec(spec.hidden, sum(hi - lo for lo, hi in SLICES), spec.vocab)
    write_family(os.path.join(directory, "deep"), ["base", "ft"], deep, shards=1)


def verify(model: str, stacked: str) -> str:
    """Every tensor of the stacked output is, bit for bit, the source tensor it maps to."""
    import torch
    from safetensors import safe_open

    sources = [lo + i for lo, hi in SLICES for i in range(hi - lo)]
    with (
        safe_open(os.path.join(model, "model.safetensors"), "pt") as src,
        safe_open(os.path.join(stacked, "model.safetensors"), "pt") as out,
    ):
        names = list(out.keys())
        for name in names:
            parts = name.split(".")
            if "layers" in parts:
                k = parts.index("layers") + 1
                parts[k] = str(sources[int(parts[k])])
            if not torch.equal(out.get_tensor(name), src.get_tensor(".".join(parts))):
                raise SystemExit(f"{name} is not its source tensor")
    return f"{len(names)} tensors, each equal to its source"


def configs(data: str) -> dict[str, str]:
    a = os.path.join(data, "one", "a")
    stack = "merge_method: passthrough\ndtype: bfloat16\nslices:\n" + "".join(
        f"  - sources:\n      - model: {a}\n        layer_range: [{lo}, {hi}]\n" for lo, hi in SLICES
    )
    linear = "merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
        f"  - model: {os.path.join(data, 'deep', n)}\n    parameters: {{weight: 0.5}}\n"
        for n in ("base", "ft")
    )
    copy = f"merge_method: passthrough\ndtype: bfloat16\nmodels:\n  - model: {os.path.join(data, 'deep', 'base')}\n"
    paths = {}
    for name, text in (("stack", stack), ("linear", linear), ("copy", copy)):
        paths[name] = os.path.join(data, f"{name}.yml")
        with open(paths[name], "w") as f:
            f.write(text)
    return paths


def files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def nbytes(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def main() -> None:
    global SRC
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mergekit-python", default=os.environ.get("TVLANG_MERGEKIT_PYTHON", DEFAULT_MERGEKIT))
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--json")
    p.add_argument("--src", default=ROOT)
    args = p.parse_args()
    SRC = os.path.abspath(args.src)
    data = os.path.join(OUT, "data", f"stack-{args.size}")
    stamp = os.path.join(data, "family.json")
    want = {"bytes": parse_size(args.size), "layers": LAYERS, "slices": SLICES}
    fresh = False
    if os.path.exists(stamp):
        with open(stamp) as f:
            fresh = json.load(f) == json.loads(json.dumps(want))
    if not fresh:
        print(f"generating inputs in {data} …", file=sys.stderr, flush=True)
        run_child(__file__, SRC, "generate", [data, str(want["bytes"])])
        with open(stamp, "w") as f:
            json.dump(want, f)
    cfg = configs(data)
    inputs = {"stack": files(os.path.join(data, "one", "a")), "linear": [
        *files(os.path.join(data, "deep", "base")), *files(os.path.join(data, "deep", "ft"))],
        "copy": files(os.path.join(data, "deep", "base"))}  # fmt: skip
    outs = {
        case: os.path.join(OUT, f"stack-bench-{case}") for case in ("stack", "linear", "copy", "mergekit")
    }
    mk = None if args.no_mergekit or not os.path.exists(args.mergekit_python) else args.mergekit_python
    cases = {
        f"tvlang {case}": ("tvlang", ["run", cfg[case], "-o", outs[case], "--force", "-q"], case, None)
        for case in ("stack", "linear", "copy")
    }
    if mk is not None:
        flags = ["--no-copy-tokenizer", "--lazy-unpickle", "--quiet"]
        cases["mergekit stack"] = ("mergekit", [cfg["stack"], outs["mergekit"], *flags], "stack", mk)
    baseline = {
        "tvlang": statistics.median(int(run_child(__file__, SRC, "tvlang", [])["hwm_kib"]) for _ in range(2)),
    }
    if mk is not None:
        baseline["mergekit"] = int(run_child(__file__, SRC, "mergekit", [], python=mk)["hwm_kib"])
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(args.repeat):
        for case, (kind, argv, which, python) in cases.items():
            out = argv[3] if kind == "tvlang" else argv[1]
            subprocess.run(["rm", "-rf", out], check=True)
            warm(inputs[which])
            os.sync()
            runs[case].append(run_child(__file__, SRC, kind, argv, python=python or sys.executable,
                                        env={"HF_HUB_OFFLINE": "1"}))  # fmt: skip
    check = run_child(__file__, SRC, "verify", [os.path.join(data, "one", "a"), outs["stack"]])["check"]
    rows = {}
    for case, (kind, argv, which, _) in cases.items():
        out = argv[3] if kind == "tvlang" else argv[1]
        written = nbytes(files(out))
        read = (
            nbytes(inputs["linear"]) if which == "linear" else written
        )  # one input tensor per output tensor
        wall = statistics.median(float(r["wall_s"]) for r in runs[case])
        rows[case] = {
            "median_wall_s": wall,
            "median_work_s": statistics.median(float(r["work_s"]) for r in runs[case]),
            "output_gb": written / 1e9,
            "output_gb_per_s": written / wall / 1e9,
            "io_gb_per_s": (read + written) / wall / 1e9,
            "peak_rss_over_baseline_mib": (max(int(r["hwm_kib"]) for r in runs[case]) - baseline[kind])
            / 1024,
            "others_load": statistics.median(float(r["others_load"]) for r in runs[case]),
            "n": len(runs[case]),
            "walls_s": [round(float(r["wall_s"]), 2) for r in runs[case]],
        }
    for out in outs.values():
        subprocess.run(["rm", "-rf", out], check=True)
    command = "python " + shlex.join(sys.argv)
    print(f"`{command}` — {check}\n")
    print(
        "| case | n | median wall s | work s | output GB | output GB/s | in+out GB/s | peak RSS over baseline MiB | others' load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case, r in rows.items():
        print(f"| {case} | {r['n']} | {r['median_wall_s']:.2f} | {r['median_work_s']:.2f} | {r['output_gb']:.2f} | "
              f"{r['output_gb_per_s']:.2f} | {r['io_gb_per_s']:.2f} | {r['peak_rss_over_baseline_mib']:.0f} | "
              f"{r['others_load']:.2f} |")  # fmt: skip
    for other in ("linear", "copy"):
        ratio = rows[f"tvlang {other}"]["median_wall_s"] / rows["tvlang stack"]["median_wall_s"]
        print(f"stack vs {other} of the same output size: {ratio:.2f}× its output throughput")
    if "mergekit stack" in rows:
        print(
            f"mergekit / tvlang on the stack: {rows['mergekit stack']['median_wall_s'] / rows['tvlang stack']['median_wall_s']:.1f}× the time"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "check": check, "machine": machine_facts("?"),
                       "tvlang_commit": source_commit(SRC), "results": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.path.insert(0, sys.argv[2])
        child_main(sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        main()
