"""The CPU back-end: read chunk → kernel → write, one chunk at a time, for the executor's workers.

Nothing here decides anything, and nothing here loops over tasks or passes: chunk size, kernels,
dtypes and thread count come from the :class:`~tvlang.plan.Plan`, and the order of tasks, passes
and chunks from :mod:`tvlang.executor`, which :func:`execute` runs with :class:`CpuBackend` (the
GPU back-end hands it the tasks it has no kernel for).  Each chunk is finished when its call
returns, so the chunks of one-pass tasks are shared by ``plan.threads`` workers; torch runs one
intra-op thread per worker (measured on a shared 2-core machine: OpenMP regions inside small ops
wait on descheduled threads, and ran 3–20× slower than one thread), and parallelism comes from the
workers.

Chunks of files are numpy arrays, and a plan whose every task has a compiled
kernel runs without importing torch: the kernels write numpy buffers, copies of
integer tensors are numpy copies, the writers write bytes.  A task that runs
eagerly (no compiler, ``--kernels eager``, float8, row functions, a chunk whose
non-finite values must be explained) sees its chunks as torch tensors
(:func:`tvlang.chunks.to_torch`, no copy).

Non-finite values: every rounded float output chunk gets one cheap check
(:func:`~tvlang.backends.cpu.output_finite`); only a chunk that fails it is
examined to say which input holds how many NaN/±inf values, or whether the
result overflowed.  ``nonfinite="error"`` stops the run at the first such chunk
(E308 for inputs, E309 for overflow), ``"warn"`` counts everything into a
:class:`NonFiniteReport`, ``"propagate"`` skips the check altogether.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from tvlang.backends.compiled import Kernels, TaskKernel, call, prepare_kernels
from tvlang.backends.cpu import Census, Scratch, all_finite, census, output_finite, run_kernel
from tvlang.backends.interpreter import ProgramState
from tvlang.backends.reductions import SAMPLE_RUN, KthLargest
from tvlang.chunks import Chunk, is_torch, numpy_dtype, to_torch
from tvlang.dtypes import torch_dtype
from tvlang.errors import TvError, TvInputError, TvOutputError, TvParamError
from tvlang.executor import Execution, OperandPass, Pass, model_round, run_plan
from tvlang.io import pages
from tvlang.io.endpoints import Sink, Source
from tvlang.options import NONFINITE_MODES
from tvlang.plan.plan import (
    Copy,
    ModelReduction,
    Plan,
    ProgramOutput,
    TensorTask,
    TensorWrite,
    WeightedSum,
    human_bytes,
    row_length,
)

if TYPE_CHECKING:
    import torch

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


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


class NonFiniteReport:
    """NaN/±inf counts of a run per (tensor, cause), gathered from every chunk and thread.

    ``inputs[(tensor, input index)] = [nan, inf]``; ``overflow[(tensor, output index)] =
    [in rounding, in accumulating]``.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.inputs: dict[tuple[str, int], list[int]] = {}
        self.overflow: dict[tuple[str, int], list[int]] = {}
        self.program: dict[tuple[str, int], int] = {}  # NaN/±inf from a method's arithmetic (not attributed)
        self._lock = threading.Lock()

    def add(self, tensor: str, output: int, found: Census) -> None:
        with self._lock:
            for slot, (nan, inf) in found.inputs.items():
                if nan or inf:
                    counts = self.inputs.setdefault((tensor, slot), [0, 0])
                    counts[0] += nan
                    counts[1] += inf
            if found.rounding or found.accumulation:
                counts = self.overflow.setdefault((tensor, output), [0, 0])
                counts[0] += found.rounding
                counts[1] += found.accumulation

    def add_program(self, tensor: str, output: int, count: int) -> None:
        with self._lock:
            self.program[(tensor, output)] = self.program.get((tensor, output), 0) + count

    def __bool__(self) -> bool:
        return bool(self.inputs or self.overflow or self.program)

    def lines(self) -> list[str]:
        """One warning line per tensor, in plan order."""
        by_tensor: dict[str, list[str]] = {}
        codes: dict[str, set[str]] = {}
        for (tensor, slot), (nan, inf) in sorted(self.inputs.items(), key=lambda kv: kv[0][1]):
            inp = self.plan.inputs[slot]
            by_tensor.setdefault(tensor, []).append(
                f"input `{inp.ref.label}` ({inp.location}) has {_counts(nan, inf)}"
            )
            codes.setdefault(tensor, set()).add("E308")
        for (tensor, output), (rounding, accumulating) in sorted(
            self.overflow.items(), key=lambda kv: kv[0][1]
        ):
            by_tensor.setdefault(tensor, []).append(
                _overflow_text(self.plan, tensor, output, rounding, accumulating)
            )
            codes.setdefault(tensor, set()).add("E309")
        for (tensor, output), count in self.program.items():
            by_tensor.setdefault(tensor, []).append(
                f"{count:,} NaN/±inf value{'s' if count != 1 else ''} in output `{self.plan.outputs[output].name}`"
            )
            codes.setdefault(tensor, set()).add("E309")
        order = {t.name: i for i, t in enumerate(self.plan.tasks)}
        return [
            f"warning[{'/'.join(sorted(codes[t]))}]: tensor `{t}`: " + "; ".join(parts) + " (propagated)"
            for t, parts in sorted(by_tensor.items(), key=lambda kv: order.get(kv[0], 0))
        ]


