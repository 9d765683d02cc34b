"""The benchmark suite: tvlang against the bandwidth floor, the naive approach and mergekit, in one run.

    python benchmarks/suite.py                     # everything at the default sizes (see --help)
    python benchmarks/suite.py --quick             # every case and code path at ~100 MB, in minutes

It generates (once, then reuses) deterministic Llama-shaped families (a base and four fine-tunes,
sharded Hugging Face directories with complete configs) under ``benchmarks/out/data/suite/`` with
:func:`tvlang.synth.write_family`, then measures, each in a fresh process after warming the page
cache and ``sync``-ing:

- **floors**: an in-memory streaming add and copy over preallocated buffers (torch, 1 thread and
  all threads), reading the inputs from the page cache (co-aligned ``preadv`` into a reused
  buffer) and writing an output-sized file;
- **merges at one size** (``--size``): task arithmetic (the paper's ``base + 0.4*(t1 - t2 + t3) - t4``),
  TIES, DARE-TIES and SLERP, each a mergekit YAML config that drives both tools
  (``python -m tvlang run CONFIG`` and ``mergekit-yaml CONFIG``), so the two compute the same formula;
  the naive approach (whole state dicts in torch) on task arithmetic;
- **scaling** (``--sizes``): task arithmetic with tvlang and the naive approach at each size;
- **compile and plan overhead** for a 300-tensor model, in process, after a warm-up run;
- **I/O against the device** (``--io``; ``--io-only`` runs just these): start-up (``python -c pass``,
  tvlang on a one-tensor merge with the time to its first input ``open`` by ``strace``, mergekit's
  ``--help``); task arithmetic from a cold page cache against ``dd`` floors for reading the inputs
  and writing the output (``conv=fdatasync``) with the same block size; a sweep whose outputs
  exceed the kernel's dirty-page limit, write-behind on and off, against the floor of reading the
  inputs once and writing the outputs' bytes; TIES against task arithmetic on the same inputs.
  Dropping the page cache needs root: without it the cold case is skipped and says why.

Per case: median wall time (process start to exit, imports included), work time (after the
imports), throughput ((bytes read + bytes written) / time, counting each input and output file
once), and peak RSS (``VmHWM``) over the median of a process that only imports the same modules.
Results go to ``benchmarks/out/suite.json`` (with machine facts, the tvlang commit and the exact
command), to a marked section of ``benchmarks/RESULTS.md`` and to ``benchmarks/scaling.png``
(``--quick`` writes ``-quick`` copies under ``benchmarks/out/`` instead).
The parent process never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h

NAMES = ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic")
TASKS = NAMES[1:]
PAPER = "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic"
CASES = ("task_arithmetic", "ties", "dare_ties", "slerp")
LABEL = {
    "task_arithmetic": "linear: task arithmetic",
    "ties": "TIES, density 0.5",
    "dare_ties": "DARE-TIES, density 0.5",
    "slerp": "SLERP, t = 0.5",
}
FORMULA = {
    "task_arithmetic": PAPER,
    "ties": "base + ties(t1, t2, t3, t4, weights=[1, 1, 1, 1], density=0.5)",
    "dare_ties": 'base + dare_ties(t1, …, t4, weights=[1, 1, 1, 1], density=0.5, seed=0, divide="none")',
    "slerp": "slerp(base, amazon_sent, 0.5)",
}
WHY = {  # why tvlang's output differs from the other tool's (docs/mergekit.md)
    "naive": "both float32; checked: within 1 ulp",
    "task_arithmetic": "mergekit rounds to bf16 after every operation; tvlang once",
    "ties": "mergekit forms the task vectors in bf16 (rounded) before trimming and electing signs, tvlang exactly in fp32, so values near the trim threshold or with a near-zero vote can fall the other way; mergekit also breaks threshold ties arbitrarily (topk), tvlang keeps them all",
    "dare_ties": "different random masks (each seeded; the generators differ)",
    "slerp": "mergekit's rounding",
}
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--lazy-unpickle", "--random-seed", "0", "--quiet"]
DEFAULT_MERGEKIT = os.path.expanduser("~/mergekit-venv/bin/python")
DATA_VERSION = 1  # bump when tvlang.synth.write_family changes its output
OVERHEAD_LAYERS = 33  # 33 layers x 9 + 3 = 300 tensors
SRC = h.ROOT  # the tree whose tvlang the children import (--src)
OUT = h.OUT
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
IO_BEGIN, IO_END = "<!-- suite-io:begin -->", "<!-- suite-io:end -->"
DD_BLOCK = 16 * 2**20  # dd's block size: the reader's readahead step and the writer's chunks are 8-32 MiB


# ------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter and writes a JSON report to the path it is given.
# The mergekit children run in mergekit's interpreter and import nothing of tvlang.
# ------------------------------------------------------------------------------------------


def child_main(kind: str, report: str, args: list[str]) -> None:
    info: dict[str, Any] = {}
    if kind.startswith("mk_"):
        import importlib.metadata

        import torch
        from mergekit.scripts.run_yaml import main as mergekit_yaml

        info.update(torch=torch.__version__, mergekit=importlib.metadata.version("mergekit"))
    else:  # what the `tvlang` command imports, and no more (a file merge never imports torch)
        import importlib.metadata

        import tvlang
        import tvlang.cli

        info.update(torch=importlib.metadata.version("torch"), tvlang=tvlang.__version__)
    cpu0, t0 = h.cpu_s(), time.perf_counter()
    if kind == "tvlang":
        info["rc"] = tvlang.cli.main(args)
    elif kind == "mk_merge":
        mergekit_yaml.main(args, standalone_mode=False)
    elif kind == "naive":
        naive_merge(args[:-1], args[-1])
    elif kind == "generate":
        info["spec"] = generate(json.loads(args[0]))
    elif kind == "floor":
        info["floor"] = floors(json.loads(args[0]))
    elif kind == "overhead":
        info["overhead"] = overhead(json.loads(args[0]))
    elif kind == "compare":
        info["compare"] = compare(args[0], args[1])
    info["work_s"] = time.perf_counter() - t0
    info["work_cpu_s"] = h.cpu_s() - cpu0
    info["cpu_s"] = h.cpu_s()
    info["hwm_kib"] = h.vm_hwm_kib()
    with open(report, "w") as f:
        json.dump(info, f)


def shard_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: the file itself, or a directory's shards."""
    if path.endswith(".safetensors"):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in dict.fromkeys(json.load(f)["weight_map"].values())]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))


def naive_merge(dirs: list[str], out: str) -> None:
    """The paper's way: every state dict whole in memory, float32 math tensor by tensor, ``save_file``."""
    from safetensors.torch import load_file, save_file

    sd = {}
    for name, d in zip(NAMES, dirs, strict=True):
        sd[name] = {k: v for p in shard_files(d) for k, v in load_file(p).items()}
    merged = {}
    for key, b16 in sd["base"].items():
        base = b16.float()
        tv = {n: sd[n][key].float() - base for n in TASKS}
        merged[key] = (base + 0.4 * (tv["amazon_sent"] - tv["amazon_lm"] + tv["yelp_lm"]) - tv["toxic"]).to(
            b16.dtype
        )
    del sd
    save_file(merged, out, metadata={"format": "pt"})


def generate(job: dict[str, Any]) -> dict[str, Any]:
    """Write a family with the checkout's ``tvlang/synth.py``, loaded by path: the data do not
    depend on the tvlang tree under test, nor on its package importing cleanly."""
    spec_ = importlib.util.spec_from_file_location(
        "_tvlang_synth", os.path.join(h.ROOT, "tvlang", "synth.py")
    )
    assert spec_ is not None and spec_.loader is not None
    synth = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = synth
    spec_.loader.exec_module(synth)
    if job.get("layers"):
        spec = synth.llama_spec(job["hidden"], job["layers"])
    else:
        spec = synth.spec_for_bytes(job["bytes"], job["dtype"])
    synth.write_family(
        job["dir"], job["names"], spec, dtype=job["dtype"], seed=job["seed"], shards=job["shards"]
    )
    return {**vars(spec), "tensors": len(spec.shapes()), "bytes": spec.nbytes(job["dtype"])}


