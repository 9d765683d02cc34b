"""The executor: the one loop over tasks, passes and chunks that every back-end runs.

The plan decides and the back-ends obey; this module drives them.  It owns the order of the tasks,
the passes of a task (the reduction passes, each closed by ``ProgramState.end_pass``, then the
output pass: :func:`run_task`, the one pass loop), the chunks of a pass (:func:`task_chunks`, the
plan's chunk size), the progress accounting, the failure flag that stops every worker, and the
model-wide selections (:func:`model_reductions`, run before any tensor is written).

A back-end supplies kernels and buffers, never a loop: through :class:`ChunkBackend` it says
whether it computes a task, takes one chunk of a pass at a time (it may finish the chunk later)
and waits for what it has in flight when a pass ends.  The CPU back-end
(:class:`tvlang.runtime.CpuBackend`) finishes each chunk before it returns, so the chunks of
one-pass tasks are shared by ``plan.threads`` workers; the GPU back-end
(:class:`tvlang.backends.gpu.GpuBackend`) pipelines its chunks through staging slots and CUDA
streams, and the tasks it has no kernel for go to the CPU back-end, within the same loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from tvlang.backends.cpu import Scratch
from tvlang.backends.interpreter import Kernels, ProgramState
from tvlang.backends.reductions import KthLargest
from tvlang.dtypes import ITEMSIZE
from tvlang.plan.plan import ModelReduction, Plan, TensorTask


class Meter(Protocol):
    """Where the executor counts the bytes it has moved (:class:`tvlang.runtime.Progress`)."""

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


@dataclass
class Execution:
    """What the executor and every back-end of one run share: the plan, the model-wide values
    (filled before any task runs), the progress and the flag that stops every worker."""

    plan: Plan
    progress: Meter | None = None
    model_values: dict[int, float] = field(default_factory=dict)
    failed: threading.Event = field(default_factory=threading.Event)

    def advance(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.advance(nbytes)


@dataclass(frozen=True)
class Pass:
    """One pass over a task's chunks: reduction pass ``q`` (``q < task.passes``) or the output pass."""

    task: TensorTask
    q: int
    state: ProgramState | None  # the task's program run; None in a one-pass task (made per back-end)
    shared: bool = False  # its chunks are work items of their own, done by any worker in any order

    @property
    def output(self) -> bool:
        return self.q == self.task.passes


@dataclass(frozen=True)
class OperandPass:
    """One round of a model-wide selection over one tensor that uses it: each chunk's ``operand``
    (an instruction of the task's program) is added to ``select``."""

    task: TensorTask
    operand: int
    select: KthLargest
    round_: int
    state: ProgramState


class ChunkBackend(Protocol):
    """What a back-end supplies to the executor: kernels and buffers for one chunk at a time.

    The executor calls ``begin``, then one ``*_chunk`` per chunk in order, then ``end``; a chunk may
    finish after its call returns, but every chunk of the pass is finished (reduced, written) when
    ``end`` returns.  A ``parallel`` back-end finishes each chunk within its call, from any thread,
    and its ``begin`` and ``end`` of a one-pass task's output pass do nothing: with several workers
    the executor shares those chunks among them, without calling either.
    """

    parallel: bool

    @property
    def kernels(self) -> Kernels | None:
        """The compiled kernels a task's :class:`ProgramState` asks first (None: eager, or on the device)."""
        ...

    def prepare(self, task: TensorTask) -> bool:
        """Whether this back-end computes ``task`` (else the CPU back-end does, in the same loop)."""
        ...

    def begin(self, p: Pass | OperandPass) -> None:
        """Before the first chunk of a pass: bind its kernel, size its buffers."""
        ...

    def reduce_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        """Feed one chunk to the reductions of pass ``p.q`` (the accumulators of ``p.state``)."""
        ...

    def output_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        """Compute one chunk of every output of ``p.task``, check it for NaN/±inf, write it."""
        ...

    def operand_chunk(self, p: OperandPass, start: int, stop: int, scratch: Scratch) -> None:
        """Add one chunk of the operand to ``p.select``'s histogram."""
        ...

    def end(self, p: Pass | OperandPass) -> None:
        """After the last chunk: every chunk of the pass finished, the first failure re-raised."""
        ...

    def sample(self, p: Pass, positions: np.ndarray[Any, Any], scratch: Scratch) -> None:
        """Before reduction pass ``p.q``: give its selections the operand at ``positions`` (the
        sample that brackets a k-th largest value), where the inputs gather them cheaply."""
        ...

    def selector(self, red: ModelReduction) -> KthLargest:
        """A model-wide k-th largest selection, its histograms where this back-end counts them."""
        ...

    def flush(self) -> None:
        """Wait for everything in flight (the end of a model-wide round, the end of the run)."""
        ...


