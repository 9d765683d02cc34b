"""The GPU backend on a CUDA machine, in one run: its tests for real, then what it achieves.

Measures, and writes as one JSON report (``--out``, default ``$OUT`` or benchmarks/out):

- the GPU tests: ``pytest tests/test_triton.py`` with ``TVLANG_TEST_DEVICE=cuda`` (every check of
  tests/triton_checks.py compares the GPU backend with the CPU backend on a real GPU);
- device-resident kernel bandwidth: the generated 5-input bf16 weighted-sum kernel on tensors
  already on the GPU, against ``torch``'s device-to-device copy;
- pinned host→device and device→host copy bandwidth (the ceiling of a host-streamed merge);
- end to end: the mission's merge of 5 synthetic bf16 checkpoints (``--size-gb`` each, written by
  :mod:`tvlang.synth`, read from the page cache) to a file, with ``--device cuda`` and with the
  CPU backend on the same inputs, and whether both outputs are identical.

``--dry-run`` runs all of it on the CPU through Triton's interpreter with tiny sizes, so that the
script is exercised where there is no GPU (the numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSION = "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic"
NAMES = ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic")


def timed(fn: Callable[[], Any], sync: Callable[[], None], repeat: int) -> float:
    """Best wall time of ``repeat`` runs (after one warm-up run)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"missing: {e}"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run_tests(device: str) -> dict[str, Any]:
    """tests/test_triton.py with the checks on ``device`` (cuda, or interpret in a dry run)."""
    env = {**os.environ, "TVLANG_TEST_DEVICE": device, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    return {
        "passed": proc.returncode == 0,
        "summary": lines[-1] if lines else proc.stderr[-2000:],
        "failures": [line for line in lines if line.startswith("FAILED")][:20],
        "seconds": round(time.perf_counter() - t, 1),
    }


def kernel_bandwidth(device: str, n: int, repeat: int) -> dict[str, Any]:
    """The generated 5-input bf16 weighted sum on device-resident tensors, vs a device copy."""
    import torch

    from tvlang.codegen.spec import KernelSpec, Stmt
    from tvlang.codegen.triton import run_spec

    spec = KernelSpec(
        ("BF16",) * 5,
        ((5, "BF16"),),
        (
            *(Stmt("load", (), i) for i in range(5)),
            Stmt("wsum", (0, 1, 2, 3, 4), (1.0, 0.4, -0.4, 0.4, -1.0)),
        ),
        "F32",
        0,
        0,
    )
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(n, generator=g, device=device).bfloat16() for _ in range(5)]
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kernel_s = timed(lambda: run_spec(spec, inputs, [out], [], [], 0), sync, repeat)
    ref = (inputs[0].float() + 0.4 * inputs[1].float()).bfloat16()  # a plausibility check of the launch
    assert out.shape == ref.shape
    src = torch.empty(n * 4, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), sync, repeat)
    moved = 6 * 2 * n
    return {
        "elements": n,
        "kernel_GBps": round(moved / kernel_s / 1e9, 2),
        "torch_copy_GBps": round(2 * src.numel() * 2 / copy_s / 1e9, 2),
        "kernel_vs_copy": round((moved / kernel_s) / (2 * src.numel() * 2 / copy_s), 3),
    }


def transfer_bandwidth(nbytes: int, repeat: int) -> dict[str, Any]:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = timed(lambda: dev.copy_(host, non_blocking=True), torch.cuda.synchronize, repeat)
    d2h = timed(lambda: host.copy_(dev, non_blocking=True), torch.cuda.synchronize, repeat)
    return {
        "bytes": nbytes,
        "pinned_h2d_GBps": round(nbytes / h2d / 1e9, 2),
        "pinned_d2h_GBps": round(nbytes / d2h / 1e9, 2),
    }