def floors(job: dict[str, Any]) -> dict[str, Any]:
    """Stream add/copy in memory (torch, float32, preallocated); read the inputs with co-aligned
    ``preadv``; write an output-sized file.  Best of ``repeat`` for each."""
    import mmap

    import torch

    res: dict[str, Any] = {}
    n = job["buffer_bytes"] // 4
    a, b, c = (torch.full((n,), 1.0) for _ in range(3))  # touched: no page faults in the timed loop
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for op, moved in (("add", 3), ("copy", 2)):
            best = math.inf
            for _ in range(job["repeat"]):
                t = time.perf_counter()
                for _ in range(4):
                    if op == "add":
                        torch.add(a, b, out=c)
                    else:
                        c.copy_(a)
                best = min(best, (time.perf_counter() - t) / 4)
            res[f"mem_{op}_{threads}t_gbps"] = moved * 4 * n / best / 1e9
    res["threads_all"] = os.cpu_count()
    res["buffer_mib"] = job["buffer_bytes"] / h.MiB
    del a, b, c
    buf = mmap.mmap(-1, 16 * h.MiB)  # page-aligned, read at file offsets 0, 16 MiB, …: co-aligned
    view = memoryview(buf)
    total, best = 0, math.inf
    for _ in range(job["repeat"]):
        total, t = 0, time.perf_counter()
        for p in job["files"]:
            fd = os.open(p, os.O_RDONLY)
            try:
                off = 0
                while got := os.preadv(fd, [view], off):
                    off += got
                total += off
            finally:
                os.close(fd)
        best = min(best, time.perf_counter() - t)
    res["read_s"], res["read_bytes"], res["read_gbps"] = best, total, total / best / 1e9
    out = os.path.join(job["scratch"], ".floor-write")
    best = math.inf
    for _ in range(max(1, job["repeat"] - 1)):
        if os.path.exists(out):
            os.remove(out)
        os.sync()
        t = time.perf_counter()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            off = 0
            while off < job["write_bytes"]:
                off += os.pwrite(fd, view[: min(len(view), job["write_bytes"] - off)], off)
        finally:
            os.close(fd)
        best = min(best, time.perf_counter() - t)
    os.remove(out)
    res["write_s"], res["write_gbps"] = best, job["write_bytes"] / best / 1e9
    view.release()
    buf.close()
    return res


