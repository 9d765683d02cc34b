"""Execute a plan: read chunk → kernel → write, on a small pool of threads.

Nothing here decides anything: chunk size, kernels, dtypes and thread count
all come from the :class:`~tvlang.plan.Plan`.  Work items are chunk ranges of
tensors, handed out in plan order; torch runs one intra-op thread per worker
(on a shared 2-core machine OpenMP regions inside small ops wait on
descheduled threads; see benchmarks/RESULTS.md), and parallelism comes from
the workers.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

import torch

from tvlang.backends.cpu import Scratch, run_kernel
from tvlang.io.endpoints import Sink, Source
from tvlang.io.safetensors import DTYPES
from tvlang.plan.plan import ITEMSIZE, Plan, TensorTask, human_bytes


class Progress:
    """A progress line with throughput on a stream (a bar on terminals, a final summary elsewhere)."""

    def __init__(self, total: int, stream: TextIO | None = None, label: str = "merging") -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.label = label
        self.start = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()
        self._tty = bool(stream is not None and stream.isatty())

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.perf_counter()
            if self._tty and now - self._last > 0.1:
                self._last = now
                self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        assert self.stream is not None
        elapsed = max(now - self.start, 1e-9)
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 24)
        rate = self.done / elapsed
        line = (
            f"\r{self.label} [{bar:<24}] {frac:4.0%}  {human_bytes(self.done)} / {human_bytes(self.total)}"
            f"  {human_bytes(rate)}/s  {elapsed:.1f}s"
        )
        self.stream.write(line + end)
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self._draw(time.perf_counter(), end="\n")


def _work(plan: Plan) -> Iterator[tuple[TensorTask, int, int]]:
    for task in plan.tasks:
        n = task.numel
        if n == 0:
            yield task, 0, 0
        for start in range(0, n, plan.chunk):
            yield task, start, min(n, start + plan.chunk)


def execute(
    plan: Plan,
    sources: Sequence[Source],
    sinks: Sequence[Sink],
    *,
    progress: Progress | None = None,
) -> None:
    """Run every chunk of every tensor task; the first exception stops the run and is re-raised."""
    items = _work(plan)
    lock = threading.Lock()
    failed = threading.Event()
    per_chunk_bytes = {
        id(task): sum(ITEMSIZE[plan.inputs[i].tensors[task.name].dtype] for i in task.reads)
        + sum(ITEMSIZE[w.dtype] for w in task.writes)
        for task in plan.tasks
    }

    def worker() -> None:
        scratch = Scratch()
        while not failed.is_set():
            with lock:
                item = next(items, None)
            if item is None:
                return
            task, start, stop = item
            try:
                _run_chunk(task, start, stop, sources, sinks, scratch)
            except BaseException:
                failed.set()
                raise
            if progress is not None:
                progress.advance((stop - start) * per_chunk_bytes[id(task)])

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if plan.threads <= 1:
            worker()
        else:
            with ThreadPoolExecutor(plan.threads, thread_name_prefix="tvlang") as pool:
                futures = [pool.submit(worker) for _ in range(plan.threads)]
                errors = [f.exception() for f in futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
    finally:
        torch.set_num_threads(previous_threads)
    if progress is not None:
        progress.finish()


def _run_chunk(
    task: TensorTask,
    start: int,
    stop: int,
    sources: Sequence[Source],
    sinks: Sequence[Sink],
    scratch: Scratch,
) -> None:
    views = {i: sources[i].read(task.name, start, stop) for i in task.reads}
    n = stop - start
    for write in task.writes:
        out = scratch.get("out", DTYPES[write.dtype], n)
        run_kernel(write.kernel, views, out, scratch)
        sinks[write.output].write(task.name, start, out)
    for i in task.reads:
        sources[i].release(task.name, start, stop)


def progress_stream(enabled: bool) -> TextIO | None:
    return sys.stderr if enabled else None


__all__ = ["Progress", "execute", "progress_stream"]