def _counts(nan: int, inf: int) -> str:
    parts = ([f"{nan:,} NaN"] if nan else []) + ([f"{inf:,} ±inf"] if inf else [])
    return " and ".join(parts) + (" values" if nan + inf != 1 else " value")


def _overflow_text(plan: Plan, tensor: str, output: int, rounding: int, accumulating: int) -> str:
    out = plan.outputs[output]
    dtype = next((d for n, d, _ in out.tensors if n == tensor), "?")
    parts = []
    if rounding:
        parts.append(
            f"{rounding:,} finite result{'s' if rounding != 1 else ''} overflow{'s' if rounding == 1 else ''} "
            f"to ±inf when rounded to {dtype}"
        )
    if accumulating:
        parts.append(
            f"{accumulating:,} sum{'s' if accumulating != 1 else ''} of finite inputs overflow"
            f"{'s' if accumulating == 1 else ''} the accumulator"
        )
    return " and ".join(parts) + f" in output `{out.name}`"


def check_nonfinite_mode(mode: str) -> str:
    if mode not in NONFINITE_MODES:
        raise TvParamError(
            f"unknown non-finite policy {mode!r}",
            help="choose one of " + ", ".join(NONFINITE_MODES),
            code="E402",
        )
    return mode


@dataclass
class Run:
    """What every chunk of one execution on the CPU back-end shares (the GPU back-end makes one for
    the tasks it hands back to the CPU, and for the chunks it redoes there)."""

    plan: Plan
    sources: Sequence[Source]
    sinks: Sequence[Sink]
    nonfinite: str
    report: NonFiniteReport
    model_values: Mapping[int, float]
    kernels: Kernels | None = None

    def state(self, task: TensorTask) -> ProgramState:
        """A fresh run of ``task``'s program (its per-tensor numbers, its reductions' accumulators)."""
        return ProgramState.of_task(self.plan, task, self.model_values, self.kernels)