def overhead(job: dict[str, Any]) -> dict[str, Any]:
    """Parse, lower + passes, plan from headers, and kernel preparation, timed in this process:
    once as it starts (kernel disk cache warm from an earlier process), then again after a full
    run in this process, ``repeat`` times."""
    import tvlang

    prepare_kernels: Any = None
    with contextlib.suppress(ImportError):
        from tvlang.backends.compiled import prepare_kernels

    def once(text: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        prog = tvlang.compile(text)
        t1 = time.perf_counter()
        prog.graph()
        t2 = time.perf_counter()
        plan = prog.plan()
        t3 = time.perf_counter()
        kernels = prepare_kernels(plan) if prepare_kernels is not None else None
        t4 = time.perf_counter()
        lower = t2 - t1
        return {
            "parse_ms": 1e3 * (t1 - t0),
            "lower_ms": 1e3 * lower,
            "plan_ms": 1e3 * max(0.0, t3 - t2 - lower),  # plan() lowers again: count that once
            "kernels_ms": 1e3 * (t4 - t3) if kernels is not None else None,
            "total_ms": 1e3 * ((t1 - t0) + (t3 - t2) + (t4 - t3)),
            "kernel_mode": getattr(plan, "kernels", None),
        }

    res: dict[str, Any] = {"prepare_kernels": prepare_kernels is not None, "programs": {}}
    for name, text in job["programs"].items():
        first = once(text)
        tvlang.compile(text).run(job["out"])
        os.remove(job["out"])
        again = [once(text) for _ in range(job["repeat"])]
        med = {
            k: statistics.median(r[k] for r in again) if again[0][k] is not None else None
            for k in ("parse_ms", "lower_ms", "plan_ms", "kernels_ms", "total_ms")
        }
        res["programs"][name] = {"first_in_process": first, "median_after_run": med, "runs": again}
    return res


def compare(a: str, b: str) -> dict[str, Any]:
    """Every tensor of checkpoint ``a`` against ``b`` (same names, shapes, dtypes): how many values
    are bit-identical, within 1 ulp of ``b`` (of the output dtype), and the largest distance in ulps."""
    import torch
    from safetensors import safe_open

    from tvlang.numerics import ulp

    def index(path: str) -> dict[str, str]:
        out = {}
        for p in shard_files(path):
            with safe_open(p, "pt") as f:
                out.update(dict.fromkeys(f.keys(), p))
        return out

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return {"ok": False, "error": f"different tensor names: {sorted(set(ia) ^ set(ib))[:5]}"}
    total = identical = within1 = 0
    worst, worst_at, worst_abs = 0.0, "", 0.0
    for k in sorted(ia):
        with safe_open(ia[k], "pt") as fa, safe_open(ib[k], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"ok": False, "error": f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"}
        total += x.numel()
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        mask = x.view(bits) != y.view(bits)
        n_diff = int(mask.sum())
        identical += x.numel() - n_diff
        if not n_diff:
            within1 += x.numel()
            continue
        xd, yd = x[mask].double(), y[mask].double()
        dist = (xd - yd).abs() / ulp(yd, y.dtype)
        within1 += x.numel() - n_diff + int((dist <= 1).sum())
        m = float(dist.max())
        if m > worst:
            worst, worst_at = m, k
        worst_abs = max(worst_abs, float((xd - yd).abs().max()))
    return {
        "ok": True,
        "elements": total,
        "identical": identical / total,
        "within_1_ulp": within1 / total,
        "max_ulp": worst,
        "max_ulp_tensor": worst_at,
        "max_abs_diff": worst_abs,
    }


# ------------------------------------------------------------------------------------------
# Parent: no torch here
# ------------------------------------------------------------------------------------------


def run_child(kind: str, args: list[str], python: str = sys.executable) -> dict[str, Any]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if kind.startswith("mk_") else None
    return h.run_child(__file__, SRC, kind, args, python=python, env=env)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def family(label: str, nbytes: int, args: argparse.Namespace, **spec: int) -> dict[str, Any]:
    """The directory, files and spec of one generated family, generating it unless cached."""
    directory = os.path.join(OUT, "data", "suite", f"{args.dtype}-{label}")
    want = {
        "version": DATA_VERSION,
        "bytes": nbytes,
        "dtype": args.dtype,
        "names": list(NAMES),
        "shards": args.shards,
        "seed": 0,
        **spec,
    }
    stamp = os.path.join(directory, "family.json")
    dirs = [os.path.join(directory, n) for n in NAMES]
    if os.path.exists(stamp):
        with open(stamp) as f:
            have = json.load(f)
        if have.get("want") == want and all(os.path.isdir(d) for d in dirs):
            return {"label": label, "dirs": dirs, "spec": have["spec"], **_files(dirs)}
    if os.path.exists(stamp):
        os.remove(stamp)
    need = len(NAMES) * nbytes * 1.05
    free = shutil.disk_usage(
        os.path.dirname(directory) if os.path.exists(os.path.dirname(directory)) else OUT
    ).free
    if need > free:
        raise SystemExit(f"[{label}] generating needs ~{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free")
    log(f"[{label}] generating {len(NAMES)} {args.dtype} checkpoints in {directory} …")
    t = time.perf_counter()
    job = {**want, "dir": directory}
    info = run_child("generate", [json.dumps(job)])
    with open(stamp, "w") as f:
        json.dump({"want": want, "spec": info["spec"]}, f, indent=1)
    log(f"[{label}] generated in {time.perf_counter() - t:.0f} s: {info['spec']}")
    return {"label": label, "dirs": dirs, "spec": info["spec"], **_files(dirs)}


def _files(dirs: list[str]) -> dict[str, Any]:
    files = {d: shard_files(d) for d in dirs}
    return {"files": files, "bytes": {d: sum(os.path.getsize(p) for p in fs) for d, fs in files.items()}}


def mergekit_config(case: str, dirs: list[str], dtype: str) -> str:
    """The mergekit YAML of a case; tvlang runs the same file."""
    hf = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    base, models = dirs[0], dirs[1:]
    if case == "slerp":
        lines = [
            f"base_model: {base}",
            "models:",
            f"  - model: {base}",
            f"  - model: {models[0]}",
            "parameters:",
            "  t: 0.5",
        ]
    elif case == "task_arithmetic":
        weights = (0.4, -0.4, 0.4, -1.0)  # base + 0.4*(t1 - t2 + t3) - t4
        lines = [f"base_model: {base}", "models:"]
        for m, w in zip(models, weights, strict=True):
            lines += [f"  - model: {m}", f"    parameters: {{weight: {w}}}"]
    else:
        lines = [f"base_model: {base}", "models:"]
        for m in models:
            lines += [f"  - model: {m}", "    parameters: {weight: 1.0, density: 0.5}"]
    return "\n".join(
        [f"# {LABEL[case]}: {FORMULA[case]}", f"merge_method: {case}", *lines, f"dtype: {hf}", ""]
    )


def case_inputs(case: str, fam: dict[str, Any]) -> list[str]:
    dirs = fam["dirs"][:2] if case == "slerp" else fam["dirs"]
    return [p for d in dirs for p in fam["files"][d]]


def tool_cmd(
    tool: str, case: str, config: str, fam: dict[str, Any], out: str, args: argparse.Namespace
) -> list[str]:
    if tool == "tvlang":
        return ["run", config, "-o", out, "--force", "-q", *shlex.split(args.tvlang_flags)]
    if tool == "mergekit":
        return [config, out, *MERGEKIT_FLAGS, *shlex.split(args.mergekit_flags)]
    return [*fam["dirs"], out]  # naive


def find_mergekit(args: argparse.Namespace) -> dict[str, Any]:
    if args.no_mergekit:
        return {"skipped": "--no-mergekit"}
    python = args.mergekit_python or os.environ.get("TVLANG_MERGEKIT_PYTHON") or DEFAULT_MERGEKIT
    if not os.path.exists(python):
        return {
            "skipped": f"no interpreter at {python} (set --mergekit-python or TVLANG_MERGEKIT_PYTHON; "
            "benchmarks/README.md says how to make one)"
        }
    probe = (
        "import importlib.metadata as m, mergekit.scripts.run_yaml; "
        "print(m.version('mergekit'), m.version('torch'), m.version('transformers'))"
    )
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return {"skipped": f"{python} cannot import mergekit: {(r.stderr.strip().splitlines() or ['?'])[-1]}"}
    version, torch_v, tf = r.stdout.split()
    return {
        "python": python,
        "version": version,
        "torch": torch_v,
        "transformers": tf,
        "flags": MERGEKIT_FLAGS + shlex.split(args.mergekit_flags),
    }


def naive_fits(nbytes: int, args: argparse.Namespace) -> bool:
    """The naive approach holds every input and the output (about 2x the output in float32
    temporaries and copies): skip it where that would not fit in memory."""
    if args.naive_max_size is not None:
        return nbytes <= h.parse_size(args.naive_max_size)
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return 7 * nbytes <= 0.9 * total


def summarize(rs: list[dict[str, Any]], base_kib: float, moved: int) -> dict[str, Any]:
    wall = statistics.median(float(r["wall_s"]) for r in rs)
    work = statistics.median(float(r["work_s"]) for r in rs)
    hwm = max(int(r["hwm_kib"]) for r in rs)
    return {
        "runs": len(rs),
        "median_wall_s": wall,
        "best_wall_s": min(float(r["wall_s"]) for r in rs),
        "median_work_s": work,
        "median_work_cpu_s": statistics.median(float(r["work_cpu_s"]) for r in rs),
        "gbps_wall": moved / wall / 1e9,
        "gbps_work": moved / work / 1e9,
        "peak_rss_mib": hwm / 1024,
        "peak_rss_over_baseline_mib": (hwm - base_kib) / 1024,
        "sampled_peak_mib": {
            k: max(int(r["sampled_peak_kib"].get(k, 0)) for r in rs) / 1024 for k in ("RssAnon", "RssFile")
        },
        "median_others_load": statistics.median(float(r["others_load"]) for r in rs),
        "each": rs,
    }


def bench_size(
    label: str,
    nbytes: int,
    cases: tuple[str, ...],
    mk: dict[str, Any],
    baselines: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    fam = family(label, nbytes, args)
    work = os.path.join(OUT, "suite-work", label)
    os.makedirs(work, exist_ok=True)
    configs = {}
    for case in cases:
        configs[case] = os.path.join(work, f"{case}.yml")
        with open(configs[case], "w") as f:
            f.write(mergekit_config(case, fam["dirs"], args.dtype))
    tools: dict[str, list[str]] = {case: ["tvlang"] for case in cases}
    notes = []
    if "python" in mk:
        for case in cases:
            if label == args.size or args.mergekit_scaling:
                tools[case].append("mergekit")
    if "task_arithmetic" in cases:
        if naive_fits(nbytes, args):
            tools["task_arithmetic"].append("naive")
        else:
            notes.append(
                f"naive skipped at {label}: it would need about 7 × {nbytes / 2**30:.1f} GiB of memory "
                "(--naive-max-size overrides)"
            )
            log(notes[-1])
    repeats = {"tvlang": args.repeat, "naive": args.naive_repeat, "mergekit": args.mergekit_repeat}
    outs = {
        (c, t): os.path.join(work, f"{c}-{t}" + (".safetensors" if t == "naive" else ""))
        for c in cases
        for t in tools[c]
    }

    all_inputs = [p for d in fam["dirs"] for p in fam["files"][d]]
    h.warm(all_inputs)
    os.sync()
    floor = run_child(
        "floor",
        [
            json.dumps(
                {
                    "buffer_bytes": args.floor_buffer,
                    "repeat": 3,
                    "files": all_inputs,
                    "scratch": work,
                    "write_bytes": fam["bytes"][fam["dirs"][0]],
                }
            )
        ],
    )["floor"]
    log(f"[{label}] floors: " + ", ".join(f"{k} {v:.2f}" for k, v in floor.items() if k.endswith("gbps")))

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in outs}
    for r in range(max(repeats.values())):
        for case in cases:
            for tool in tools[case]:
                if r >= repeats[tool]:
                    continue
                out = outs[case, tool]
                _remove(out)
                h.warm(case_inputs(case, fam))
                os.sync()  # no write-back of an earlier output during this run
                kind = {"tvlang": "tvlang", "naive": "naive", "mergekit": "mk_merge"}[tool]
                one = run_child(
                    kind,
                    tool_cmd(tool, case, configs[case], fam, out, args),
                    python=mk["python"] if tool == "mergekit" else sys.executable,
                )
                runs[case, tool].append(one)
                log(
                    f"[{label}] {case} {tool} run {r + 1}/{repeats[tool]}: {one['wall_s']:.2f} s, "
                    f"VmHWM {int(one['hwm_kib']) / 1024:.0f} MiB"
                )

    results: dict[str, Any] = {}
    for case in cases:
        ins = case_inputs(case, fam)
        bytes_in = sum(os.path.getsize(p) for p in ins)
        bytes_out = sum(os.path.getsize(p) for p in shard_files(outs[case, "tvlang"]))
        moved = bytes_in + bytes_out
        res: dict[str, Any] = {"bytes_read": bytes_in, "bytes_written": bytes_out, "tools": {}, "checks": {}}
        for tool in tools[case]:
            base_kib = baselines["mergekit" if tool == "mergekit" else "tvlang"]
            res["tools"][tool] = summarize(runs[case, tool], base_kib, moved)
        floor_gbps = max(floor[k] for k in floor if k.startswith("mem_add_"))
        res["floor"] = {
            "stream_add_gbps": floor_gbps,
            "stream_add_s": moved / floor_gbps / 1e9,
            "read_s": floor["read_s"] * bytes_in / floor["read_bytes"],
            "write_s": floor["write_s"] * bytes_out / fam["bytes"][fam["dirs"][0]],
        }
        for tool in tools[case]:
            if tool == "tvlang":
                continue
            c = run_child("compare", [outs[case, "tvlang"], outs[case, tool]])["compare"]
            res["checks"][tool] = c
            log(f"[{label}] {case}: tvlang vs {tool}: {c}")
            if tool == "naive" and not (c["ok"] and c["within_1_ulp"] >= 1 - 1e-6):
                raise SystemExit(f"[{label}] tvlang and the naive approach disagree by more than 1 ulp: {c}")
        results[case] = res
    for out in outs.values():
        _remove(out)
    return {
        "size": label,
        "spec": fam["spec"],
        "bytes_per_checkpoint": fam["bytes"][fam["dirs"][0]],
        "floor": floor,
        "cases": results,
        "notes": notes,
    }


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    fam = family(f"overhead{OVERHEAD_LAYERS}", 0, args, hidden=256, layers=OVERHEAD_LAYERS)
    loads = "\n".join(f'{n} = load("{d}")' for n, d in zip(NAMES, fam["dirs"], strict=True))
    tvs = "\n".join(f"t{i + 1} = {n} - base" for i, n in enumerate(TASKS))
    programs = {
        "task arithmetic": f"{loads}\n{tvs}\noutput merged = base + 0.4*(t1 - t2 + t3) - t4\n",
        "TIES": f"{loads}\n{tvs}\noutput merged = base + ties(t1, t2, t3, t4, weights=[1, 1, 1, 1], density=0.5)\n",
    }
    work = os.path.join(OUT, "suite-work", "overhead")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "merged.safetensors")
    for name, text in programs.items():  # a first run in its own process fills the kernel disk cache
        prog = os.path.join(work, "warmup.tv")
        with open(prog, "w") as f:
            f.write(text)
        run_child("tvlang", ["run", prog, "-o", out, "--force", "-q", *shlex.split(args.tvlang_flags)])
        log(f"[overhead] warm-up run of {name} done")
    _remove(out)
    res = run_child(
        "overhead", [json.dumps({"programs": programs, "out": out, "repeat": args.overhead_repeat})]
    )
    log(
        f"[overhead] {json.dumps({k: v['median_after_run'] for k, v in res['overhead']['programs'].items()})}"
    )
    return {"tensors": fam["spec"]["tensors"], "spec": fam["spec"], **res["overhead"]}


# ------------------------------------------------------------------------------------------
# I/O against the device (issue 16): start-up, cold cache, a sweep past the dirty-page limit
# ------------------------------------------------------------------------------------------


def can_drop_caches() -> str | None:
    """None when this process may drop the page cache, else why not."""
    if not sys.platform.startswith("linux"):
        return "not Linux: no /proc/sys/vm/drop_caches"
    if os.geteuid() != 0:
        return "dropping the page cache needs root (echo 3 > /proc/sys/vm/drop_caches)"
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "/proc/sys/vm/drop_caches is not writable here (a container without the privilege?)"
    return None


def drop_caches() -> None:
    """Write back every dirty page, then drop the clean ones: the next read comes from the device."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def dirty_limit() -> dict[str, int]:
    """The kernel's dirty-page limit in bytes (``vm.dirty_bytes``, else ``vm.dirty_ratio`` of MemTotal:
    an upper bound, the kernel counts only dirtyable memory) and the background threshold."""

    def read(name: str) -> int:
        try:
            with open(f"/proc/sys/vm/{name}") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    limit = read("dirty_bytes") or total * (read("dirty_ratio") or 20) // 100
    background = read("dirty_background_bytes") or total * (read("dirty_background_ratio") or 10) // 100
    return {"limit": limit, "background": background, "mem_total": total}


def dd_read_s(files: list[str], block: int = DD_BLOCK) -> float:
    """Seconds for ``dd`` to read every file to /dev/null, one after another."""
    t = time.perf_counter()
    for p in files:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", f"bs={block}", "status=none"], check=True)
    return time.perf_counter() - t


def dd_read_parallel_s(files: list[str], block: int = DD_BLOCK) -> float:
    """Seconds for one ``dd`` per file, all at once, to read every file: the device's throughput
    with as many streams as a merge reads (a single stream keeps one request in flight)."""
    t = time.perf_counter()
    procs = [subprocess.Popen(["dd", f"if={p}", "of=/dev/null", f"bs={block}", "status=none"]) for p in files]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit("dd failed")
    return time.perf_counter() - t


def dd_write_s(
    path: str, nbytes: int, block: int = DD_BLOCK, files: int = 1, flag: str = "conv=fdatasync"
) -> float:
    """Seconds for ``dd`` to write ``files`` files of ``nbytes`` each (deleted after), either through
    the page cache and synced (``conv=fdatasync``) or around it (``oflag=direct``: no
    dirty-page throttling, one request in flight)."""
    count = max(1, -(-nbytes // block))
    t = time.perf_counter()
    try:
        for i in range(files):
            subprocess.run(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={path}.{i}",
                    f"bs={block}",
                    f"count={count}",
                    flag,
                    "status=none",
                ],
                check=True,
            )
        return time.perf_counter() - t
    finally:
        for i in range(files):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{path}.{i}")


def sync_s() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def tiny_checkpoint(path: str) -> None:
    """A one-tensor bf16 safetensors file written by hand (the parent imports no torch)."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + bytes(32))


