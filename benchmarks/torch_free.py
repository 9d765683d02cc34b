"""Start-up and memory without torch on the hot path (issue 16, item 1): a baseline tvlang against this one.

Every measurement is a fresh process, run alternately for the baseline (a checkout of ``--baseline``,
by default the commit this branch started from, or on main the commit before HEAD) and the current
tree, in the same run:

* ``python -c pass``, and ``python -c "import tvlang.cli, tvlang.api"``: wall time and peak RSS;
* start to first byte read: from just before the process starts to the first chunk a checkpoint
  reader hands out, in a tiny linear merge (the reader is timed from inside the process);
* a tiny linear merge (the demo's, hidden size 64): wall time and peak RSS;
* a 1 GB × 5 bf16 linear merge (``--big``): wall time and peak RSS (warm page cache).

Peak RSS is the child's ``ru_maxrss`` (``os.wait4``), in MiB, absolute.  Medians of ``--repeat`` runs
after one warm-up run per case (kernels compiled, page cache warm); both trees' bytecode is compiled
first, as an installed package's is.  ``--write`` puts the table into
benchmarks/RESULTS.md.

    python benchmarks/torch_free.py --big --write
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- torch_free:begin -->", "<!-- torch_free:end -->"

FIRST_READ = """\
import os, sys, time
from tvlang.io.safetensors import ChunkReader
_read = ChunkReader.read
def read(self, *a, **k):
    if not getattr(ChunkReader, "_seen", False):
        ChunkReader._seen = True
        with open(os.environ["TV_FIRST_READ"], "w") as f:
            f.write(repr(time.time()))
    return _read(self, *a, **k)
ChunkReader.read = read
from tvlang.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A small process forks the measured one, so that its peak RSS is its own: a child forked from this
# script (torch imported) would start with this script's resident size as its high-water mark.
LAUNCH = """\
import os, sys, time
t = time.time()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
cpu = usage.ru_utime + usage.ru_stime
print(t, time.time() - t, usage.ru_maxrss / 1024, cpu, os.waitstatus_to_exitcode(status))
"""

LINEAR = """\
base = load("base.safetensors")
amazon_sent = load("amazon_sent.safetensors") - base
amazon_lm = load("amazon_lm.safetensors") - base
yelp_lm = load("yelp_lm.safetensors") - base
toxic = load("toxic.safetensors") - base
output merged = base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic
"""


def launch(cmd: Sequence[str], path: str, cwd: str, env: dict[str, str] | None = None) -> tuple[float, ...]:
    """(start time, wall seconds, peak RSS MiB, CPU seconds) of one fresh process (see LAUNCH)."""
    full = {**os.environ, **(env or {}), "PYTHONPATH": path}
    full.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, *cmd], cwd=cwd, env=full, capture_output=True, text=True
    )
    t, wall, rss, cpu, code = done.stdout.split()[-5:]
    if done.returncode != 0 or code != "0":
        raise RuntimeError(f"{cmd} failed ({code}): {done.stderr[-2000:]}")
    return float(t), float(wall), float(rss), float(cpu)


