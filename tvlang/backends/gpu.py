"""The GPU backend: every task's fused Triton kernel, with checkpoints streamed through the device.

Same contract as :func:`tvlang.runtime.execute`; the same plan gives the same
outputs (see docs/gpu.md for where bits may differ).  The loop is not here: the
executor (:mod:`tvlang.executor`) drives the tasks, their passes and their
chunks, as it does for the CPU backend; :class:`GpuBackend` supplies the
kernels and the staging buffers for one chunk at a time.  Per task:

- the task's float outputs come from one generated kernel
  (:func:`tvlang.codegen.spec.task_spec`, :mod:`tvlang.codegen.triton`); a task
  no kernel computes (integer copies, float8 outputs, row ranks) runs on the CPU path
  of :mod:`tvlang.runtime`;
- reduction passes run a kernel computing their operands, then reduce on the
  device: block sums in float64 over the blocks of
  :mod:`tvlang.backends.reductions`, counts, and the exact radix selection of
  the k-th largest value (its 65536-bin histograms built on the device);
  model-wide selections likewise, before any tensor is written.

Streaming (CUDA): chunks go through ``SLOTS`` staging slots, each a pinned host
buffer and a device buffer, and a pass's chunks are in flight together until
the executor ends the pass (:meth:`GpuBackend.end`).  Chunk k+1 is copied
host→device on a copy stream while chunk k computes on the compute stream and
chunk k-1 is copied back on a third stream; events order the three, and a
worker thread writes each chunk once its copy back has finished.  Device memory is the slots (about the
plan's memory budget) plus reduction temporaries, never a whole model.
In-memory inputs already on the device are read in place.

Under ``TRITON_INTERPRET=1`` the same back-end runs with ``device="cpu"``: CPU
tensors, one slot, no streams, no pinning, so the whole pipeline is tested
without a GPU.

Non-finite values: each output chunk back on the host gets the CPU backend's
cheap check; a chunk that fails it is recomputed by the CPU path, which raises
or reports exactly as :func:`tvlang.runtime.execute` does.

Outputs merged into tensors on the device (``into=`` a model there) never come
back to the host: each chunk is copied device→device into its target on the
compute stream, and its check (min and max) stays on the device until the task
ends; then the chunks that failed it are redone by the CPU path as above.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from tvlang.backends.cpu import Scratch, all_finite
from tvlang.backends.interpreter import ProgramState, random_key
from tvlang.backends.reductions import DIGIT, BlockSum, Count, KthLargest, block_sums
from tvlang.chunks import Chunk, is_torch, to_torch
from tvlang.codegen import triton as tcg
from tvlang.codegen.spec import ACC, KernelCall, Unsupported, program_spec, task_spec
from tvlang.dtypes import code_of, torch_dtype
from tvlang.errors import TvParamError
from tvlang.executor import Execution, OperandPass, Pass, run_plan
from tvlang.io.endpoints import IntoSink, Sink, Source
from tvlang.plan.plan import (
    SLOTS,
    Copy,
    ModelReduction,
    Plan,
    ProgramOutput,
    TensorTask,
    TensorWrite,
    WeightedSum,
)
from tvlang.plan.tensor_program import TensorProgram
from tvlang.runtime import (
    CpuBackend,
    NonFiniteReport,
    Progress,
    Run,
    check_nonfinite_mode,
    run_chunk,
    write_to_sink,
)

DIRECT_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64})

INSTALL_HELP = (
    'install the GPU extra: pip install "tvlang[gpu]" (Triton; a CUDA build of torch is needed too)'
)


# -- choosing the device ---------------------------------------------------------------------------


def cuda_missing() -> str | None:
    """Why the CUDA backend cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is available" + (
            "" if torch.version.cuda else f" (this torch, {torch.__version__}, is a CPU-only build)"
        )
    return tcg.triton_missing()