def _median_wall(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    walls = []
    for _ in range(repeat):
        t = time.perf_counter()
        # (not the checkout: `python -m` puts the working directory first on the path, ahead of --src)
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})}, cwd=OUT)
        walls.append(time.perf_counter() - t)
    return statistics.median(walls)


def first_open_ms(cmd: list[str], needle: str) -> float | None:
    """Milliseconds from the process's ``execve`` to its first ``open`` of a path containing
    ``needle`` (the first input's header read), by ``strace``; None without strace."""
    if shutil.which("strace") is None:
        return None
    log_path = os.path.join(OUT, ".strace.log")
    r = subprocess.run(
        ["strace", "-f", "--seccomp-bpf", "-ttt", "-e", "trace=execve,openat", "-o", log_path, *cmd],
        capture_output=True,
        cwd=OUT,  # (see _median_wall)
        env={**os.environ, "PYTHONPATH": SRC},
    )
    if r.returncode != 0:
        return None
    start = first = None
    with open(log_path) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) < 3:
                continue
            stamp = float(parts[1])
            if start is None and parts[2].startswith("execve("):
                start = stamp
            elif start is not None and parts[2].startswith("openat(") and needle in parts[2]:
                first = stamp
                break
    os.remove(log_path)
    return None if start is None or first is None else 1e3 * (first - start)