def make_inputs(directory: str, size_bytes: int) -> dict[str, str]:
    from tvlang import synth

    if hasattr(synth, "write_family") and hasattr(synth, "spec_for_bytes"):
        spec = synth.spec_for_bytes(size_bytes, vocab=32000 if size_bytes >= 2**28 else 512)
        paths: dict[str, str] = synth.write_family(directory, NAMES, spec, layout="file")
        return paths
    shapes = synth.shapes_for_bytes(size_bytes)
    return dict(synth.make_family(directory, NAMES, shapes, layout="file"))


def end_to_end(directory: str, size_bytes: int, device: str, memory: str) -> dict[str, Any]:
    """The mission's merge, files in and out, on the GPU backend and on the CPU backend."""
    import tvlang
    from tvlang.api import parse_size

    t = time.perf_counter()
    paths = make_inputs(os.path.join(directory, "ckpt"), size_bytes)
    made = time.perf_counter() - t
    for path in paths.values():  # warm the page cache: the merge, not the disk, is measured
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    total_in = sum(os.path.getsize(p) for p in paths.values())
    result: dict[str, Any] = {"inputs_bytes": total_in, "make_inputs_s": round(made, 1)}
    outs = {}
    bindings = {n: paths[n] if n == "base" else tvlang.task_vector(paths[n]) for n in NAMES}  # τ = ft - base
    for name, dev in (("gpu", device), ("cpu", "cpu")):
        out = os.path.join(directory, f"merged-{name}.safetensors")
        opts: dict[str, Any] = {"device": dev, "overwrite": True, "memory": parse_size(memory)}
        t = time.perf_counter()
        tvlang.evaluate(MISSION, bindings=bindings, out=out, **opts)
        seconds = time.perf_counter() - t
        moved = total_in + os.path.getsize(out)
        result[name] = {"seconds": round(seconds, 2), "GBps": round(moved / seconds / 1e9, 2)}
        outs[name] = out
    with open(outs["gpu"], "rb") as a, open(outs["cpu"], "rb") as b:
        identical = True
        while True:
            x, y = a.read(64 << 20), b.read(64 << 20)
            if x != y:
                identical = False
                break
            if not x:
                break
    result["identical_outputs"] = identical
    result["gpu_vs_cpu"] = round(result["cpu"]["seconds"] / result["gpu"]["seconds"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="on the CPU through Triton's interpreter, tiny sizes"
    )
    ap.add_argument(
        "--size-gb", type=float, default=2.0, help="each of the 5 synthetic checkpoints (default 2)"
    )
    ap.add_argument(
        "--memory", default="2G", help="the GPU backend's memory budget for the merge (default 2G)"
    )
    ap.add_argument("--skip-tests", action="store_true", help="only measure")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out"))
    ap.add_argument("--work", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment()}
    if not args.dry_run and not torch.cuda.is_available():
        report["error"] = "no CUDA device: run with --dry-run to exercise this script on the CPU"
        print(json.dumps(report, indent=2))
        return 2
    started = time.perf_counter()
    steps: list[tuple[str, Callable[[], Any]]] = []
    if not args.skip_tests:
        steps.append(("tests", lambda: run_tests("interpret" if args.dry_run else "cuda")))
    n = 20_000 if args.dry_run else 1 << 28
    repeat = 1 if args.dry_run else 10
    steps.append(("kernel_bandwidth", lambda: kernel_bandwidth(device, n, repeat)))
    if not args.dry_run:
        steps.append(("transfer_bandwidth", lambda: transfer_bandwidth(1 << 30, repeat)))
    size = int(8 * 2**20 if args.dry_run else args.size_gb * 2**30)
    work = args.work or tempfile.mkdtemp(prefix="tvlang-gpu-check-")
    steps.append(("end_to_end", lambda: end_to_end(work, size, "cuda", args.memory)))
    for name, step in steps:
        t = time.perf_counter()
        try:
            report[name] = step()
        except Exception as e:  # one failing step must not lose the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check-dry-run.json" if args.dry_run else "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    failed = any(isinstance(v, dict) and "error" in v for v in report.values())
    tests = report.get("tests", {})
    return 1 if failed or (isinstance(tests, dict) and tests.get("passed") is False) else 0


if __name__ == "__main__":
    sys.exit(main())
