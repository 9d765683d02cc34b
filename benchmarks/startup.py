"""Start-up of a plain merge (issue 16: start to first byte read < 150 ms): a baseline tvlang against this one.

Every measurement is a fresh process, the baseline (a checkout of ``--baseline``, by default the
commit this branch started from, or on main the commit before HEAD) and the current tree alternating,
in the same run:

* ``python -c pass`` and ``python -c "import tvlang.cli, tvlang.api"`` (import only; again with
  ``OPENBLAS_NUM_THREADS=1`` for both, which the ``tvlang`` command sets: the imports alone);
* a tiny merge, ``python -m tvlang eval 'base + 0.4*(amazon_sent - base)' ... -o out.safetensors``:
  wall and CPU time (user + system) of the whole process;
* where that time goes, in one process (Python, numpy, tvlang's imports, ``main()``);
* start to first byte read of that merge: from just before the process starts to the first
  ``ChunkReader``, (a) through the command's entry point (``tvlang.cli.run``; the reader is patched
  when its module is first imported, so nothing is imported ahead of the command), and (b) as
  benchmarks/torch_free.py measures it (the reader imported first, then ``tvlang.cli.main``).

Medians of ``--repeat`` runs after one warm-up run per case (kernels compiled, page cache warm,
the program's parse cached: the repeated run); both trees' bytecode is compiled first, as an
installed package's is.  The runs use a cache directory of their own (``TVLANG_CACHE``).  The
first run of a new program is measured too: the tiny merge and its first read again, each run
with a new cache directory whose ``kernels/`` and ``grammar/`` are those of the warm one (links),
so that its parse cache is empty and nothing is compiled.  ``--write`` puts the table into
benchmarks/RESULTS.md.

    python benchmarks/startup.py --repeat 9 --write
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h
from torch_free import checkout, launch, med, revisions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"

# (a): the reader is timed from its module's import on; the command runs as `tvlang` does.
ENTRY = """\
import importlib.abc, importlib.util, os, sys, time