def bench_startup(mk: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Process start to exit: the interpreter alone, tvlang on a one-tensor merge, mergekit's --help."""
    work = os.path.join(OUT, "suite-work", "startup")
    os.makedirs(work, exist_ok=True)
    tiny = os.path.join(work, "tiny-input.safetensors")
    tiny_checkpoint(tiny)
    out = os.path.join(work, "tiny-out.safetensors")
    tv = [
        sys.executable,
        "-m",
        "tvlang",
        "eval",
        "0.5*a + 0.5*a",
        "--bind",
        f"a={tiny}",
        "-o",
        out,
        "--force",
        "-q",
    ]
    env = {"PYTHONPATH": SRC}
    res: dict[str, Any] = {"repeat": args.repeat_startup}
    res["python_pass_s"] = _median_wall([sys.executable, "-c", "pass"], args.repeat_startup)
    res["tvlang_tiny_s"] = _median_wall(tv, args.repeat_startup, env)
    res["tvlang_import_s"] = _median_wall(
        [sys.executable, "-c", "import tvlang.cli"], args.repeat_startup, env
    )
    opens = [first_open_ms(tv, "tiny-input") for _ in range(args.repeat_startup)]
    res["tvlang_first_open_ms"] = statistics.median(o for o in opens if o is not None) if any(opens) else None
    if "python" in mk:
        yaml = os.path.join(os.path.dirname(mk["python"]), "mergekit-yaml")
        res["mergekit_help_s"] = _median_wall([yaml, "--help"], args.repeat_startup)
    _remove(out)
    log(f"[startup] {res}")
    return res


def bench_cold(fam: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Task arithmetic with the page cache dropped before each run, against ``dd`` floors measured
    the same way in the same run.  tvlang's time is its work after the imports (the interpreter's
    own files are re-cached first by an import-only process) plus the ``sync`` that puts its output
    on the device, as ``conv=fdatasync`` does for the floor."""
    why = can_drop_caches()
    if why is not None:
        log(f"[cold] skipped: {why}")
        return {"skipped": why}
    work = os.path.join(OUT, "suite-work", "cold")
    os.makedirs(work, exist_ok=True)
    config = os.path.join(work, "task_arithmetic.yml")
    with open(config, "w") as f:
        f.write(mergekit_config("task_arithmetic", fam["dirs"], args.dtype))
    out = os.path.join(work, "merged")
    inputs = case_inputs("task_arithmetic", fam)
    out_bytes = fam["bytes"][fam["dirs"][0]]
    floors_read, floors_parallel, floors_write, runs = [], [], [], []
    for r in range(args.repeat):
        drop_caches()
        floors_read.append(dd_read_s(inputs))
        drop_caches()
        floors_parallel.append(dd_read_parallel_s(inputs))
        drop_caches()
        floors_write.append(
            min(
                dd_write_s(os.path.join(work, ".dd"), out_bytes, flag=f)
                for f in ("conv=fdatasync", "oflag=direct")
            )
        )
        _remove(out)
        drop_caches()
        run_child("baseline", [])  # the interpreter and torch back in the cache, not the inputs
        one = run_child("tvlang", tool_cmd("tvlang", "task_arithmetic", config, fam, out, args))
        one["sync_s"] = sync_s()
        runs.append(one)
        log(
            f"[cold] run {r + 1}: floor read {floors_read[-1]:.2f} s (parallel {floors_parallel[-1]:.2f} s) "
            f"+ write {floors_write[-1]:.2f} s; "
            f"tvlang work {one['work_s']:.2f} s + sync {one['sync_s']:.2f} s (wall {one['wall_s']:.2f} s)"
        )
    _remove(out)
    read = min(statistics.median(floors_read), statistics.median(floors_parallel))
    floor = read + statistics.median(floors_write)
    tv = statistics.median(float(x["work_s"]) + x["sync_s"] for x in runs)
    return {
        "size": fam["label"],
        "bytes_read": sum(os.path.getsize(p) for p in inputs),
        "bytes_written": out_bytes,
        "block": DD_BLOCK,
        "floor_read_s": statistics.median(floors_read),
        "floor_read_parallel_s": statistics.median(floors_parallel),
        "floor_write_s": statistics.median(floors_write),
        "floor_s": floor,
        "tvlang_work_sync_s": tv,
        "tvlang_wall_s": statistics.median(float(x["wall_s"]) for x in runs),
        "tvlang_share_of_floor": floor / tv,
        "peak_rss_mib": max(int(x["hwm_kib"]) for x in runs) / 1024,
        "runs": runs,
    }


SWEEP_PROGRAM = """\
base = load("{0}")
amazon_sent = load("{1}") - base
amazon_lm = load("{2}") - base
yelp_lm = load("{3}") - base
toxic = load("{4}") - base
param lam = 0.4
output merged = base + lam*(amazon_sent - amazon_lm + yelp_lm) - toxic
"""


def bench_sweep(fam: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A λ sweep of K outputs from one pass over warm inputs, K sized so that the outputs exceed the
    dirty-page limit (unless --sweep-k), write-behind forced off and on (``TVLANG_WRITE_BEHIND``),
    against the floor of reading the inputs once (from the page cache) and writing K outputs' bytes
    with ``dd conv=fdatasync``.  tvlang's time is its wall time plus the ``sync`` after it."""
    work = os.path.join(OUT, "suite-work", "sweep")
    os.makedirs(work, exist_ok=True)
    program = os.path.join(work, "sweep.tv")
    with open(program, "w") as f:
        f.write(SWEEP_PROGRAM.format(*fam["dirs"]))
    out_bytes = fam["bytes"][fam["dirs"][0]]
    dirty = dirty_limit()
    k = args.sweep_k or max(2, math.ceil(1.25 * dirty["limit"] / out_bytes))
    need = k * out_bytes * 1.05
    free = shutil.disk_usage(work).free
    if need > free:
        return {"skipped": f"{k} outputs need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}
    values = ",".join(f"{0.1 * (i + 1):.2f}" for i in range(k))
    out = os.path.join(work, "outs")
    inputs = [p for d in fam["dirs"] for p in fam["files"][d]]
    floors, runs = [], {"off": [], "on": []}
    for r in range(args.repeat):
        h.warm(inputs)
        os.sync()
        write = min(
            dd_write_s(os.path.join(work, ".dd"), k * out_bytes, flag=f)
            for f in ("conv=fdatasync", "oflag=direct")
        )
        floors.append(dd_read_s(inputs) + write)
        for mode, env in (("off", "0"), ("on", "1")):
            _remove(out)
            os.makedirs(out)
            h.warm(inputs)
            os.sync()
            one = h.run_child(
                __file__, SRC, "tvlang", ["run", program, "-o", out, "-q", "--set", f"lam={values}"],
                env={"TVLANG_WRITE_BEHIND": env},
            )  # fmt: skip
            one["sync_s"] = sync_s()
            runs[mode].append(one)
            log(
                f"[sweep] run {r + 1}, write-behind {mode}: {one['wall_s']:.2f} s + sync {one['sync_s']:.2f} s "
                f"(floor {floors[-1]:.2f} s)"
            )
    _remove(out)
    floor = statistics.median(floors)
    res: dict[str, Any] = {
        "size": fam["label"],
        "outputs": k,
        "bytes_written": k * out_bytes,
        "dirty": dirty,
        "floor_s": floor,
    }
    for mode, rs in runs.items():
        t = statistics.median(float(x["wall_s"]) + x["sync_s"] for x in rs)
        res[mode] = {
            "wall_sync_s": t,
            "wall_s": statistics.median(float(x["wall_s"]) for x in rs),
            "over_floor": t / floor,
            "peak_rss_mib": max(int(x["hwm_kib"]) for x in rs) / 1024,
            "runs": rs,
        }
    res["off_over_on"] = res["off"]["wall_sync_s"] / res["on"]["wall_sync_s"]
    return res


def bench_ties_vs_linear(fam: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """TIES (density 0.5, 4 task vectors) against task arithmetic on the same warm inputs, alternating."""
    work = os.path.join(OUT, "suite-work", "ties-linear")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "merged")
    walls: dict[str, list[dict[str, Any]]] = {"task_arithmetic": [], "ties": []}
    for _ in range(args.repeat):
        for case in walls:
            config = os.path.join(work, f"{case}.yml")
            with open(config, "w") as f:
                f.write(mergekit_config(case, fam["dirs"], args.dtype))
            _remove(out)
            h.warm(case_inputs(case, fam))
            os.sync()
            walls[case].append(run_child("tvlang", tool_cmd("tvlang", case, config, fam, out, args)))
    _remove(out)
    med = {c: statistics.median(float(x["wall_s"]) for x in rs) for c, rs in walls.items()}
    work_s = {c: statistics.median(float(x["work_s"]) for x in rs) for c, rs in walls.items()}
    log(f"[ties/linear] wall {med}, work {work_s}")
    return {
        "size": fam["label"],
        "wall_s": med,
        "work_s": work_s,
        "ratio_wall": med["ties"] / med["task_arithmetic"],
        "ratio_work": work_s["ties"] / work_s["task_arithmetic"],
    }


def bench_io(mk: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    fam = family(args.io_size, h.parse_size(args.io_size), args)
    return {
        "startup": bench_startup(mk, args),
        "cold": bench_cold(fam, args),
        "sweep": bench_sweep(fam, args),
        "ties_vs_linear": bench_ties_vs_linear(fam, args),
    }


def io_markdown(doc: dict[str, Any]) -> str:
    io, m = doc["io"], doc["machine"]
    st, cold, sw, tl = io["startup"], io["cold"], io["sweep"], io["ties_vs_linear"]
    lines = [
        f"Generated by `{doc['command']}` on {doc['finished'][:16].replace('T', ' ')}, "
        f"tvlang commit `{doc['tvlang_commit'][:12]}`; {m['nproc']} CPUs, {m['mem_total_gib']} GiB RAM. "
        f"Inputs: the suite's {doc['settings']['dtype']} family at {doc['settings']['io_size']} per checkpoint.",
        "",
        f"### Start-up (median of {st['repeat']}, process start to exit)",
        "",
        "| what | s |",
        "|---|---:|",
        f"| `python -c pass` | {st['python_pass_s']:.3f} |",
        f"| `python -c 'import tvlang.cli'` | {st['tvlang_import_s']:.3f} |",
        f"| `tvlang eval` of a one-tensor merge | {st['tvlang_tiny_s']:.3f} |",
        f"| tvlang: exec to the first `open` of the input (under `strace --seccomp-bpf`, which slows it) | "
        f"{_f(None if st['tvlang_first_open_ms'] is None else st['tvlang_first_open_ms'] / 1e3, 3)} |",
    ]
    if "mergekit_help_s" in st:
        lines.append(f"| `mergekit-yaml --help` | {st['mergekit_help_s']:.3f} |")
    lines += ["", "### Cold page cache: task arithmetic against `dd` (page cache dropped before each)", ""]
    if "skipped" in cold:
        lines.append(f"Skipped: {cold['skipped']}.")
    else:
        lines += [
            f"{cold['bytes_read'] / 1e9:.2f} GB read, {cold['bytes_written'] / 1e9:.2f} GB written; dd with "
            f"bs={cold['block'] // 2**20}M; the read floor is the faster of one dd after another and one dd per "
            "file at once, the write floor the faster of conv=fdatasync and oflag=direct; tvlang: work after "
            "the imports + `sync`.",
            "",
            "| floor read s (one by one / at once) | floor write s | floor s | tvlang s | tvlang wall s | "
            "floor ÷ tvlang | peak RSS MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {cold['floor_read_s']:.2f} / {cold.get('floor_read_parallel_s', math.nan):.2f} | "
            f"{cold['floor_write_s']:.2f} | {cold['floor_s']:.2f} | "
            f"{cold['tvlang_work_sync_s']:.2f} | {cold['tvlang_wall_s']:.2f} | {cold['tvlang_share_of_floor']:.0%} | "
            f"{cold['peak_rss_mib']:.0f} |",
        ]
    lines += ["", "### A sweep past the dirty-page limit", ""]
    if "skipped" in sw:
        lines.append(f"Skipped: {sw['skipped']}.")
    else:
        d = sw["dirty"]
        lines += [
            f"{sw['outputs']} outputs, {sw['bytes_written'] / 1e9:.1f} GB written (dirty limit "
            f"{d['limit'] / 1e9:.1f} GB, background {d['background'] / 1e9:.1f} GB); inputs warm. Floor: dd "
            "reads the inputs once and writes the outputs' bytes as one file (the faster of conv=fdatasync "
            "and oflag=direct). "
            "tvlang: wall + `sync`.",
            "",
            "| write-behind | tvlang s (wall + sync) | ÷ floor | after the imports + sync, s | ÷ floor | "
            "wall s | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for mode in ("off", "on"):
            r = sw[mode]
            work = statistics.median(float(x["work_s"]) + x["sync_s"] for x in r["runs"])
            lines.append(
                f"| {mode} | {r['wall_sync_s']:.2f} | {r['over_floor']:.2f} | {work:.2f} | {work / sw['floor_s']:.2f} | "
                f"{r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} |"
            )
        lines += ["", f"Floor: {sw['floor_s']:.2f} s. Off ÷ on: {sw['off_over_on']:.2f}."]
    lines += [
        "",
        "### TIES against task arithmetic (same inputs, warm, alternating)",
        "",
        "| | task arithmetic | TIES, density 0.5 | TIES ÷ linear |",
        "|---|---:|---:|---:|",
        f"| wall s | {tl['wall_s']['task_arithmetic']:.2f} | {tl['wall_s']['ties']:.2f} | {tl['ratio_wall']:.2f} |",
        f"| work s | {tl['work_s']['task_arithmetic']:.2f} | {tl['work_s']['ties']:.2f} | {tl['ratio_work']:.2f} |",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Report: Markdown section, plot
# ------------------------------------------------------------------------------------------


def _f(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(doc: dict[str, Any]) -> str:
    m, mk = doc["machine"], doc["mergekit"]
    lines = [
        f"Generated by `{doc['command']}` on {doc['finished'][:16].replace('T', ' ')}, "
        f"tvlang commit `{doc['tvlang_commit'][:12]}`.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB RAM, Python {m['python']}, "
        f"torch {m['torch']}, Linux {m['kernel']}. "
        + (
            f"mergekit {mk['version']} (torch {mk['torch']}, transformers {mk['transformers']}), run as "
            f"`mergekit-yaml CONFIG OUT {' '.join(mk['flags'])}`."
            if "version" in mk
            else f"mergekit: not run ({mk['skipped']})."
        ),
        "",
        f"Inputs: a base and 4 fine-tunes, Llama-shaped {doc['settings']['dtype']} Hugging Face directories "
        f"of {doc['settings']['shards']} shards from `tvlang.synth.write_family`; every run is a fresh process "
        "with a warm page cache. *Wall*: process start to exit, imports included. *Work*: after the imports. "
        "GB/s: (bytes read + written, each file once) / time. *RSS*: peak `VmHWM` over a process that only "
        f"imports the same modules (tvlang: {doc['baseline_rss_mib']['tvlang']:.0f} MiB"
        + (
            f", mergekit: {doc['baseline_rss_mib']['mergekit']:.0f} MiB"
            if "mergekit" in doc["baseline_rss_mib"]
            else ""
        )
        + "). Importing alone takes "
        + ", ".join(f"{v:.1f} s ({k})" for k, v in doc.get("baseline_wall_s", {}).items())
        + " of each wall time. *n*: runs (median reported).",
    ]
    main = next((s for s in doc["sizes"] if s["size"] == doc["settings"]["size"]), None)
    if main is not None:
        fl = main["floor"]
        lines += [
            "",
            f"### Floors ({main['size']} per checkpoint, {fl['buffer_mib']:.0f} MiB buffers)",
            "",
            "| floor | GB/s |",
            "|---|---:|",
        ]
        for t in sorted({1, fl["threads_all"]}):
            lines.append(
                f"| in-memory stream add `torch.add(a, b, out=c)`, float32, {t} thread(s) | {fl[f'mem_add_{t}t_gbps']:.1f} |"
            )
            lines.append(
                f"| in-memory stream copy `c.copy_(a)`, {t} thread(s) | {fl[f'mem_copy_{t}t_gbps']:.1f} |"
            )
        lines.append(
            f"| read the 5 inputs from the page cache (co-aligned `preadv`, 16 MiB buffer) | {fl['read_gbps']:.1f} |"
        )
        lines.append(f"| write one output-sized file (page cache, no fsync) | {fl['write_gbps']:.1f} |")
        lines += [
            "",
            f"### Merge methods at {main['size']} per checkpoint",
            "",
            "| case | tool | n | wall s | work s | GB/s (wall / work) | peak RSS over baseline MiB | "
            "baseline ÷ tvlang, wall (work) | tvlang RSS ÷ baseline RSS, over import baselines (total) | tvlang ÷ floor | "
            "others' load, CPUs |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case, res in main["cases"].items():
            tv = res["tools"]["tvlang"]
            fl_ratio = f"{tv['gbps_wall'] / res['floor']['stream_add_gbps']:.0%} ({tv['gbps_work'] / res['floor']['stream_add_gbps']:.0%})"
            for tool, t in res["tools"].items():
                ratio = rss = "–"
                if tool != "tvlang":
                    ratio = f"{t['median_wall_s'] / tv['median_wall_s']:.1f}× ({t['median_work_s'] / tv['median_work_s']:.1f}×)"
                    over = tv["peak_rss_over_baseline_mib"] / max(t["peak_rss_over_baseline_mib"], 1e-9)
                    rss = f"{over:.3f} ({tv['peak_rss_mib'] / t['peak_rss_mib']:.2f})"
                lines.append(
                    f"| {LABEL[case]} | {tool} | {t['runs']} | {t['median_wall_s']:.2f} | {t['median_work_s']:.2f} | "
                    f"{t['gbps_wall']:.2f} / {t['gbps_work']:.2f} | {t['peak_rss_over_baseline_mib']:.0f} | {ratio} | {rss} | "
                    + (fl_ratio if tool == "tvlang" else "")
                    + f" | {t['median_others_load']:.2f} |"
                )
        lines += [
            "",
            "*tvlang ÷ floor*: tvlang's throughput, wall (work), as a share of the in-memory stream-add "
            "bandwidth (all threads). Formulas (t_i = fine-tune_i − base): "
            + "; ".join(f"{c}: `{FORMULA[c]}`" for c in main["cases"])
            + ". Each tool runs the same YAML config.",
        ]
        checks = [(case, tool, c) for case, res in main["cases"].items() for tool, c in res["checks"].items()]
        if checks:
            lines += [
                "",
                "| case | tvlang vs | values identical | within 1 ulp | max ulps apart | max abs difference | why they differ |",
                "|---|---|---:|---:|---:|---:|---|",
            ]
            for case, tool, c in checks:
                why = WHY.get(tool if tool == "naive" else case, "")
                if c.get("ok"):
                    lines.append(
                        f"| {LABEL[case]} | {tool} | {c['identical']:.4%} | {c['within_1_ulp']:.4%} | {c['max_ulp']:.3g} "
                        f"| {c['max_abs_diff']:.3g} | {why} |"
                    )
                else:
                    lines.append(f"| {LABEL[case]} | {tool} | {c.get('error')} | | | | |")
    lines += [
        "",
        "### Scaling: task arithmetic against model size",
        "",
        "| size | GB per checkpoint | tensors | tool | n | wall s | work s | GB/s (wall / work) | "
        "peak RSS over baseline MiB | RssAnon / RssFile MiB | naive ÷ tvlang, wall | floor s (stream add / read inputs) | "
        "others' load, CPUs |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in doc["sizes"]:
        res = s["cases"].get("task_arithmetic")
        if res is None:
            continue
        tv = res["tools"]["tvlang"]
        for tool, t in res["tools"].items():
            ratio = f"{t['median_wall_s'] / tv['median_wall_s']:.1f}×" if tool == "naive" else "–"
            fl = (
                f"{res['floor']['stream_add_s']:.2f} / {res['floor']['read_s']:.2f}"
                if tool == "tvlang"
                else ""
            )
            lines.append(
                f"| {s['size']} | {s['bytes_per_checkpoint'] / 1e9:.2f} | {s['spec']['tensors']} | {tool} | {t['runs']} | "
                f"{t['median_wall_s']:.2f} | {t['median_work_s']:.2f} | {t['gbps_wall']:.2f} / {t['gbps_work']:.2f} | "
                f"{t['peak_rss_over_baseline_mib']:.0f} | {t['sampled_peak_mib']['RssAnon']:.0f} / "
                f"{t['sampled_peak_mib']['RssFile']:.0f} | {ratio} | {fl} | {t['median_others_load']:.2f} |"
            )
        for note in s["notes"]:
            lines.append(f"| {s['size']} | | | *{note}* | | | | | | | | | |")
    ov = doc.get("overhead")
    if ov:
        kern = (
            "" if ov["prepare_kernels"] else " (`prepare_kernels` not available in this tvlang: not included)"
        )
        lines += [
            "",
            f"### Compile and plan overhead: {ov['tensors']}-tensor model, in process{kern}",
            "",
            "| program | when | parse ms | lower + passes ms | plan from headers ms | kernels ms | total ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, p in ov["programs"].items():
            for when, r in (
                ("first call in a fresh process (kernel disk cache warm)", p["first_in_process"]),
                (f"after a run, median of {len(p['runs'])}", p["median_after_run"]),
            ):
                lines.append(
                    f"| {name} | {when} | {_f(r['parse_ms'], 1)} | {_f(r['lower_ms'], 1)} | "
                    f"{_f(r['plan_ms'], 1)} | {_f(r['kernels_ms'], 1)} | {_f(r['total_ms'], 1)} |"
                )
    if doc.get("plot"):
        lines += [
            "",
            f"![time and peak RSS against model size]({os.path.relpath(doc['plot'], os.path.dirname(doc['results_md']))})",
        ]
    if doc.get("notes"):
        lines += ["", *(f"- {n}" for n in doc["notes"])]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    """Time and peak RSS of task arithmetic against model size, tvlang against the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    floor: list[tuple[float, float]] = []
    for s in doc["sizes"]:
        res = s["cases"].get("task_arithmetic")
        if res is None:
            continue
        gb = s["bytes_per_checkpoint"] / 1e9
        floor.append((gb, res["floor"]["stream_add_s"]))
        for tool, t in res["tools"].items():
            series.setdefault(tool, []).append(
                (gb, t["median_wall_s"], t["median_work_s"], t["peak_rss_over_baseline_mib"])
            )
    style = {"tvlang": ("C0", "o"), "naive": ("C3", "s"), "mergekit": ("C2", "^")}
    for tool, pts in series.items():
        pts.sort()
        color, marker = style.get(tool, ("C7", "x"))
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] for p in pts], marker=marker, color=color, label=f"{tool}, wall")
        ax_t.plot(
            xs,
            [p[2] for p in pts],
            marker=marker,
            color=color,
            ls=":",
            mfc="none",
            label=f"{tool}, after imports",
        )
        ax_m.plot(xs, [max(p[3], 1.0) for p in pts], marker=marker, color=color, label=tool)
    if floor:
        floor.sort()
        ax_t.plot([p[0] for p in floor], [p[1] for p in floor], ls="--", color="k", label="stream-add floor")
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.2g}" for t in ticks])
        ax.set_xlabel("GB per checkpoint (5 inputs, 1 output)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("time, s (median)")
    ax_t.set_title(f"task arithmetic, {doc['settings']['dtype']}: time")
    ax_m.set_ylabel("peak RSS over import baseline, MiB")
    ax_m.set_title("peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    with h.freed_memory_kept() as kept:
        if not kept:
            print(h.NOT_KEPT, flush=True)
        run_suite()


def run_suite() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size",
        default=None,
        help="size per checkpoint of the merge-method cases (default 1G; --quick 100M)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="sizes of the scaling cases, comma-separated (default 100M,1G,4G; --quick 50M,100M)",
    )
    p.add_argument(
        "--8g", dest="eight", action="store_true", help="add 8G to the scaling sizes (about 50 GB of disk)"
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes, fewer runs; results under benchmarks/out/"
    )
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--shards", type=int, default=2, help="shards per generated checkpoint (default 2)")
    p.add_argument("--repeat", type=int, help="runs per tvlang case (default 3; --quick 2)")
    p.add_argument(
        "--naive-repeat", type=int, help="runs of the naive approach per size (default 2; --quick 1)"
    )
    p.add_argument(
        "--mergekit-repeat", type=int, default=1, help="runs per mergekit case (default 1: they are slow)"
    )
    p.add_argument(
        "--naive-max-size", help="largest size to run the naive approach at (default: what fits in memory)"
    )
    p.add_argument(
        "--mergekit-python",
        help=f"interpreter with mergekit installed (default: $TVLANG_MERGEKIT_PYTHON, then {DEFAULT_MERGEKIT})",
    )
    p.add_argument("--mergekit-flags", default="", help="extra mergekit-yaml flags")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    p.add_argument(
        "--mergekit-scaling",
        action="store_true",
        help="run mergekit task_arithmetic at every scaling size too",
    )
    p.add_argument("--tvlang-flags", default="", help="extra `tvlang run` flags, e.g. '--kernels eager'")
    p.add_argument("--no-overhead", action="store_true", help="skip the compile and plan overhead case")
    p.add_argument("--io", action="store_true", help="add the I/O cases: start-up, cold cache, sweep, TIES")
    p.add_argument("--io-only", action="store_true", help="run only the I/O cases (a section of its own)")
    p.add_argument("--io-size", help="size per checkpoint of the I/O cases (default 1G; --quick 100M)")
    p.add_argument(
        "--sweep-k", type=int, help="outputs of the sweep (default: enough to exceed the dirty-page limit)"
    )
    p.add_argument("--repeat-startup", type=int, default=5, help="runs per start-up case (default 5)")
    p.add_argument("--overhead-repeat", type=int, default=5)
    p.add_argument(
        "--floor-buffer",
        type=h.parse_size,
        default=h.parse_size("256M"),
        help="stream buffers (default 256M each)",
    )
    p.add_argument("--json", help="default benchmarks/out/suite.json (--quick: suite-quick.json)")
    p.add_argument(
        "--results-md",
        help="default benchmarks/RESULTS.md (--quick: benchmarks/out/RESULTS-quick.md, a copy)",
    )
    p.add_argument(
        "--plot", help="default benchmarks/scaling.png (--quick: benchmarks/out/scaling-quick.png)"
    )
    p.add_argument(
        "--src",
        default=h.ROOT,
        help="import tvlang from this tree (see linear_merge.py): "
        "git archive HEAD tvlang grammar | tar -x -C DIR; git rev-parse HEAD > DIR/COMMIT",
    )
    args = p.parse_args()
    q = args.quick
    args.size = args.size or ("100M" if q else "1G")
    sizes = (args.sizes or ("50M,100M" if q else "100M,1G,4G")).split(",")
    if args.eight and "8G" not in sizes:
        sizes.append("8G")
    args.repeat = args.repeat or (2 if q else 3)
    args.io_size = args.io_size or ("100M" if q else "1G")
    if q and args.sweep_k is None:
        args.sweep_k = 4  # --quick: a few small outputs, below the dirty-page limit
    args.naive_repeat = args.naive_repeat or (1 if q else 2)
    json_path = args.json or os.path.join(OUT, "suite-quick.json" if q else "suite.json")
    md = args.results_md or (
        os.path.join(OUT, "RESULTS-quick.md") if q else os.path.join(h.ROOT, "benchmarks", "RESULTS.md")
    )
    png = args.plot or (
        os.path.join(OUT, "scaling-quick.png") if q else os.path.join(h.ROOT, "benchmarks", "scaling.png")
    )
    if q and not args.results_md and not os.path.exists(md):
        shutil.copy(os.path.join(h.ROOT, "benchmarks", "RESULTS.md"), md)

    global SRC
    SRC = os.path.abspath(args.src)
    digest = h.source_digest(SRC)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    mk = find_mergekit(args)
    log(f"mergekit: {mk}")
    if args.io_only:
        io_main(args, mk, started, md)
        return
    baseline = [run_child("baseline", []) for _ in range(2)]
    baselines = {"tvlang": statistics.median(int(b["hwm_kib"]) for b in baseline)}
    mkb: list[dict[str, Any]] = []
    if "python" in mk:
        mkb = [run_child("mk_baseline", [], python=mk["python"]) for _ in range(2)]
        baselines["mergekit"] = statistics.median(int(b["hwm_kib"]) for b in mkb)
    order = list(dict.fromkeys(sorted([*sizes, args.size], key=h.parse_size)))
    results = []
    for label in order:
        cases = CASES if label == args.size else ("task_arithmetic",) if label in sizes else ()
        results.append(bench_size(label, h.parse_size(label), cases, mk, baselines, args))
    ov = None if args.no_overhead else bench_overhead(args)
    io = bench_io(mk, args) if args.io else None
    notes = []
    if h.source_digest(SRC) != digest:
        notes.append(f"the tvlang sources under {SRC} changed during the run")
        log("warning: " + notes[-1])
    if "skipped" in mk:
        notes.append(f"mergekit not run: {mk['skipped']}")
    doc = {
        "command": "python "
        + shlex.join(
            [
                os.path.relpath(sys.argv[0], h.ROOT) if sys.argv[0].startswith(h.ROOT) else sys.argv[0],
                *sys.argv[1:],
            ]
        ),
        "cwd": os.getcwd(),
        "started": started,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "tvlang_src": SRC,
        "tvlang_commit": h.source_commit(SRC),
        "tvlang_sources_sha256": digest,
        "machine": h.machine_facts(str(baseline[0]["torch"])),
        "mergekit": mk,
        "settings": {
            "size": args.size,
            "sizes": sizes,
            "dtype": args.dtype,
            "shards": args.shards,
            "repeat": args.repeat,
            "naive_repeat": args.naive_repeat,
            "mergekit_repeat": args.mergekit_repeat,
            "tvlang_flags": args.tvlang_flags,
            "quick": q,
            "io_size": args.io_size,
        },
        "baseline_rss_mib": {k: v / 1024 for k, v in baselines.items()},
        "baseline_wall_s": {
            "tvlang": statistics.median(float(b["wall_s"]) for b in baseline),
            **({"mergekit": statistics.median(float(b["wall_s"]) for b in mkb)} if mkb else {}),
        },
        "sizes": results,
        "overhead": ov,
        "io": io,
        "notes": notes,
        "results_md": md,
        "plot": png,
    }
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, png)
    body = markdown(doc)
    h.write_section(md, body, BEGIN, END, "Benchmark suite (issue 5)")
    if io is not None:
        h.write_section(md, io_markdown(doc), IO_BEGIN, IO_END, "I/O against the device (issue 16)")
        body += "\n\n" + io_markdown(doc)
    print(body)
    log(f"wrote {json_path}, {md} (between {BEGIN} and {END}) and {png}")


def _command() -> str:
    return "python " + shlex.join(
        [
            os.path.relpath(sys.argv[0], h.ROOT) if sys.argv[0].startswith(h.ROOT) else sys.argv[0],
            *sys.argv[1:],
        ]
    )


def io_main(args: argparse.Namespace, mk: dict[str, Any], started: str, md: str) -> None:
    """``--io-only``: the I/O cases alone, into their own section of the results."""
    baseline = run_child("baseline", [])
    io = bench_io(mk, args)
    doc = {
        "command": _command(),
        "started": started,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "tvlang_src": SRC,
        "tvlang_commit": h.source_commit(SRC),
        "machine": h.machine_facts(str(baseline["torch"])),
        "mergekit": mk,
        "settings": {
            "dtype": args.dtype,
            "io_size": args.io_size,
            "repeat": args.repeat,
            "quick": args.quick,
        },
        "io": io,
    }
    json_path = args.json or os.path.join(OUT, "suite-io-quick.json" if args.quick else "suite-io.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    body = io_markdown(doc)
    h.write_section(md, body, IO_BEGIN, IO_END, "I/O against the device (issue 16)")
    print(body)
    log(f"wrote {json_path} and {md} (between {IO_BEGIN} and {IO_END})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        if not sys.argv[3].startswith("mk_"):
            sys.path.insert(0, sys.argv[2])
        child_main(sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        os.makedirs(OUT, exist_ok=True)
        main()