class CpuBackend:
    """The CPU back-end of the executor (:mod:`tvlang.executor`): each chunk through the task's
    compiled kernel, or eagerly in torch, finished before the call returns (so the chunks of
    one-pass tasks are shared by the workers); nothing in flight, nothing to wait for."""

    parallel = True

    def __init__(self, run: Run) -> None:
        self.run = run
        self.kernels = run.kernels
        self._lock = threading.Lock()
        self._finished: dict[int, tuple[set[int], set[int]]] = {}  # see _neighbours_done

    def prepare(self, task: TensorTask) -> bool:
        return True

    def begin(self, p: Pass | OperandPass) -> None:
        return None

    def reduce_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        assert p.state is not None
        sources, name = self.run.sources, p.task.name
        views = {i: sources[i].read(name, start, stop) for i in p.task.reads}
        p.state.feed(p.q, views, start, stop, scratch)
        release(sources, p.task.reads, name, start, stop)

    def output_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        if not p.shared:
            run_chunk(self.run, p.task, start, stop, scratch, p.state)
            return
        run_chunk(self.run, p.task, start, stop, scratch, p.state, release_inputs=False)
        before, after = self._neighbours_done(p, start, stop)
        release(self.run.sources, p.task.reads, p.task.name, start, stop, before=before, after=after)

    def _neighbours_done(self, p: Pass, start: int, stop: int) -> tuple[bool, bool]:
        """Whether the chunks before and after ``[start, stop)`` of a shared pass are done (or there
        are none), now that it is: a block two chunks share goes with the second of them to finish.
        A release that dropped it while the other chunk still read it left that chunk to map it
        again, and no later release covered it: with two workers and the other core busy, a linear
        merge peaked at 392 MiB at 1 GiB and 1364 MiB at 4 GiB (now 81 MiB at both)."""
        with self._lock:
            starts, stops = self._finished.setdefault(id(p), (set(), set()))
            starts.add(start)
            stops.add(stop)
            return start == 0 or start in stops, stop == p.task.numel or stop in starts

    def sample(self, p: Pass, positions: np.ndarray[Any, Any], scratch: Scratch) -> None:
        assert p.state is not None
        gathered = {i: self.run.sources[i].gather(p.task.name, positions, SAMPLE_RUN) for i in p.task.reads}
        views = {i: g for i, g in gathered.items() if g is not None}
        if len(views) == len(gathered):  # (else the first chunk brackets the selection)
            p.state.feed_sample(p.q, views, scratch)

    def operand_chunk(self, p: OperandPass, start: int, stop: int, scratch: Scratch) -> None:
        sources, name = self.run.sources, p.task.name
        views = {i: sources[i].read(name, start, stop) for i in p.task.reads}
        value = p.state.value(p.operand, views, start, stop, scratch)
        p.select.add(_float64(value, scratch), start, p.round_)
        release(sources, p.task.reads, name, start, stop)

    def end(self, p: Pass | OperandPass) -> None:
        # Every chunk of the pass is done (in one worker's scan, or shared among workers). A
        # chunk's first fault mapped the folio it starts in whole, the previous chunk's tail
        # included, after that chunk was released: releasing the whole tensor drops those tails
        # (and the folios around its ends).
        if isinstance(p, Pass) and p.shared:
            with self._lock:
                self._finished.pop(id(p), None)
        release(self.run.sources, p.task.reads, p.task.name, 0, p.task.numel)

    def selector(self, red: ModelReduction) -> KthLargest:
        kernels = self.kernels
        return KthLargest(red.k, red.numel, "F64", kernels.histogram if kernels is not None else None)

    def flush(self) -> None:
        return None


def torch_views(plan: Plan, task: TensorTask, views: Mapping[int, Chunk]) -> dict[int, torch.Tensor]:
    """A task's chunks as torch tensors (no copies), for the eager path."""
    codes = plan.input_dtypes(task)
    return {i: to_torch(x, codes[i]) for i, x in views.items()}


def _eager_tasks(plan: Plan, kernels: Kernels | None) -> bool:
    """Whether some task of ``plan`` runs on the eager (torch) path: every one without compiled
    kernels, else those with float outputs that no kernel computes, or copies that change the
    storage type (chunks that hold NaN/±inf under the ``error`` and ``warn`` policies, and the
    rare program part no kernel takes, import torch when they come)."""
    if kernels is None or plan.eager:
        return True
    for task in plan.tasks:
        if kernels.task(task) is None and any(not _numpy_copy(plan, task, w) for w in task.writes):
            return True
    return False


def _numpy_copy(plan: Plan, task: TensorTask, write: TensorWrite) -> bool:
    """A write that copies an input of the same storage type: a numpy copy, no torch."""
    kernel = write.kernel
    if not isinstance(kernel, Copy):
        return False
    source = plan.inputs[kernel.source].tensors.get(task.name)
    return source is not None and numpy_dtype(source.dtype) == numpy_dtype(write.dtype)


