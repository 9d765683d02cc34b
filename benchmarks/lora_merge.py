"""A LoRA adapter merged into a 1 GB base: peak memory shows no dense copy of B@A.

Uses the harness of ``linear_merge.py``.  Writes a rank-16 PEFT adapter on every attention and
MLP projection of the generated base (once, next to the checkpoints), then runs::

    python benchmarks/lora_merge.py --size 1G --json benchmarks/out/lora.json

``base + lora(adapter)`` and, for scale, the linear merge of the same base with one full
fine-tune.  A dense B@A of the largest projection alone would be its numel × 8 bytes (float64).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_merge as lm

RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(base_path: str, out_dir: str) -> int:
    """A seeded rank-16 adapter for every targeted projection; returns the largest target's numel."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, largest = {}, 0
    g = torch.Generator().manual_seed(0)
    with safe_open(base_path, "pt") as f:
        for name in f.keys():  # noqa: SIM118
            if not any(f".{t}.weight" in name for t in TARGETS):
                continue
            out_features, in_features = f.get_slice(name).get_shape()
            largest = max(largest, out_features * in_features)
            module = name[: -len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn(RANK, in_features, generator=g) * 0.01
            ).bfloat16()
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(out_features, RANK, generator=g) * 0.01
            ).bfloat16()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(TARGETS)}, f)
    return largest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--src", default=lm.ROOT)
    args = p.parse_args()
    lm.SRC = os.path.abspath(args.src)
    paths = lm.ensure_data(args.size, lm.parse_size(args.size))
    adapter = os.path.join(os.path.dirname(paths[0]), "adapter")
    largest = write_adapter(paths[0], adapter)
    out = os.path.join(lm.OUT, f"{args.size}-lora.safetensors")
    cases = {
        "base + lora(adapter)": ["eval", f'base + lora("{adapter}")', f"--bind=base={paths[0]}"],
        "base + 0.5*(ft - base)": [
            "eval",
            "base + 0.5*(ft - base)",
            f"--bind=base={paths[0]}",
            f"--bind=ft={paths[1]}",
        ],
    }
    baseline = statistics.median(int(lm.run_child("baseline", [])["hwm_kib"]) for _ in range(2))
    rows = {}
    for case, argv in cases.items():
        runs = []
        for _ in range(args.repeat):
            if os.path.exists(out):
                os.remove(out)
            lm.warm(paths[:2])
            runs.append(lm.run_child("tvlang", [*argv, "-o", out, "--force", "-q"]))
        rows[case] = {
            "median_wall_s": statistics.median(float(r["wall_s"]) for r in runs),
            "peak_rss_over_baseline_mib": (max(int(r["hwm_kib"]) for r in runs) - baseline) / 1024,
        }
    if os.path.exists(out):
        os.remove(out)
    dense_mib = largest * 8 / 2**20
    print("| case | median wall s | peak RSS over baseline MiB |\n|---|---:|---:|")
    for case, row in rows.items():
        print(f"| {case} | {row['median_wall_s']:.1f} | {row['peak_rss_over_baseline_mib']:.0f} |")
    print(f"\na dense float64 B@A of the largest projection alone would take {dense_mib:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + shlex.join(sys.argv), "rank": RANK, "dense_largest_mib": dense_mib,
                       "tvlang_commit": lm.source_commit(lm.SRC), "results": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    os.makedirs(lm.OUT, exist_ok=True)
    main()
