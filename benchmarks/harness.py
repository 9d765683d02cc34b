"""What every benchmark here shares: fresh-process runs, peak-RSS measurement, page-cache warming,
sizes, and the facts that tie numbers to a machine and to exact code.

Standard library only, so that a benchmark's parent process (and a child running in another
interpreter, such as a separate environment holding mergekit) never imports torch.

A *child* is a fresh interpreter running ``SCRIPT _child SRC KIND REPORT ARGS…``: the script puts
``SRC`` first on ``sys.path`` (so tvlang is imported from that tree), does its work, and writes a
JSON report to ``REPORT`` that includes :func:`vm_hwm_kib` and :func:`cpu_s` taken just before it
exits.  :func:`run_child` starts it, samples its RSS split every 10 ms, and adds the wall time and
the load other processes put on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "out")
MiB = 2**20


def vm_hwm_kib() -> int:
    """This process's peak resident set (``VmHWM``).  Not ``ru_maxrss``: Linux seeds a child's
    ``ru_maxrss`` with its parent's peak at exec, while ``VmHWM`` belongs to the new address space."""
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``1.5GiB`` → bytes (binary units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 512M, 1G)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def proc_status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+)", text, re.M)}


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def run_child(
    script: str,
    src: str,
    kind: str,
    args: list[str],
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python script _child src kind REPORT *args``, sampling its RSS split; return its report
    plus ``wall_s``, ``sampled_peak_kib`` (maxima of RssAnon/RssFile/… sampled every 10 ms) and
    ``others_load`` (CPUs other processes used meanwhile)."""
    os.makedirs(OUT, exist_ok=True)
    report = os.path.join(OUT, f".report-{kind}.json")
    if os.path.exists(report):
        os.remove(report)
    cmd = [python, os.path.abspath(script), "_child", src, kind, report, *args]
    peaks: dict[str, int] = {}
    busy0, t0 = busy_s(), time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    while proc.poll() is None:
        for k, v in proc_status(proc.pid).items():
            peaks[k] = max(peaks.get(k, 0), v)
        time.sleep(0.01)
    wall, busy = time.perf_counter() - t0, busy_s() - busy0
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0 or not os.path.exists(report):
        raise SystemExit(f"{kind} child failed (exit {proc.returncode}):\n{output}")
    with open(report) as f:
        info: dict[str, Any] = json.load(f)
    if info.get("rc", 0) != 0:
        raise SystemExit(f"{kind}: tvlang exited {info['rc']}:\n{output}")
    others = max(0.0, busy - float(info["cpu_s"])) / wall
    return {**info, "wall_s": wall, "sampled_peak_kib": peaks, "others_load": others}


def warm(paths: list[str]) -> None:
    """Read every input once so the timed run starts from a warm page cache."""
    buf = bytearray(16 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def reread(paths: list[str]) -> None:
    """Drop each file from the page cache (``POSIX_FADV_DONTNEED``: clean pages only, no root
    needed) and read it back in order, so that every run starts from the same page cache: the
    large folios (2 MiB) a sequential read leaves.  A file's history can leave it in small ones
    (written page by page, or partly reclaimed and faulted back), and page faults through a memory
    map then cost more: task arithmetic at 1 GiB took 0.79 s on inputs in 4 KiB folios and 0.62 s
    on the same inputs read back; on inputs written in 2 MiB pieces 8 KiB off the 2 MiB
    boundaries, as tvlang's writer writes tensors, 0.65 against 0.63 s (benchmarks/PROFILE.md)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # (dirty pages are not dropped)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    warm(paths)


# Free page reporting (virtio-balloon): the guest hands memory it has freed back to the host, and the
# next touch of those pages faults in the host, about 2.7 s per GiB on this project's machine.  A
# merge's output written right after another run freed its 1 GiB (an output deleted, a process
# gone) paid it: the same task arithmetic took 0.61 or 1.6 s depending on what ran before it
# (benchmarks/PROFILE.md).  Where the guest kernel has this knob, pages freed less than this long
# ago are not reported.
REPORTING_DELAY = "/sys/module/page_reporting/parameters/min_free_ms"
HOLD_MS = 60_000


NOT_KEPT = (
    "note: memory freed between runs may go back to the host here (no page-reporting knob, or not "
    "root), and a run right after another can pay the host's first touch of its output"
)


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory in the guest while the block runs (root, and a kernel with the knob); the
    old setting comes back after.  Yields whether it took effect; a benchmark says so when not."""
    try:
        with open(REPORTING_DELAY) as f:
            old = f.read().strip()
        with open(REPORTING_DELAY, "w") as f:
            f.write(str(HOLD_MS))
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with open(REPORTING_DELAY, "w") as f:
            f.write(old)


def source_digest(src: str) -> str:
    """sha256 over tvlang/**/*.py and the grammar, to tie the numbers to exact code."""
    h = hashlib.sha256()
    paths = glob.glob("tvlang/**/*.py", root_dir=src, recursive=True) + glob.glob(
        "grammar/*.lark", root_dir=src
    )
    for rel in sorted(paths):
        with open(os.path.join(src, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()


def source_commit(src: str) -> str:
    """The commit the tvlang sources come from: ``src/COMMIT`` for a snapshot, else git (``+dirty``)."""
    if os.path.exists(os.path.join(src, "COMMIT")):
        with open(os.path.join(src, "COMMIT")) as f:
            return f.read().strip()

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=src, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "HEAD") + (
        "+dirty" if git("status", "--porcelain", "--", "tvlang", "grammar") else ""
    )


def machine_facts(torch_version: str) -> dict[str, Any]:
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"^MemTotal:\s+(\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu_model": m.group(1) if m else "?",
            "mem_total_gib": round(mem / 2**20, 1), "python": platform.python_version(), "torch": torch_version,
            "kernel": platform.release()}  # fmt: skip


def write_section(path: str, body: str, begin: str, end: str, title: str) -> None:
    """Replace the text between the markers ``begin`` and ``end`` in ``path`` (RESULTS.md), or append
    the section under the heading ``title`` if they are missing."""
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)