class _TorchThreads:
    """One intra-op torch thread while a run lasts, set only where torch is (or will be) used:
    a run on compiled kernels alone never imports it."""

    def __init__(self) -> None:
        self.previous: int | None = None

    def enter(self, needed: bool) -> None:
        if needed or "torch" in sys.modules:
            import torch

            self.previous = torch.get_num_threads()
            torch.set_num_threads(1)

    def exit(self) -> None:
        if self.previous is not None:
            sys.modules["torch"].set_num_threads(self.previous)


def execute(
    plan: Plan,
    sources: Sequence[Source],
    sinks: Sequence[Sink],
    *,
    progress: Progress | None = None,
    nonfinite: str = "error",
    model_values: Mapping[int, float] | None = None,
) -> NonFiniteReport:
    """Run every chunk of every tensor task on the CPU back-end, ``plan.threads`` workers sharing
    them (:func:`tvlang.executor.run_plan`); the first exception stops the run and is re-raised.

    ``nonfinite``: ``"error"`` raises E308/E309 at the first NaN/±inf in an output chunk,
    ``"warn"`` counts them into the returned report, ``"propagate"`` does not look.
    ``model_values``: the plan's model-wide statistics, when already computed elsewhere (a
    distributed run reduces them over every unit, then runs each unit's tasks here).
    """
    check_nonfinite_mode(nonfinite)
    kernels = prepare_kernels(plan) if plan.kernels == "compiled" else None
    ex = Execution(plan, progress)
    run = Run(plan, sources, sinks, nonfinite, NonFiniteReport(plan), ex.model_values, kernels)
    cpu = CpuBackend(run)
    threads = _TorchThreads()
    threads.enter(plan.kernels != "compiled" or _eager_tasks(plan, kernels))
    try:
        run_plan(ex, cpu, cpu, workers=plan.threads, model_values=model_values)
    finally:
        threads.exit()
    return run.report


def run_chunk(
    run: Run,
    task: TensorTask,
    start: int,
    stop: int,
    scratch: Scratch,
    state: ProgramState | None = None,
    *,
    release_inputs: bool = True,
) -> None:
    """One chunk of every output of ``task`` (``state``: its program's run, when a multi-pass task
    has already done its reductions), its inputs' pages released after unless ``release_inputs``
    is false (the caller releases them)."""
    plan, sources, nonfinite, report = run.plan, run.sources, run.nonfinite, run.report
    views = {i: sources[i].read(task.name, start, stop) for i in task.reads}
    if task.program is not None and state is None:
        state = run.state(task)
    compiled = run.kernels.task(task) if run.kernels is not None and task.name not in plan.eager else None
    if compiled is not None and _run_compiled(run, compiled, task, start, stop, views, scratch, state):
        if release_inputs:
            release(sources, task.reads, task.name, start, stop)
        return
    n = stop - start
    if compiled is None and task.writes and all(_numpy_copy(plan, task, w) for w in task.writes):
        for write in task.writes:  # integer tensors (and copies of floats): numpy copies
            write_to_sink(run.sinks[write.output], task.name, start, _copy(write, views, scratch, n))
        if release_inputs:
            release(sources, task.reads, task.name, start, stop)
        return
    import torch

    tviews = torch_views(plan, task, views)
    counted: set[int] = set()  # inputs already counted in this chunk (several outputs read them)
    program_outputs: list[Chunk] = []
    if state is not None:
        program_outputs = state.outputs(tviews, start, stop, scratch)
    # inputs widened and differences formed once per chunk
    widened: dict[tuple[int, int | None, torch.dtype], torch.Tensor] = {}
    for write in task.writes:
        out = scratch.get("out", torch_dtype(write.dtype), n)
        if isinstance(write.kernel, ProgramOutput):
            out.copy_(to_torch(program_outputs[write.kernel.index]))  # the one rounding
            if nonfinite != "propagate" and not all_finite(out, scratch):
                bad = int(out.numel() - torch.isfinite(out).sum())
                if nonfinite == "error":
                    raise _program_nonfinite_error(plan, task, write, bad)
                report.add_program(task.name, write.output, bad)
            write_to_sink(run.sinks[write.output], task.name, start, out)
            continue
        run_kernel(write.kernel, tviews, out, scratch, widened)
        if nonfinite != "propagate" and not output_finite(write.kernel, out, scratch):
            assert isinstance(write.kernel, WeightedSum)
            if nonfinite == "error":
                raise _nonfinite_error(plan, task, write, sources, scratch)
            found = census(write.kernel, tviews, out, scratch)
            found.inputs = {i: c for i, c in found.inputs.items() if i not in counted}
            counted.update(found.inputs)
            report.add(task.name, write.output, found)
        write_to_sink(run.sinks[write.output], task.name, start, out)
    if release_inputs:
        release(sources, task.reads, task.name, start, stop)