def run(cmd: Sequence[str], path: str, cwd: str) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds: user + system) of one fresh process."""
    _, wall, rss, cpu = launch(cmd, path, cwd)
    return wall, rss, cpu


def first_read(path: str, cwd: str, args: Sequence[str]) -> float:
    """Seconds from just before the process starts to the first chunk read."""
    with tempfile.NamedTemporaryFile("r", suffix=".t") as stamp:
        t, _, _, _ = launch(
            [sys.executable, "-c", FIRST_READ, *args], path, cwd, {"TV_FIRST_READ": stamp.name}
        )
        return float(Path(stamp.name).read_text()) - t


def revisions(baseline: str | None) -> tuple[str, str, str]:
    """(the baseline revision, its short hash, HEAD's short hash); the baseline defaults to the
    merge-base of HEAD and main, or on main itself (where that is HEAD) to HEAD's parent."""
    git = ["git", "-C", str(ROOT)]
    if baseline is None:
        head = subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip()
        baseline = subprocess.check_output([*git, "merge-base", "HEAD", "main"], text=True).strip()
        if baseline == head:
            baseline = "HEAD~1"
    short = [
        subprocess.check_output([*git, "rev-parse", "--short=12", r], text=True).strip()
        for r in (baseline, "HEAD")
    ]
    return baseline, short[0], short[1]


def checkout(rev: str, into: str) -> str:
    """The package at ``rev`` (``git archive``), for the baseline."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "tvlang", "grammar"], capture_output=True
    )
    archive.check_returncode()
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--baseline",
        help="git revision to compare with (default: merge-base of HEAD and main; on main, HEAD~1)",
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also the 1 GB x 5 linear merge")
    ap.add_argument("--big-repeat", type=int, default=3)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tvlang-bench-torch-free"))
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    opts = ap.parse_args()
    baseline, base_rev, head_rev = revisions(opts.baseline)
    sys.path.insert(0, str(ROOT))
    from tvlang.demo import make_playground
    from tvlang.synth import llama_spec, spec_for_bytes, write_family

    tmp = tempfile.mkdtemp(prefix="tvlang-torch-free-")
    try:
        os.makedirs(os.path.join(tmp, "old"))
        versions = {f"baseline `{base_rev}`": checkout(baseline, os.path.join(tmp, "old")), "this": str(ROOT)}
        play = os.path.join(tmp, "play")
        make_playground(play, llama_spec(64, 2, 256).shapes())
        tiny = [
            sys.executable,
            "-m",
            "tvlang",
            "run",
            "sentiment.tv",
            "-q",
            "--force",
            "-o",
            "out.safetensors",
        ]
        cases: list[tuple[str, list[str], str, int]] = [
            ("`python -c pass`", [sys.executable, "-c", "pass"], play, opts.repeat),
            (
                '`python -c "import tvlang.cli, tvlang.api"` (what `tvlang run` imports)',
                [sys.executable, "-c", "import tvlang.cli, tvlang.api"],
                play,
                opts.repeat,
            ),
            ("tiny linear merge (demo, hidden 64): `tvlang run sentiment.tv`", tiny, play, opts.repeat),
        ]
        if opts.big:
            big = os.path.join(opts.data, "1G")
            if not os.path.exists(os.path.join(big, "toxic.safetensors")):
                names = ["base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic"]
                print("generating 5 x 1 GB …", file=sys.stderr, flush=True)
                write_family(big, names, spec_for_bytes(10**9), layout="file")
            Path(big, "linear.tv").write_text(LINEAR)
            cmd = [
                sys.executable,
                "-m",
                "tvlang",
                "run",
                "linear.tv",
                "-q",
                "--force",
                "-o",
                "out.safetensors",
            ]
            cases.append(("1 GB x 5 bf16 linear merge (warm cache)", cmd, big, opts.big_repeat))
        for path in versions.values():  # as installed: bytecode compiled (not charged to any run)
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", os.path.join(path, "tvlang")], check=True
            )
        rows = []
        for label, cmd, cwd, n in cases:
            got: dict[str, list[tuple[float, float, float]]] = {v: [] for v in versions}
            for path in versions.values():
                run(cmd, path, cwd)  # warm-up: kernels compiled, pages cached
            for _ in range(n):
                for v, path in versions.items():
                    got[v].append(run(cmd, path, cwd))
            rows.append(
                (label, n, {v: tuple(med(x[i] for x in r) for i in range(3)) for v, r in got.items()})
            )
            print(label, rows[-1][2], file=sys.stderr, flush=True)
        args = ["run", "sentiment.tv", "-q", "--force", "-o", "o.safetensors"]
        starts = {
            v: med(first_read(path, play, args) for _ in range(opts.repeat)) for v, path in versions.items()
        }
        text = report(rows, starts, versions, opts, base_rev, head_rev)
        print(text)
        if opts.write:
            write(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def med(xs: object) -> float:
    return statistics.median(list(xs))  # type: ignore[call-overload]


def report(
    rows: list[tuple[str, int, dict[str, tuple[float, ...]]]],
    starts: dict[str, float],
    versions: dict[str, str],
    opts: argparse.Namespace,
    base_rev: str,
    head_rev: str,
) -> str:
    old, new = list(versions)
    cmd = "python benchmarks/torch_free.py" + (" --big" if opts.big else "") + " --write"
    lines = [
        f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M')}, baseline `{base_rev}` against `{head_rev}`"
        f" (this), each a fresh process, alternating; medians. Machine: {os.cpu_count()} CPUs, "
        f"{platform.python_version()}, shared with other jobs.",
        "",
        f"| case | n | wall s, {old} | wall s, this | wall ratio | CPU s (user + sys), {old} | CPU s, this "
        f"| peak RSS MiB, {old} | peak RSS MiB, this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, n, r in rows:
        (w0, m0, c0), (w1, m1, c1) = r[old], r[new]
        lines.append(
            f"| {label} | {n} | {w0:.3f} | {w1:.3f} | {w0 / w1:.1f}x | {c0:.2f} | {c1:.2f} | {m0:.0f} | {m1:.0f} |"
        )
    s0, s1 = starts[old], starts[new]
    lines.append(
        f"| start to first byte read (tiny merge) | {opts.repeat} | {s0:.3f} | {s1:.3f} | {s0 / s1:.1f}x "
        "| | | | |"
    )
    return "\n".join(lines)


def write(text: str) -> None:
    h.write_section(
        str(RESULTS), text, BEGIN, END, "A torch-free hot path: start-up and memory (issue 16, item 1)"
    )


if __name__ == "__main__":
    main()
