"""Choosing λ: ``tvlang.tune`` (merge into a model in memory, score, repeat) against the workflow it
replaces (write each candidate with ``tvlang run``, load it with safetensors, score it).

    python benchmarks/tune_lambda.py                 # 20 trials of λ on a 1 GB bf16 model
    python benchmarks/tune_lambda.py --size 100M     # a quick look

Inputs: a Llama-shaped base and one fine-tune from ``tvlang.synth.write_family`` (Hugging Face
directories) under ``benchmarks/out/data/tune/``; the program is ``base + lam*(ft - base)``; λ
takes the same 20 evenly spaced values in [0, 1] in both cases.  The score is cheap on purpose
(a sum over one element per 4 KiB page: it touches every page of the model, as any evaluation
does, without the cost of one), so the table measures what surrounds it.

Each case runs in a fresh process after the inputs were read once (warm page cache):

- ``tune``: load the template model once (a state dict of preallocated tensors, read by
  tvlang), then ``tvlang.tune(..., into=model, trials=20)``;
- ``write+load``: per λ, ``tvlang run prog.tv --set lam=… -o cand.safetensors`` (a child
  process, as a user's loop would run it), ``safetensors.torch.load_file``, score, delete.

Peak RSS is the process's ``VmHWM`` minus that of a process that only imports torch,
safetensors and tvlang; for ``write+load`` the ``tvlang run`` children's peak is reported too.
Both cases must choose the same λ with the same scores (they compute the same bits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
TRIALS = 20
PROGRAM = 'base = load("base")\nparam lam = 0.5\noutput merged = base + lam*(load("ft") - base)\n'


# `tvlang run ARGS`, then the process's own peak RSS on stdout (a child's ru_maxrss would count the
# parent's memory at fork time)
CLI = (
    "import sys\nfrom tvlang.cli import main\nrc = main(sys.argv[1:])\n"
    "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n"
    "sys.exit(rc)"
)


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (robust to other jobs on a shared machine)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def score(model: Any) -> float:
    """Cheap, but it touches every page of every weight (as any evaluation reads them all): a sum
    over one element per 4 KiB, so a lazily mapped model is made resident too."""
    total = 0.0
    for t in model.values():
        if t.is_floating_point():
            flat = t.reshape(-1)
            total += float(flat[:: max(1, 4096 // t.element_size())].float().sum())
    return total


def lams() -> list[float]:
    return [round(i / (TRIALS - 1), 12) for i in range(TRIALS)]


def case_imports() -> dict[str, Any]:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import tvlang  # noqa: F401

    return {"peak": vm_hwm()}


def case_tune(data: str) -> dict[str, Any]:
    import tvlang

    cpu0 = cpu_seconds()  # after the imports, as the wall clock starts
    start = time.perf_counter()
    prog = tvlang.compile_file(os.path.join(data, "prog.tv"))
    model = tvlang.evaluate("m", {"m": os.path.join(data, "base")})  # the template, read once
    loaded = time.perf_counter() - start
    res = tvlang.tune(prog, {"lam": lams()}, score, into=model, progress=False, keep_best=False)
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "load": loaded,
        "per_trial": [t.seconds for t in res.trials],
        "scores": [t.score for t in res.trials],
        "best": res.best_params["lam"],
        "peak": vm_hwm(),
        "cpu": cpu_seconds() - cpu0,
        "loadavg": os.getloadavg()[0],
    }


def case_write_load(data: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    cand = os.path.join(OUT, "tune-candidate.safetensors")
    children = 0
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    scores, per = [], []
    for lam in lams():
        t0 = time.perf_counter()
        argv = ["run", os.path.join(data, "prog.tv"), "--set", f"lam={lam!r}", "-o", cand, "--force", "-q"]
        proc = subprocess.run([sys.executable, "-c", CLI, *argv], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
        children = max(children, int(proc.stdout.split()[-1]))
        model = load_file(cand)
        scores.append(score(model))
        del model
        os.remove(cand)
        per.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    best = lams()[max(range(TRIALS), key=lambda i: scores[i])]
    return {
        "wall": wall,
        "per_trial": per,
        "scores": scores,
        "best": best,
        "peak": vm_hwm(),
        "child_peak": children,
        "cpu": cpu_seconds() - cpu0,
        "loadavg": os.getloadavg()[0],
    }


def child(case: str, data: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", case, "--data", data]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def parse_size(text: str) -> int:
    units = {"M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="bytes of one checkpoint (bf16), e.g. 1G or 100M")
    p.add_argument("--case", choices=("imports", "tune", "write_load"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run = {"imports": lambda: case_imports(), "tune": lambda: case_tune(args.data),
               "write_load": lambda: case_write_load(args.data)}[args.case]  # fmt: skip
        print(json.dumps(run()))
        return 0

    sys.path.insert(0, ROOT)
    from tvlang.synth import spec_for_bytes, write_family

    data = os.path.join(OUT, "data", "tune", args.size)
    spec = spec_for_bytes(parse_size(args.size))
    if not os.path.exists(os.path.join(data, "ft", "config.json")):
        print(f"writing base and ft ({spec}) to {data}", file=sys.stderr)
        write_family(data, ["base", "ft"], spec)
    with open(os.path.join(data, "prog.tv"), "w") as f:
        f.write(PROGRAM)
    for name in ("base", "ft"):  # warm the page cache
        for fname in os.listdir(os.path.join(data, name)):
            with open(os.path.join(data, name, fname), "rb") as fh:
                while fh.read(1 << 24):
                    pass
    subprocess.run(["sync"], check=False)
    imports = child("imports", data)["peak"]
    results = {}
    for case in ("tune", "write_load"):
        print(f"running {case} ...", file=sys.stderr)
        results[case] = child(case, data)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tune_lambda.json"), "w") as f:
        json.dump({"size": args.size, "imports_peak": imports, **results}, f, indent=1)
    tune, base = results["tune"], results["write_load"]
    assert tune["scores"] == base["scores"], "the two workflows scored different models"
    mib = 2**20
    lines = [
        f"20 trials of λ, `base + lam*(ft - base)`, {spec.nbytes() / 2**30:.2f} GiB bf16 checkpoints "
        f"(hidden {spec.hidden}, {spec.layers} layers), cheap score; both chose λ = {tune['best']:g} "
        "with identical scores.",
        "",
        "| workflow | wall (s) | CPU (s) | per trial, median (s) | peak RSS over imports (MiB) | load avg |",
        "|---|---|---|---|---|---|",
        f"| `tvlang.tune(..., into=model)` (template loaded once: {tune['load']:.1f} s) | {tune['wall']:.1f} | "
        f"{tune['cpu']:.1f} | {sorted(tune['per_trial'])[TRIALS // 2]:.2f} | {(tune['peak'] - imports) / mib:.0f} | "
        f"{tune['loadavg']:.1f} |",
        f"| `tvlang run -o cand.safetensors` + `load_file` per trial | {base['wall']:.1f} | {base['cpu']:.1f} | "
        f"{sorted(base['per_trial'])[TRIALS // 2]:.2f} | {(base['peak'] - imports) / mib:.0f} "
        f"(`tvlang run` children: {(base['child_peak'] - imports) / mib:.0f}) | {base['loadavg']:.1f} |",
        "",
        f"Ratio, write+load ÷ tune: **{base['wall'] / tune['wall']:.2f}×** wall time, "
        f"**{base['cpu'] / tune['cpu']:.2f}×** CPU time; disk written: 0 vs {TRIALS} × "
        f"{spec.nbytes() / 2**30:.2f} GiB.",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tune_lambda.json"), "w") as f:
        json.dump({"size": args.size, "imports_peak": imports, **results, "table": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
