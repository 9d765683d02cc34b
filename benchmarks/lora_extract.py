"""Extracting a rank-16 LoRA adapter from a ~100M-parameter task vector: time and peak memory.

Uses the harness of ``linear_merge.py`` (its generated bf16 Llama-shaped family at ``--size``,
fresh child processes, warm page cache, peak RSS as ``VmHWM`` over a child that only imports)::

    python benchmarks/lora_extract.py --size 200M --json benchmarks/out/lora_extract.json

Cases, each on the same base and fine-tune:

- ``--as-lora 16`` (auto: the randomized SVD for every projection here);
- ``--as-lora 16 --lora-svd exact`` (LAPACK's full SVD of every projection), to justify the
  randomized default;
- the linear merge ``base + 0.5*(ft - base)`` to a single file, the baseline of the same run.

The synthetic fine-tune's deltas are dense noise (full rank), so the errors are large: this
measures cost, not quality (tests/test_lora_out.py checks exactness).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_merge as lm


def adapter_errors(adapter: str) -> list[float]:
    """The per-tensor errors from the adapter's header, without importing torch."""
    with open(os.path.join(adapter, "adapter_model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return [float(v) for v in json.loads(header["__metadata__"]["tvlang.lora.errors"]).values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="200M")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--src", default=lm.ROOT)
    args = p.parse_args()
    lm.SRC = os.path.abspath(args.src)
    paths = lm.ensure_data(args.size, lm.parse_size(args.size))
    binds = [f"--bind=base={paths[0]}", f"--bind=ft={paths[1]}"]
    adapter = os.path.join(lm.OUT, f"{args.size}-adapter")
    merged = os.path.join(lm.OUT, f"{args.size}-merged.safetensors")
    cases = {
        "as-lora 16 (auto: randomized SVD)": (["eval", "ft - base", *binds, "--as-lora", "16"], adapter),
        "as-lora 16, --lora-svd exact": (
            ["eval", "ft - base", *binds, "--as-lora", "16", "--lora-svd", "exact"],
            adapter,
        ),
        "linear merge base + 0.5*(ft - base) (baseline)": (
            ["eval", "base + 0.5*(ft - base)", *binds],
            merged,
        ),
    }
    baseline = statistics.median(int(lm.run_child("baseline", [])["hwm_kib"]) for _ in range(2))
    rows: dict[str, dict[str, float]] = {}
    torch_version = ""
    for case, (argv, out) in cases.items():
        runs = []
        for _ in range(args.repeat):
            lm.warm(paths[:2])
            runs.append(lm.run_child("tvlang", [*argv, "-o", out, "--force", "-q"]))
            assert all(r.get("rc") == 0 for r in runs), runs
        torch_version = runs[0]["torch"]
        row = {
            "median_wall_s": statistics.median(float(r["wall_s"]) for r in runs),
            "median_work_s": statistics.median(float(r["work_s"]) for r in runs),
            "peak_rss_over_baseline_mib": (max(int(r["hwm_kib"]) for r in runs) - baseline) / 1024,
        }
        if out == adapter:
            errors = adapter_errors(adapter)
            row["tensors_factored"] = len(errors)
            row["max_error"], row["median_error"] = max(errors), statistics.median(errors)
            row["adapter_mib"] = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) / 2**20
        rows[case] = row
    shutil.rmtree(adapter, ignore_errors=True)
    if os.path.exists(merged):
        os.remove(merged)
    base_work = rows["linear merge base + 0.5*(ft - base) (baseline)"]["median_work_s"]
    print(
        "| case | median wall s | work s | ÷ linear merge (work) | peak RSS over baseline MiB | errors max / median |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for case, r in rows.items():
        errs = f"{r['max_error']:.3f} / {r['median_error']:.3f}" if "max_error" in r else "–"
        print(
            f"| {case} | {r['median_wall_s']:.2f} | {r['median_work_s']:.2f} | "
            f"{r['median_work_s'] / base_work:.1f}× | {r['peak_rss_over_baseline_mib']:.0f} | {errs} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + shlex.join(sys.argv), "tvlang_commit": lm.source_commit(lm.SRC),
                       "machine": lm.machine_facts(torch_version), "results": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    os.makedirs(lm.OUT, exist_ok=True)
    main()