def release(
    sources: Sequence[Source],
    reads: Iterable[int],
    name: str,
    start: int,
    stop: int,
    *,
    before: bool = True,
    after: bool | None = None,
) -> None:
    """Drop elements ``[start, stop)`` of tensor ``name`` in each input of ``reads``, in one call
    for all of them where the system allows (:class:`tvlang.io.pages.Batch`); ``before``/``after``:
    the blocks shared with the neighbouring ranges too (:meth:`tvlang.io.ChunkReader.release`)."""
    with pages.Batch():
        for i in reads:
            sources[i].release(name, start, stop, before=before, after=after)


def _run_compiled(
    run: Run,
    compiled: TaskKernel,
    task: TensorTask,
    start: int,
    stop: int,
    views: Mapping[int, Chunk],
    scratch: Scratch,
    state: ProgramState | None,
) -> bool:
    """One chunk through the task's fused kernel: every float output in one loop, copies copied.
    False (nothing written) when the chunk is the kernel's to refuse (another dtype) or holds
    NaN/±inf that the policy must look at: the eager path then redoes it and says why."""
    n = stop - start
    outs = [scratch.array(("out", k), task.writes[w].dtype, n) for k, w in enumerate(compiled.writes)]
    scalars = state.scalars if state is not None else {}
    assert run.kernels is not None
    keys = run.kernels.random_keys(compiled.bound, task.name)
    bad = call(compiled, views, outs, scalars, keys, start, row=row_length(task.shape))
    if bad < 0 or (bad and run.nonfinite != "propagate"):
        return False
    filled = dict(zip(compiled.writes, outs, strict=True))
    for k, write in enumerate(task.writes):
        out: Chunk | None = filled.get(k)
        if out is None:  # a non-float tensor, copied from its template
            if _numpy_copy(run.plan, task, write):
                out = _copy(write, views, scratch, n)
            else:
                out = scratch.get("out", torch_dtype(write.dtype), n)
                run_kernel(write.kernel, torch_views(run.plan, task, views), out, scratch)
        write_to_sink(run.sinks[write.output], task.name, start, out)
    return True


def _copy(write: TensorWrite, views: Mapping[int, Chunk], scratch: Scratch, n: int) -> Chunk:
    """A copy of the chunk a :class:`Copy` write takes (same storage type) in a scratch buffer."""
    assert isinstance(write.kernel, Copy)
    view = views[write.kernel.source]
    if is_torch(view):
        out = scratch.get("out", view.dtype, n)
        out.copy_(view)
        return out
    buf = scratch.array("out", write.dtype, n)
    np.copyto(buf, view)
    return buf


def model_reduction_round(
    plan: Plan,
    sources: Sequence[Source],
    red: ModelReduction,
    select: KthLargest,
    round_: int,
    scratch: Scratch,
    progress: Progress | None = None,
    kernels: Kernels | None = None,
) -> None:
    """One round of ``red``'s selection on the CPU back-end: every chunk of every tensor of ``plan``
    that uses it, added to ``select``'s histogram (a distributed run adds each unit's histograms on
    the driver)."""
    run = Run(plan, sources, (), "propagate", NonFiniteReport(plan), {}, kernels)
    model_round(Execution(plan, progress), CpuBackend(run), red, select, round_, scratch)


def _float64(values: Any, scratch: Scratch) -> Chunk:
    """A chunk's values in float64 (exact), in a reused buffer when they are numpy's."""
    if is_torch(values):
        wide: Chunk = values.to(sys.modules["torch"].float64)
        return wide
    if values.dtype == np.float64:
        same: Chunk = values
        return same
    buf = scratch.array("float64", "F64", values.size)
    np.copyto(buf, values)
    return buf