def resolve_gpu(requested: str) -> str:
    """For ``cuda`` or ``auto`` (:func:`tvlang.backends.device.resolve_device` decides the rest):
    ``cpu`` (the CPU backend), ``cuda`` (this backend on the GPU) or ``interpret`` (this backend's
    kernels in Triton's interpreter on CPU tensors: ``cuda`` requested with ``TRITON_INTERPRET=1``)."""
    if tcg.interpreting():
        if requested == "cuda" and tcg.triton_missing() is None:
            return "interpret"
        return "cpu"
    reason = cuda_missing()
    if reason is None:
        return "cuda"
    if requested == "auto":
        return "cpu"
    raise TvParamError(
        f"--device cuda: {reason}",
        notes=(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}",),
        help=f"{INSTALL_HELP}; or run on the CPU with --device cpu (or auto)",
        code="E402",
    )


class _HostSource:
    """A source whose chunks are always CPU tensors (for the CPU paths, when inputs are on the GPU)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def read(self, name: str, start: int, stop: int) -> Chunk:
        view = self.source.read(name, start, stop)
        return view.cpu() if is_torch(view) and view.device.type != "cpu" else view

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        self.source.release(name, start, stop, before=before, after=after)

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> Chunk | None:
        found = self.source.gather(name, positions, run)
        return found.cpu() if found is not None and is_torch(found) and found.device.type != "cpu" else found

    def close(self) -> None:
        self.source.close()


# -- reductions on the device ----------------------------------------------------------------------


class DeviceBlockSum(BlockSum):
    """:class:`~tvlang.backends.reductions.BlockSum` on device chunks: float64 sums of the same blocks,
    kept on the device until the result (then added in block order on the host, as the CPU does)."""

    def add(self, values: torch.Tensor, start: int) -> None:
        self._blocks[start] = block_sums(values)  # on a GPU the scan adds in another order

    def result(self) -> float:
        self._blocks = {s: b.cpu() for s, b in self._blocks.items()}
        return super().result()


class DeviceCount(Count):
    """Non-zero values counted on the device; one transfer at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.partial: list[torch.Tensor] = []

    def add(self, values: Chunk, start: int) -> None:
        self.partial.append(torch.count_nonzero(to_torch(values)).reshape(1))

    def result(self) -> float:
        return float(self.total + int(torch.cat(self.partial).sum())) if self.partial else float(self.total)


def device_order_keys(values: torch.Tensor) -> torch.Tensor:
    """:func:`tvlang.backends.reductions.order_keys` on the device (new tensors, no CPU scratch)."""
    if values.dtype == torch.float64:
        keys = values.view(torch.int64).clone()
        negative = keys < 0
        sign, rest = -(1 << 63), (1 << 63) - 1
    else:
        keys = values.to(torch.float32).view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)
        negative = keys >= 0x80000000
        sign, rest = 0x80000000, 0x7FFFFFFF
    keys.bitwise_xor_(sign)
    return keys.bitwise_xor_(negative.to(torch.int64).mul_(rest))