def stamp(module):
    init = module.ChunkReader.__init__
    def timed(self, *a, **k):
        if not getattr(module.ChunkReader, "_seen", False):
            module.ChunkReader._seen = True
            with open(os.environ["TV_FIRST_READ"], "w") as f:
                f.write(repr(time.time()))
        init(self, *a, **k)
    module.ChunkReader.__init__ = timed

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tvlang.io.safetensors":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module
        def exec_module(module):
            execute(module)
            stamp(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
sys.argv = ["tvlang", *sys.argv[1:]]
from tvlang.cli import run
run()
"""

# (b): as benchmarks/torch_free.py (numpy and the reader imported before the command starts).
MAIN = """\
import os, sys, time
from tvlang.io.safetensors import ChunkReader
init = ChunkReader.__init__
def timed(self, *a, **k):
    if not getattr(ChunkReader, "_seen", False):
        ChunkReader._seen = True
        with open(os.environ["TV_FIRST_READ"], "w") as f:
            f.write(repr(time.time()))
    init(self, *a, **k)
ChunkReader.__init__ = timed
from tvlang.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Where the time goes, in one process: Python's start, numpy, the rest of tvlang's imports, and
# main() up to the first read (OPENBLAS_NUM_THREADS=1 for both, as the `tvlang` command sets).
PARTS = """\
import json, os, sys, time
t0 = time.time()
import numpy
t1 = time.time()
import tvlang.cli, tvlang.api
t2 = time.time()
from tvlang.io.safetensors import ChunkReader
init = ChunkReader.__init__
def timed(self, *a, **k):
    if not getattr(ChunkReader, "_seen", False):
        ChunkReader._seen = True
        with open(os.environ["TV_FIRST_READ"], "w") as f:
            json.dump([t0, t1, t2, time.time()], f)
    init(self, *a, **k)
ChunkReader.__init__ = timed
from tvlang.cli import main
sys.exit(main(sys.argv[1:]))
"""
PART_NAMES = (
    "Python itself, to the first line",
    "`import numpy`",
    "the rest of `import tvlang.cli, tvlang.api`",
    "`main()` up to the first read",
)

MERGE = [
    "eval",
    "base + 0.4*(amazon_sent - base)",
    "--bind",
    "base=ckpt/base",
    "--bind",
    "amazon_sent=ckpt/amazon_sent",
    "-q",
    "--force",
    "-o",
    "out.safetensors",
]


def first_read(script: str, path: str, cwd: str, env: dict[str, str]) -> tuple[float, float, float]:
    """(seconds from just before the process starts to the first reader, wall, CPU seconds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".t") as stamp:
        t, wall, _, cpu = launch(
            [sys.executable, "-c", script, *MERGE], path, cwd, {**env, "TV_FIRST_READ": stamp.name}
        )
        return float(Path(stamp.name).read_text()) - t, wall, cpu


def parts(path: str, cwd: str, env: dict[str, str]) -> list[float]:
    """Seconds spent in each of PART_NAMES by one run of the tiny merge."""
    with tempfile.NamedTemporaryFile("r", suffix=".t") as stamp:
        env = {**env, "TV_FIRST_READ": stamp.name, "OPENBLAS_NUM_THREADS": "1"}
        t, *_ = launch([sys.executable, "-c", PARTS, *MERGE], path, cwd, env)
        marks = [t, *json.loads(Path(stamp.name).read_text())]
        return [b - a for a, b in itertools.pairwise(marks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--baseline",
        help="git revision to compare with (default: merge-base of HEAD and main; on main, HEAD~1)",
    )
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    opts = ap.parse_args()
    baseline, base_rev, head_rev = revisions(opts.baseline)
    sys.path.insert(0, str(ROOT))
    from tvlang.demo import make_playground
    from tvlang.synth import llama_spec

    tmp = tempfile.mkdtemp(prefix="tvlang-startup-")
    try:
        os.makedirs(os.path.join(tmp, "old"))
        versions = {"baseline": checkout(baseline, os.path.join(tmp, "old")), "this": str(ROOT)}
        play = os.path.join(tmp, "play")
        make_playground(play, llama_spec(64, 2, 256).shapes())
        for path in versions.values():  # as installed: bytecode compiled (not charged to any run)
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", os.path.join(path, "tvlang")], check=True
            )

        cache = os.path.join(tmp, "cache")

        def warm(env: dict[str, str] | None = None) -> dict[str, str]:
            return {**(env or {}), "TVLANG_CACHE": cache}

        def empty_parse_cache() -> dict[str, str]:
            """A new cache directory that shares the kernels and grammar tables of the warm one."""
            fresh = tempfile.mkdtemp(dir=tmp, prefix="cache-")
            for part in ("kernels", "grammar"):
                os.makedirs(os.path.join(cache, part), mode=0o700, exist_ok=True)
                os.symlink(os.path.join(cache, part), os.path.join(fresh, part))
            return {"TVLANG_CACHE": fresh}

        def wall_cpu(cmd: list[str], env: dict[str, str] | None = None) -> object:
            return lambda path: launch(cmd, path, play, warm(env))[1:4:2]  # (wall, CPU)

        def cold_wall_cpu(cmd: list[str]) -> object:
            return lambda path: launch(cmd, path, play, empty_parse_cache())[1:4:2]

        cases = [
            ("`python -c pass`", wall_cpu([sys.executable, "-c", "pass"])),
            (
                '`python -c "import tvlang.cli, tvlang.api"` (import only)',
                wall_cpu([sys.executable, "-c", "import tvlang.cli, tvlang.api"]),
            ),
            (
                "the same, both with `OPENBLAS_NUM_THREADS=1` (the imports alone)",
                wall_cpu([sys.executable, "-c", "import tvlang.cli, tvlang.api"], {"OPENBLAS_NUM_THREADS": "1"}),
            ),
            ("tiny merge: `python -m tvlang eval ...`, whole process", wall_cpu([sys.executable, "-m", "tvlang", *MERGE])),
            ("start to first byte read, through `tvlang.cli.run`", lambda p: first_read(ENTRY, p, play, warm())[::2]),
            ("start to first byte read, as torch_free.py (reader imported first)", lambda p: first_read(MAIN, p, play, warm())[::2]),
            ("tiny merge, whole process, empty parse cache (a new program)", cold_wall_cpu([sys.executable, "-m", "tvlang", *MERGE])),
            ("start to first byte read, through `tvlang.cli.run`, empty parse cache", lambda p: first_read(ENTRY, p, play, empty_parse_cache())[::2]),
        ]  # fmt: skip
        load = os.getloadavg()[0]
        rows = []
        for label, measure in cases:
            got: dict[str, list[tuple[float, float]]] = {v: [] for v in versions}
            for path in versions.values():
                measure(path)  # type: ignore[operator]  # warm-up: kernels compiled, pages cached
            for _ in range(opts.repeat):
                for v, path in versions.items():
                    got[v].append(measure(path))  # type: ignore[operator]
            rows.append((label, {v: (med(x[0] for x in r), med(x[1] for x in r)) for v, r in got.items()}))
            print(label, rows[-1][1], file=sys.stderr, flush=True)
        split: dict[str, list[list[float]]] = {v: [] for v in versions}
        for _ in range(opts.repeat):
            for v, path in versions.items():
                split[v].append(parts(path, play, warm()))
        part_rows = [
            (name, {v: med(r[i] for r in runs) for v, runs in split.items()})
            for i, name in enumerate(PART_NAMES)
        ]
        load = (load + os.getloadavg()[0]) / 2
        text = report(rows, opts, base_rev, head_rev, load) + "\n\n" + report_parts(part_rows, opts.repeat)
        print(text)
        if opts.write:
            write(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    rows: list[tuple[str, dict[str, tuple[float, float]]]],
    opts: argparse.Namespace,
    base_rev: str,
    head_rev: str,
    load: float,
) -> str:
    lines = [
        f"Generated by `python benchmarks/startup.py --repeat {opts.repeat}"
        f"{f' --baseline {opts.baseline}' if opts.baseline else ''} --write` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, baseline `{base_rev}` against `{head_rev}` (this), each a fresh "
        f"process, alternating; medians of {opts.repeat}. Machine: {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, shared with other jobs (load average {load:.1f}).",
        "",
        "| case | ms, baseline | ms, this | ratio | CPU ms, baseline | CPU ms, this |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        (w0, c0), (w1, c1) = r["baseline"], r["this"]
        lines.append(
            f"| {label} | {w0 * 1e3:.0f} | {w1 * 1e3:.0f} | {w0 / w1:.2f}x | {c0 * 1e3:.0f} | {c1 * 1e3:.0f} |"
        )
    return "\n".join(lines)


def report_parts(rows: list[tuple[str, dict[str, float]]], repeat: int) -> str:
    lines = [
        f"Where the tiny merge's time to its first read goes, in one process (`OPENBLAS_NUM_THREADS=1` for both, "
        f"parse cache warm; medians of {repeat}, each part on its own):",
        "",
        "| part | ms, baseline | ms, this |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {r['baseline'] * 1e3:.1f} | {r['this'] * 1e3:.1f} |" for name, r in rows]
    return "\n".join(lines)


def write(text: str) -> None:
    h.write_section(str(RESULTS), text, BEGIN, END, "Start-up of a plain merge (issue 16)")


if __name__ == "__main__":
    main()