def _program_nonfinite_error(plan: Plan, task: TensorTask, write: TensorWrite, count: int) -> TvError:
    out = plan.outputs[write.output]
    return TvInputError(
        f"tensor `{task.name}` of output `{out.name}` has {count:,} NaN/±inf value{'s' if count != 1 else ''} "
        "in this chunk",
        help="a method's arithmetic or its inputs produced them; `--nonfinite warn` writes them anyway",
        code="E309",
    )


def write_to_sink(sink: Sink, name: str, start: int, out: Chunk) -> None:
    """``sink.write``, with any OSError turned into an error that names the output (never a temporary)."""
    try:
        sink.write(name, start, out)
    except OSError as e:
        path = getattr(sink, "path", None) or "the output"
        code = _errno(e)
        reason = os.strerror(code) if code is not None else (e.message if isinstance(e, TvError) else str(e))
        if code in _DISK_FULL:
            raise TvOutputError(
                f"disk full while writing {path}",
                notes=(reason,),
                help="free space on that filesystem or write elsewhere; nothing was left behind",
                code="E503",
            ) from None
        raise TvOutputError(f"{path}: cannot write: {reason}", code="E500") from None


def _errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of the one it wraps (the writer re-raises OSError as TvOutputError)."""
    seen: BaseException | None = e
    while seen is not None:
        code = getattr(seen, "errno", None)
        if isinstance(code, int):
            return code
        seen = seen.__cause__ or seen.__context__
    return None


def _nonfinite_error(
    plan: Plan, task: TensorTask, write: TensorWrite, sources: Sequence[Source], scratch: Scratch
) -> TvError:
    """The E308/E309 error for the tensor of a chunk whose output is not finite, with counts over
    the whole tensor (a second pass over just this tensor: this is the path that stops the run)."""
    kernel = write.kernel
    assert isinstance(kernel, WeightedSum)
    total = NonFiniteReport(plan)
    slots = sorted(kernel.inputs)
    for lo in range(0, task.numel, plan.chunk):
        hi = min(task.numel, lo + plan.chunk)
        views = torch_views(plan, task, {i: sources[i].read(task.name, lo, hi) for i in slots})
        out = scratch.get("census", torch_dtype(write.dtype), hi - lo)
        run_kernel(kernel, views, out, scratch)
        if not output_finite(kernel, out, scratch):
            total.add(task.name, write.output, census(kernel, views, out, scratch))
        release(sources, slots, task.name, lo, hi)
    bad = [(slot, counts) for (_, slot), counts in sorted(total.inputs.items(), key=lambda kv: kv[0][1])]
    how = 'rerun with --nonfinite warn (Options(nonfinite="warn")) to write the output anyway, or propagate'
    if bad:
        slot, (nan, inf) = bad[0]
        inp = plan.inputs[slot]
        others = [f"`{plan.inputs[s].ref.label}` has {_counts(a, b)} too" for s, (a, b) in bad[1:]]
        return TvInputError(
            f"input `{inp.ref.label}` has {_counts(nan, inf)} in tensor `{task.name}`",
            inp.ref.span,
            label="this input",
            notes=(f"`{inp.ref.label}`: {inp.location}", *others),
            help=f"the checkpoint is damaged or diverged; {how}",
            code="E308",
        )
    if not total.overflow:  # the data changed between the two passes
        return TvInputError(f"tensor `{task.name}`: non-finite values appeared in the output", code="E308")
    (_, output), (rounding, accumulating) = next(iter(total.overflow.items()))
    wider = {"F64": None, "F32": "fp64"}.get(write.dtype, "fp32")
    fix = f"write a wider dtype (--dtype {wider}), " if wider else ""
    return TvInputError(
        f"tensor `{task.name}`: " + _overflow_text(plan, task.name, output, rounding, accumulating),
        help=f"the exact result is beyond the range of {write.dtype}: {fix}check the weights, or {how}",
        code="E309",
    )


__all__ = [
    "NONFINITE_MODES",
    "CpuBackend",
    "NonFiniteReport",
    "Progress",
    "Run",
    "check_nonfinite_mode",
    "execute",
    "model_reduction_round",
    "run_chunk",
    "write_to_sink",
]