class DeviceKth(KthLargest):
    """The exact radix selection of :class:`~tvlang.backends.reductions.KthLargest`, its histograms
    counted on the device; each round's 65536 bins come to the host once."""

    def __init__(self, k: float, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(k, numel, dtype)
        self.device_hist = torch.zeros(DIGIT + 1, dtype=torch.int64, device=device)

    def add(self, values: Chunk, start: int, round_: int) -> None:
        if self.fixed is not None:
            return
        assert round_ == self.round, "rounds run in order"
        keys = device_order_keys(to_torch(values))
        shift = self.bits - 16 * (round_ + 1)
        digits = torch.bitwise_right_shift(keys, shift).bitwise_and_(0xFFFF)
        if round_:
            higher = torch.bitwise_right_shift(keys, shift + 16).bitwise_and_((1 << (16 * round_)) - 1)
            digits.masked_fill_(higher != self.prefix, DIGIT)
        self.device_hist += torch.bincount(digits, minlength=DIGIT + 1)

    def end_round(self) -> None:
        if self.fixed is None:
            self.hist[:] = self.device_hist.cpu().numpy()
            self.device_hist.zero_()
        super().end_round()


# -- staging ---------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One chunk in flight: a host and a device arena, the chunk's events, its pending host work."""

    host: torch.Tensor  # uint8; pinned on CUDA
    device: torch.Tensor  # uint8; the host arena itself on the CPU
    copied_in: Any = None  # CUDA events
    computed: Any = None
    copied_back: Any = None
    pending: Future[None] | None = None

    def views(
        self, sizes: Sequence[tuple[int, torch.dtype]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Typed views of both arenas, one per (elements, dtype), each 512-byte aligned."""
        host, dev, offset = [], [], 0
        for n, dtype in sizes:
            nbytes = n * dtype.itemsize
            host.append(self.host[offset : offset + nbytes].view(dtype))
            dev.append(self.device[offset : offset + nbytes].view(dtype))
            offset += -(-nbytes // 512) * 512
        return host, dev


def _arena_bytes(sizes: Sequence[tuple[int, torch.dtype]]) -> int:
    return sum(-(-n * d.itemsize // 512) * 512 for n, d in sizes)


@dataclass(frozen=True)
class _Launch:
    """One streamed pass over a task's chunks: which inputs, which kernel, what happens to its outputs."""

    task: TensorTask
    bound: KernelCall
    params: tuple[float, ...]
    keys: tuple[int, ...]
    on_device: Callable[[int, list[torch.Tensor]], None] | None  # (start, outputs) on the compute stream
    finish: Callable[[int, int, list[torch.Tensor]], None] | None  # host outputs, once back


@dataclass(frozen=True)
class _Open:
    """The pass being streamed: its launch and the dtypes of a slot's views (inputs, then outputs)."""

    launch: _Launch
    dtypes: list[torch.dtype]
    inputs: int  # how many of ``dtypes`` are the kernel's inputs


class GpuBackend:
    """The GPU back-end of the executor (:mod:`tvlang.executor`): each chunk of a pass staged into
    the next slot, its kernel launched and its outputs finished once back, the chunks of a pass in
    flight together; :meth:`end` waits for them."""

    parallel = False  # one worker: the slots, streams and events are this back-end's alone
    kernels = None  # programs' other chunk work runs on the device or, handed back, eagerly

    def __init__(
        self,
        ex: Execution,
        sources: Sequence[Source],
        sinks: Sequence[Sink],
        nonfinite: str,
        device: torch.device,
    ) -> None:
        self.ex = ex
        self.plan = ex.plan
        self.sources = sources
        self.host_sources: list[Source] = [_HostSource(s) for s in sources]
        self.sinks = sinks
        self.nonfinite = nonfinite
        self.device = device
        self.cuda = device.type == "cuda"
        self.report = NonFiniteReport(ex.plan)
        self.failed = ex.failed
        # the CPU path, for what no kernel computes and for chunks whose NaN/±inf need explaining
        self.cpu = Run(ex.plan, self.host_sources, sinks, nonfinite, self.report, ex.model_values, None)
        self.bound: dict[int, KernelCall] = {}  # the output kernel of each task prepare() took, by id
        self.current: _Open | None = None  # the pass being streamed (None: an operand on the host)
        self.after: Callable[[], None] | None = None  # what end() does once the pass's chunks are done
        self.local = threading.local()
        self.slots: list[_Slot] = []
        self.slot_bytes = 0
        self.count = 0  # chunks issued, for the slot rotation
        if self.cuda:
            self.copy_in = _cuda_stream(device)
            self.compute = _cuda_stream(device)
            self.copy_back = _cuda_stream(device)
            self.compute.wait_stream(torch.cuda.current_stream(device))  # inputs made on the default stream
            self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(2, thread_name_prefix="tvlang-gpu")
        else:
            self.pool = None

    # -- sizing

    def scratch(self) -> Scratch:
        s: Scratch | None = getattr(self.local, "scratch", None)
        if s is None:
            s = self.local.scratch = Scratch()
        return s

    def slots_for(self, nbytes: int) -> list[_Slot]:
        """The staging slots, (re)allocated when a chunk needs more than they hold."""
        if nbytes > self.slot_bytes:
            self.drain()
            self.slots = []
            count = SLOTS if self.cuda else 1
            for _ in range(count):
                if self.cuda:
                    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                    dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                else:
                    host = dev = torch.empty(nbytes, dtype=torch.uint8)
                self.slots.append(_Slot(host, dev))
            self.slot_bytes = nbytes
        return self.slots

    def drain(self) -> None:
        """Wait for every chunk in flight; re-raise the first failure."""
        first: BaseException | None = None
        for slot in self.slots:
            if slot.pending is not None:
                try:
                    slot.pending.result()
                except BaseException as e:
                    first = first or e
                slot.pending = None
        if first is not None:
            raise first

    # -- the executor's protocol

    def prepare(self, task: TensorTask) -> bool:
        """Whether a generated kernel computes ``task``: float outputs and no copies among its writes,
        not one of the plan's eager tasks (:func:`tvlang.codegen.spec.eager_tasks`), and a spec the
        generator supports.  The executor hands any other task to the CPU back-end."""
        writes = [w for w in task.writes if isinstance(w.kernel, WeightedSum | ProgramOutput)]
        if (
            not writes
            or not task.numel
            or task.name in self.plan.eager
            or any(isinstance(w.kernel, Copy) for w in task.writes)
        ):
            return False
        try:
            self.bound[id(task)] = task_spec(task, self.plan.input_dtypes(task))
        except Unsupported:
            return False
        return True

    def begin(self, p: Pass | OperandPass) -> None:
        if isinstance(p, OperandPass):
            self.begin_operand(p)
        elif p.output:
            self.begin_output(p)
        else:
            self.begin_reduction(p)

    def reduce_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        self.submit(start, stop)

    def output_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        self.submit(start, stop)

    def operand_chunk(self, p: OperandPass, start: int, stop: int, scratch: Scratch) -> None:
        if self.current is not None:
            self.submit(start, stop)
            return
        # no kernel computes this operand: the CPU path's value, added on the device in stream order
        task = p.task
        views = {j: self.host_sources[j].read(task.name, start, stop) for j in task.reads}
        value = p.state.value(p.operand, views, start, stop, scratch)
        with torch.cuda.stream(self.compute) if self.cuda else _nothing():  # in order
            p.select.add(value.to(self.device, torch.float64), start, p.round_)
        for j in task.reads:
            self.host_sources[j].release(task.name, start, stop)

    def end(self, p: Pass | OperandPass) -> None:
        """Wait for every chunk of the pass (re-raising the first failure), then do what the pass
        does after its last chunk."""
        self.drain()
        self.current = None
        after, self.after = self.after, None
        if after is not None:
            after()

    def selector(self, red: ModelReduction) -> DeviceKth:
        """A model-wide selection whose histograms are counted on the device."""
        return DeviceKth(red.k, red.numel, torch.float64, self.device)

    def flush(self) -> None:
        self.sync()

    # -- one pass

    def open(self, p: _Launch) -> None:
        """Start streaming a pass: the slots sized for one chunk of its inputs and outputs."""
        task, spec = p.task, p.bound.spec
        dtypes = [torch_dtype(d) for d in spec.inputs]
        out_dtypes = [torch_dtype(spec.acc if d == ACC else d) for _, d in spec.outputs]
        chunk = max(1, task.chunk or self.plan.chunk)  # the plan's (tvlang.plan.planner.gpu_chunk)
        sizes = [(min(chunk, task.numel), d) for d in dtypes + out_dtypes]
        self.slots_for(_arena_bytes(sizes))
        self.current = _Open(p, dtypes + out_dtypes, len(dtypes))

    def submit(self, start: int, stop: int) -> None:
        """One chunk of the open pass: staged into the next slot, launched, and finished once back;
        on CUDA the copies and the compute of neighbouring chunks overlap."""
        o = self.current
        assert o is not None
        p, slots, k = o.launch, self.slots, o.inputs
        slot = slots[self.count % len(slots)]
        self.count += 1
        if slot.pending is not None:
            pending, slot.pending = slot.pending, None
            pending.result()  # its outputs are written: the host buffer is free again
        if slot.copied_in is not None:
            slot.copied_in.synchronize()  # its inputs are on the device: the host buffer is free again
        n = stop - start
        host, dev = slot.views([(n, d) for d in o.dtypes])
        inputs = self.stage(p.task, p.bound.inputs, slot, start, stop, host[:k], dev[:k])
        self.launch(p, slot, start, inputs, host[k:], dev[k:])
        if p.finish is None:
            return
        finish = p.finish
        if self.pool is None:
            finish(start, stop, host[k:])
        else:
            slot.pending = self.pool.submit(self.complete, slot, finish, start, stop, host[k:])

    def stage(
        self,
        task: TensorTask,
        order: Sequence[int],
        slot: _Slot,
        start: int,
        stop: int,
        host: list[torch.Tensor],
        dev: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """The kernel's input chunks: a view of an input already on the device, else the chunk copied
        into the slot's host buffer (and, on CUDA, queued for the device on the copy stream once the
        slot's previous kernel has read its device buffer)."""
        inputs = []
        uploads = []
        for i, h, d in zip(order, host, dev, strict=True):
            view = self.sources[i].read(task.name, start, stop)
            if self.cuda and is_torch(view) and view.device == self.device and view.is_contiguous():
                inputs.append(view)
            else:
                h.copy_(to_torch(view, code_of(h.dtype)))
                inputs.append(d)
                uploads.append((h, d))
            self.sources[i].release(task.name, start, stop)
        if self.cuda:
            with torch.cuda.stream(self.copy_in):
                if slot.computed is not None:
                    self.copy_in.wait_event(slot.computed)
                for h, d in uploads:
                    d.copy_(h, non_blocking=True)
        return inputs

    def launch(
        self,
        p: _Launch,
        slot: _Slot,
        start: int,
        inputs: list[torch.Tensor],
        host_out: list[torch.Tensor],
        dev_out: list[torch.Tensor],
    ) -> None:
        assert p.bound is not None
        if not self.cuda:
            tcg.run_spec(p.bound, inputs, dev_out, p.params, p.keys, start)
            if p.on_device is not None:
                p.on_device(start, dev_out)
            return
        slot.copied_in = _cuda_event()
        slot.copied_in.record(self.copy_in)
        self.compute.wait_event(slot.copied_in)
        with torch.cuda.stream(self.compute):
            tcg.run_spec(p.bound, inputs, dev_out, p.params, p.keys, start)
            if p.on_device is not None:
                p.on_device(start, dev_out)
        slot.computed = _cuda_event()
        slot.computed.record(self.compute)
        if p.finish is not None:
            self.copy_back.wait_event(slot.computed)
            with torch.cuda.stream(self.copy_back):
                for h, d in zip(host_out, dev_out, strict=True):
                    h.copy_(d, non_blocking=True)
            slot.copied_back = _cuda_event()
            slot.copied_back.record(self.copy_back)

    def complete(
        self,
        slot: _Slot,
        finish: Callable[[int, int, list[torch.Tensor]], None],
        start: int,
        stop: int,
        host_out: list[torch.Tensor],
    ) -> None:
        if slot.copied_back is not None:
            slot.copied_back.synchronize()
        try:
            finish(start, stop, host_out)
        except BaseException:
            self.failed.set()
            raise

    def sync(self) -> None:
        if self.cuda:
            self.compute.synchronize()

    # -- the passes of a task

    def begin_reduction(self, p: Pass) -> None:
        """Data pass ``q`` of a task with reductions: its operands by a kernel, reduced on the device
        (the executor then closes the pass: ``state.end_pass``, and runs it again while a k-th
        largest value needs another radix round: then only for those)."""
        task, state, q = p.task, p.state, p.q
        program = task.program
        assert program is not None and state is not None
        for i in program.reductions_in(q):
            self.device_reducer(state, i)
        work = state.running(q)
        targets = _pass_targets(program, work)
        bound = program_spec(program, targets, self.plan.input_dtypes(task))  # supported: task_spec was
        params = tuple(state.scalars[i] for i in bound.params)
        keys = tuple(random_key(seed, stream, task.name) for seed, stream in bound.keys)

        def on_device(start: int, outs: list[torch.Tensor]) -> None:
            state.reduce(work, dict(zip(targets, outs, strict=True)), start)

        self.open(_Launch(task, bound, params, keys, on_device, None))
        self.after = self.sync

    def begin_output(self, p: Pass) -> None:
        """The element-wise pass: the task's kernel, its outputs written from the host or, merged
        into tensors on this device, copied there."""
        task = p.task
        bound = self.bound.pop(id(task))
        state = p.state
        if state is None and task.program is not None:
            state = ProgramState.of_task(self.plan, task, self.ex.model_values)
        params = tuple(state.scalars[i] for i in bound.params) if state is not None else ()
        keys = tuple(random_key(seed, stream, task.name) for seed, stream in bound.keys)
        writes = [w for w in task.writes if isinstance(w.kernel, WeightedSum | ProgramOutput)]
        launch = _Launch(task, bound, params, keys, None, None)
        targets = self.device_targets(task, writes)
        if targets is not None:
            self.stream_into(launch, targets, state)
            return

        def finish(start: int, stop: int, outs: list[torch.Tensor]) -> None:
            self.write_chunk(task, writes, state, start, stop, outs)

        self.open(replace(launch, finish=finish))

    def device_targets(self, task: TensorTask, writes: Sequence[TensorWrite]) -> list[torch.Tensor] | None:
        """The flat target of each write when every one is a float tensor on this device that the
        output is merged into (so its chunks can stay there), else None."""
        found = []
        for w in writes:
            sink = self.sinks[w.output]
            if not isinstance(sink, IntoSink):
                return None
            flat = sink.target(task.name)
            if (
                flat.device != self.device
                or flat.dtype != torch_dtype(w.dtype)
                or flat.dtype not in DIRECT_DTYPES
            ):
                return None
            found.append(flat)
        return found

    def stream_into(self, p: _Launch, targets: list[torch.Tensor], state: ProgramState | None) -> None:
        """The element-wise pass of a task merged into tensors on the device: each chunk's outputs
        copied into their targets on the compute stream, with a finiteness flag per chunk that the
        host reads once, after the last chunk; chunks that fail are redone on the CPU path, which
        raises, reports or writes exactly as the CPU backend does."""
        check = self.nonfinite != "propagate"
        flags: list[tuple[int, int, torch.Tensor]] = []

        def on_device(start: int, outs: list[torch.Tensor]) -> None:
            stop = start + (outs[0].numel() if outs else 0)
            for target, out in zip(targets, outs, strict=True):
                target[start:stop].copy_(out)
            if check and stop > start:
                flags.append((start, stop, torch.stack([_device_finite(o) for o in outs]).all()))

        def after() -> None:
            self.sync()
            if not flags:
                return
            finite = torch.stack([f for _, _, f in flags]).cpu().tolist()
            for (start, stop, _), ok in zip(flags, finite, strict=True):
                if not ok:
                    run_chunk(self.cpu, p.task, start, stop, self.scratch(), state)

        self.open(replace(p, on_device=on_device))
        self.after = after

    def write_chunk(
        self,
        task: TensorTask,
        writes: Sequence[TensorWrite],
        state: ProgramState | None,
        start: int,
        stop: int,
        outs: list[torch.Tensor],
    ) -> None:
        """Write one chunk's outputs, or, if one is not finite, redo the chunk on the CPU path so that
        the error or the report is the CPU backend's."""
        if self.nonfinite != "propagate" and not all(all_finite(o, self.scratch()) for o in outs):
            run_chunk(self.cpu, task, start, stop, self.scratch(), state)
            return
        for write, out in zip(writes, outs, strict=True):
            write_to_sink(self.sinks[write.output], task.name, start, out)

    def sample(self, p: Pass, positions: np.ndarray[Any, Any], scratch: Scratch) -> None:
        """Nothing: the device's k-th largest values are radix selections, which take no sample."""
        return None

    def device_reducer(self, state: ProgramState, i: int) -> None:
        """Swap the CPU accumulator the program state made for reduction ``i`` for a device one."""
        red = state.reducers[i]
        if isinstance(red, DeviceKth | DeviceBlockSum | DeviceCount):
            return
        ins = state.program.instrs[i]
        if ins.attr == "kth":
            state.reducers[i] = DeviceKth(
                state.scalars[ins.args[1]], state.numel, state.acc_dtype, self.device
            )
        elif ins.attr == "count":
            state.reducers[i] = DeviceCount()
        else:
            state.reducers[i] = DeviceBlockSum()

    def begin_operand(self, p: OperandPass) -> None:
        """One round of a model-wide selection over one tensor that uses it: its operand from a
        generated kernel, added on the device, or, where none computes it, from the CPU path
        (:meth:`operand_chunk`)."""
        task = p.task
        assert task.program is not None
        try:
            bound = program_spec(task.program, (p.operand,), self.plan.input_dtypes(task))
        except Unsupported:
            return
        params = tuple(p.state.scalars[i] for i in bound.params)
        keys = tuple(random_key(seed, stream, task.name) for seed, stream in bound.keys)
        select, round_ = p.select, p.round_

        def on_device(start: int, outs: list[torch.Tensor]) -> None:
            select.add(outs[0].to(torch.float64), start, round_)

        self.open(_Launch(task, bound, params, keys, on_device, None))

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


_Executor = GpuBackend  # its former name (tests/triton_checks.py counts its write_chunk calls)


def kernel_sources(plan: Plan) -> list[tuple[str, str]]:
    """(what it computes and for which tensors, source) of each distinct generated kernel the GPU
    backend would run for ``plan`` (``tvlang plan --triton``)."""
    found: dict[str, tuple[str, KernelCall, list[str]]] = {}

    def add(bound: KernelCall, role: str, tensor: str) -> None:
        found.setdefault(bound.spec.structure_key, (role, bound, []))[2].append(tensor)

    for red in plan.model_reductions:
        for task_index, operand in red.users:
            task = plan.tasks[task_index]
            assert task.program is not None
            dtypes = plan.input_dtypes(task)
            with contextlib.suppress(Unsupported):  # then it runs on the CPU path
                add(
                    program_spec(task.program, (operand,), dtypes),
                    f"model_kth#{red.key}: its operand",
                    task.name,
                )
    for task in plan.tasks:
        dtypes = plan.input_dtypes(task)
        writes = [w for w in task.writes if isinstance(w.kernel, WeightedSum | ProgramOutput)]
        if not writes or not task.numel or any(isinstance(w.kernel, Copy) for w in task.writes):
            continue
        try:
            bound = task_spec(task, dtypes)
        except Unsupported:
            continue
        for q in range(1, task.passes):
            assert task.program is not None
            targets = _pass_targets(task.program, task.program.reductions_in(q))
            add(program_spec(task.program, targets, dtypes), f"pass {q}: reduction operands", task.name)
        add(bound, "element-wise pass: the outputs", task.name)
    out = []
    for role, bound, tensors in found.values():
        names = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
        out.append((f"{role}; {len(tensors)} tensor(s): {names}", tcg.triton_source(bound.spec)))
    return out


def _pass_targets(program: TensorProgram, work: Sequence[int]) -> tuple[int, ...]:
    """The tensor operands of the reductions ``work``, each once."""
    return tuple(
        dict.fromkeys(a for i in work for a in program.instrs[i].args[:2] if program.instrs[a].tensor)
    )


def _device_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether a float chunk is free of NaN and ±inf, as a bool on its device (no synchronisation):
    NaN propagates to the min and the max, and an infinity is one of them."""
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _cuda_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def _cuda_event() -> Any:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def execute_gpu(
    plan: Plan,
    sources: Sequence[Source],
    sinks: Sequence[Sink],
    *,
    progress: Progress | None = None,
    nonfinite: str = "error",
    device: str = "cuda",
) -> NonFiniteReport:
    """Run every task of ``plan`` through generated Triton kernels on ``device`` (``"cuda"``, or
    ``"cpu"`` under ``TRITON_INTERPRET=1``).  The contract of :func:`tvlang.runtime.execute`."""
    check_nonfinite_mode(nonfinite)
    dev = torch.device(device)
    if dev.type == "cuda":
        reason = cuda_missing()
        if reason is not None:
            raise TvParamError(f"the GPU backend cannot run: {reason}", help=INSTALL_HELP, code="E402")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif not tcg.interpreting():
        raise TvParamError(
            "the GPU backend runs on CPU tensors only in Triton's interpreter",
            help="set TRITON_INTERPRET=1 before triton is imported, or use the CPU backend (device cpu)",
            code="E402",
        )
    ex = Execution(plan, progress)
    backend = GpuBackend(ex, sources, sinks, nonfinite, dev)
    previous_threads = torch.get_num_threads()
    if dev.type == "cpu":  # as the CPU backend: small host ops run faster on one intra-op thread
        torch.set_num_threads(1)
    try:
        with torch.cuda.device(dev) if dev.type == "cuda" else _nothing():
            run_plan(ex, backend, CpuBackend(backend.cpu))
    finally:
        torch.set_num_threads(previous_threads)
        backend.close()
    return backend.report


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