WHOLE_TASK = -1  # a work item that runs every pass of a task, in one worker


def task_chunks(plan: Plan, task: TensorTask) -> Iterator[tuple[int, int]]:
    """The (start, stop) ranges of ``task``'s chunks: the plan's chunk size (one empty chunk when the
    tensor is empty, so that its outputs still get their header)."""
    n, chunk = task.numel, max(1, task.chunk or plan.chunk)
    if n == 0:
        yield 0, 0
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def read_bytes(plan: Plan, task: TensorTask) -> int:
    """Bytes read per element of ``task`` (one of each input it reads)."""
    return sum(ITEMSIZE[plan.inputs[i].tensors[task.name].dtype] for i in task.reads)


def moved_bytes(plan: Plan, task: TensorTask) -> int:
    """Bytes moved per element of ``task``'s output pass (read and written)."""
    return read_bytes(plan, task) + sum(ITEMSIZE[w.dtype] for w in task.writes)


def run_plan(
    ex: Execution,
    backend: ChunkBackend,
    fallback: ChunkBackend,
    *,
    workers: int = 1,
    model_values: Mapping[int, float] | None = None,
) -> None:
    """Run every task of ``ex.plan`` on ``backend`` (``fallback`` for the tasks it does not
    ``prepare``), in the order :func:`_work` gives; the first exception stops every worker after its
    chunk and is re-raised.

    ``workers`` share the items: a task is one item (its passes run in one worker, in order), but
    with several workers a one-pass task on a ``parallel`` back-end is one item per chunk (a
    ``shared`` pass), and the worker that finishes its last chunk calls ``end``.
    ``model_values``: the model-wide selections, when already made elsewhere (a distributed run
    reduces them over every unit); else they are made first, on ``backend``.
    """
    plan, failed = ex.plan, ex.failed
    scratch = Scratch()
    if model_values is None:
        model_values = model_reductions(ex, backend, scratch)
    ex.model_values.update(model_values)
    items = _work(plan, backend, fallback, share=workers > 1)
    lock = threading.Lock()
    unfinished: dict[int, int] = {}  # a shared task's chunks not yet done, by id of its pass

    def worker(scratch: Scratch) -> None:
        while not failed.is_set():
            with lock:
                item = next(items, None)
            if item is None:
                return
            chosen, p, start, stop, moved = item
            try:
                if start == WHOLE_TASK:
                    run_task(ex, chosen, p.task, scratch)
                else:
                    chosen.output_chunk(p, start, stop, scratch)
            except BaseException:
                failed.set()
                raise
            if start != WHOLE_TASK:
                ex.advance((stop - start) * moved)
                with lock:  # the worker that finishes a shared task's last chunk ends its pass
                    if id(p) not in unfinished:
                        unfinished[id(p)] = sum(1 for _ in task_chunks(plan, p.task))
                    unfinished[id(p)] -= 1
                    last = unfinished[id(p)] == 0
                    if last:
                        del unfinished[id(p)]
                if last:
                    chosen.end(p)

    if workers <= 1:
        worker(scratch)
    else:  # plain threads: concurrent.futures (and the logging it imports) would cost every run ~3 ms
        errors: list[BaseException | None] = [None] * workers

        def guarded(k: int) -> None:
            try:
                worker(Scratch())
            except BaseException as e:  # re-raised below, in the calling thread
                errors[k] = e

        threads = [threading.Thread(target=guarded, args=(k,), name=f"tvlang-{k}") for k in range(workers)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C lands here: stop the workers after their chunk, not at the end
            failed.set()
            for t in threads:
                t.join()
            raise
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
    backend.flush()
    if ex.progress is not None:
        ex.progress.finish()


def _work(
    plan: Plan, backend: ChunkBackend, fallback: ChunkBackend, *, share: bool
) -> Iterator[tuple[ChunkBackend, Pass, int, int, int]]:
    """The work items: (back-end, pass, start, stop, bytes per element); ``share``: the chunks of
    one-pass tasks on a ``parallel`` back-end are items of their own.  Shared among workers, the
    whole tasks go first, largest first (so the last task to finish is a small one, not an
    embedding that leaves the other workers idle), then the shared chunks in plan order; one
    worker takes everything in plan order.  Outputs land at their offsets in any order."""
    whole, shared = [], []
    for task in plan.tasks:
        chosen = backend if backend.prepare(task) else fallback
        if task.passes > 1 or not (share and chosen.parallel):
            whole.append((chosen, Pass(task, task.passes, None), WHOLE_TASK, WHOLE_TASK, 0))
            continue
        p, moved = Pass(task, 1, None, shared=True), moved_bytes(plan, task)
        shared += [(chosen, p, start, stop, moved) for start, stop in task_chunks(plan, task)]
    if share:
        whole.sort(key=lambda item: -item[1].task.numel * item[1].task.passes)
    yield from whole
    yield from shared


def run_task(ex: Execution, backend: ChunkBackend, task: TensorTask, scratch: Scratch) -> None:
    """Every pass of ``task`` on ``backend``, the one pass loop of every back-end: each reduction
    pass (after the sample its selections take, if any) feeds the program's accumulators chunk by
    chunk and closes with ``state.end_pass``, which asks for it again while a selection needs
    another round; then the output pass writes the outputs."""
    plan = ex.plan
    state = ProgramState.of_task(plan, task, ex.model_values, backend.kernels) if task.passes > 1 else None
    read, moved = read_bytes(plan, task), moved_bytes(plan, task)
    for q in range(1, task.passes + 1):
        p = Pass(task, q, state)
        again = False  # a k-th largest value whose sampled bracket missed runs the pass again
        while True:
            positions = (
                None if state is None or p.output else state.sample_positions(q, task.chunk or plan.chunk)
            )
            if positions is not None:
                backend.sample(p, positions, scratch)
            backend.begin(p)
            for start, stop in task_chunks(plan, task):
                if ex.failed.is_set():
                    break
                if p.output:
                    backend.output_chunk(p, start, stop, scratch)
                    ex.advance((stop - start) * moved)
                else:
                    backend.reduce_chunk(p, start, stop, scratch)
                    if not again:  # (the plan counts each pass once)
                        ex.advance((stop - start) * read)
            backend.end(p)
            if ex.failed.is_set():
                return
            if state is None or p.output or state.end_pass(q):
                break
            again = True


SelectT = TypeVar("SelectT", bound=KthLargest)


def select_model_values(
    plan: Plan,
    selector: Callable[[ModelReduction], SelectT],
    feed: Callable[[ModelReduction, SelectT, int], None],
) -> dict[int, float]:
    r"""Model-wide k-th largest values: per selection (made by ``selector``: on the CPU or on the
    device), each round ``feed``\ s it every chunk of every tensor that uses it, then closes the
    round; the last round's result is the value.  (A distributed run feeds each round from its
    units, all selections' rounds side by side.)"""
    values: dict[int, float] = {}
    for red in plan.model_reductions:
        select = selector(red)
        for round_ in range(select.rounds):
            feed(red, select, round_)
            select.end_round()
        values[red.key] = select.result()
    return values


def model_reductions(ex: Execution, backend: ChunkBackend, scratch: Scratch) -> dict[int, float]:
    """The plan's model-wide k-th largest values, before any tensor is written: exact float64 radix
    selections whose every round is one pass over every chunk of every tensor that uses them."""
    return select_model_values(
        ex.plan,
        backend.selector,
        lambda red, select, round_: model_round(ex, backend, red, select, round_, scratch),
    )


def model_round(
    ex: Execution,
    backend: ChunkBackend,
    red: ModelReduction,
    select: KthLargest,
    round_: int,
    scratch: Scratch,
) -> None:
    """One round of ``red``'s selection: the operand of every chunk of every tensor that uses it,
    added to ``select``'s histogram."""
    plan = ex.plan
    for task_index, operand in red.users:
        task = plan.tasks[task_index]
        state = ProgramState.of_task(plan, task, kernels=backend.kernels)
        p = OperandPass(task, operand, select, round_, state)
        read = read_bytes(plan, task)
        backend.begin(p)
        for start, stop in task_chunks(plan, task):
            backend.operand_chunk(p, start, stop, scratch)
            ex.advance((stop - start) * read)
        backend.end(p)
    backend.flush()


__all__ = [
    "ChunkBackend",
    "Execution",
    "Meter",
    "OperandPass",
    "Pass",
    "model_reductions",
    "model_round",
    "run_plan",
    "run_task",
    "select_model_values",
    "task_chunks",
]
