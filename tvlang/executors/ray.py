"""The same plan on a Ray cluster, bit for bit.

The driver plans from headers as for a local run, creates every output file (header written,
size fixed) under the output's temporary name, then cuts the plan into *units*: groups of
tensors that fill whole output shards (every shard of every output belongs to exactly one
unit).  A unit is plain data: the tasks of its tensors (kernel specs, parameters), where
each input tensor lives (paths and byte ranges from the driver's headers) and where each
output tensor goes (temporary path, byte offset).  A Ray task per unit re-reads the headers
of the files it touches (and refuses to run if they differ from the driver's), opens only
those, runs :func:`tvlang.runtime.execute` on its tasks (the same chunked kernels, the same
memory budget, one thread) and ``pwrite``\\ s its shards in place.

Model-wide statistics (``ties(..., scope="model")``) are a map-reduce: each round of the
radix selection, every unit that uses one returns its histogram; the driver adds them in
unit order (integer counts: the sum is exact in any order anyway) and sends the next
prefix.  Only then do the element-wise units run, with the values as parameters.

The driver renames the output into place (the caller's commit) only after every unit has
reported every element of its tensors written and every shard file has its planned size.
A worker that dies is retried by Ray (``RETRIES`` times; rewriting a shard is idempotent);
a unit that fails for good raises E504 naming it and its tensors, and the caller's abort
deletes the temporary output.  Ctrl-C cancels the tasks in flight.

``ray`` is imported only when a run uses this executor (``pip install "tvlang[ray]"``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch

from tvlang.backends.compiled import prepare_kernels
from tvlang.backends.cpu import Scratch
from tvlang.backends.reductions import KthLargest
from tvlang.chunks import Chunk, numpy_dtype, storage
from tvlang.dtypes import ITEMSIZE
from tvlang.errors import TvError, TvInputError, TvOutputError, TvParamError
from tvlang.io.checkpoint import Checkpoint, CheckpointWriter
from tvlang.io.endpoints import CheckpointSource, Sink, Source, all_or_none
from tvlang.io.lora import LoraAdapter, LoraSource
from tvlang.io.safetensors import SafetensorsWriter, TensorInfo, read_header
from tvlang.plan.plan import Plan, TensorTask
from tvlang.runtime import NonFiniteReport, Progress, execute, model_reduction_round

_T = TypeVar("_T")
RETRIES = 3  # times Ray reruns a unit whose worker process died
# A test hook, unset in normal use: "TENSOR" makes every attempt of the unit writing TENSOR exit
# (os._exit) right after writing a chunk of it; "TENSOR@FILE" only the attempt that creates FILE;
# "TENSOR~SECONDS" stalls there that long instead (so that a test can interrupt the driver).
FAULT_ENV = "TVLANG_TEST_FAULT"
_SHARED = "inputs and outputs must be on storage every node sees at the same path (a shared filesystem)"


@dataclass(frozen=True)
class InputFiles:
    """Where a unit reads one plan input: ``kind`` is ``checkpoint`` (``tensors``: each tensor's
    file and byte range, from the driver's headers), ``lora`` (an adapter directory) or ``none``."""

    kind: str
    location: str
    tensors: Mapping[str, TensorInfo]


@dataclass(frozen=True)
class ShardTarget:
    """One output file a unit fills: created by the driver (header written, size fixed) at ``path``."""

    output: int  # index into the plan's outputs
    path: str  # the temporary file
    final: str  # where it will be once committed (for messages)
    size: int  # bytes
    slots: Mapping[str, tuple[int, int, str]]  # tensor -> (byte offset, elements, dtype code)


@dataclass(frozen=True)
class Unit:
    """Whole output shards' worth of tensors, as plain data: its tasks (a plan holding only them;
    inputs and outputs keep their indices), where their inputs are, where their outputs go."""

    index: int
    plan: Plan
    inputs: tuple[InputFiles, ...]
    shards: tuple[ShardTarget, ...]
    nbytes: int  # read and written by its tasks (every pass)
    reduction_bytes: int  # read per round of the model-wide selections

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.plan.tasks)

    def describe(self) -> str:
        names = self.tensors
        shown = ", ".join(f"`{n}`" for n in names[:4]) + (
            f" and {len(names) - 4} more" if len(names) > 4 else ""
        )
        return f"unit {self.index} ({len(names)} tensor{'s' if len(names) != 1 else ''}: {shown})"


@dataclass(frozen=True)
class UnitResult:
    index: int
    written: Mapping[tuple[int, str], int]  # (output, tensor) -> elements written
    inputs: Mapping[tuple[str, int], list[int]]  # the unit's NonFiniteReport, as plain data
    overflow: Mapping[tuple[str, int], list[int]]
    program: Mapping[tuple[str, int], int]
    seconds: float
    worker: str  # host:pid
    peak_rss: int  # bytes: the worker process's peak resident memory so far


def cut_units(
    plan: Plan, sources: Sequence[Source], writers: Sequence[CheckpointWriter]
) -> tuple[list[Unit], dict[str, SafetensorsWriter]]:
    """The plan's units, in plan order, and the driver's writer of each shard's temporary path.

    Tensors that share a shard in any output share a unit, so a sweep whose outputs have the
    same layout gets one unit per shard, each writing that shard of every output."""
    parent = {t.name: t.name for t in plan.tasks}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    files: list[tuple[int, SafetensorsWriter, str]] = []  # (output, writer, final path)
    for output, writer in enumerate(writers):
        for f in writer.files:
            names = list(f.layout())
            if not names:
                continue
            final = os.path.join(writer.path, os.path.basename(f.path)) if writer.is_dir else writer.path
            files.append((output, f, final))
            for other in names[1:]:
                parent[find(other)] = find(names[0])
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(plan.tasks):
        groups.setdefault(find(task.name), []).append(i)
    shard_of: dict[str, list[tuple[int, SafetensorsWriter, str]]] = {}
    for output, f, final in files:
        shard_of.setdefault(find(next(iter(f.layout()))), []).append((output, f, final))

    units = []
    for index, (root, chosen) in enumerate(groups.items()):
        tasks = tuple(plan.tasks[i] for i in chosen)
        chosen_names = {t.name for t in tasks}
        new_index = {old: new for new, old in enumerate(chosen)}
        reductions = tuple(
            replace(r, users=tuple((new_index[t], op) for t, op in r.users if t in new_index))
            for r in plan.model_reductions
        )
        sub = replace(
            plan,
            inputs=tuple(
                replace(inp, tensors={n: m for n, m in inp.tensors.items() if n in chosen_names})
                for inp in plan.inputs
            ),
            outputs=tuple(
                replace(o, tensors=tuple(t for t in o.tensors if t[0] in chosen_names)) for o in plan.outputs
            ),
            tasks=tasks,
            model_reductions=reductions,
            threads=1,
        )
        inputs = tuple(_input_files(i, sources[i], tasks) for i in range(len(plan.inputs)))
        shards = tuple(
            ShardTarget(output, f.temp_path, final, f.size, f.layout())
            for output, f, final in shard_of.get(root, [])
        )
        read = {t.name: _read_bytes(plan, t) for t in tasks}
        nbytes = sum(
            read[t.name] * t.passes + sum(ITEMSIZE[w.dtype] for w in t.writes) * t.numel for t in tasks
        )
        users = {i for r in reductions for i, _ in r.users}
        units.append(Unit(index, sub, inputs, shards, nbytes, sum(read[tasks[i].name] for i in users)))
    by_path = {f.temp_path: f for _, f, _ in files}
    return units, by_path


def _read_bytes(plan: Plan, task: TensorTask) -> int:
    return sum(ITEMSIZE[plan.inputs[i].tensors[task.name].dtype] for i in task.reads) * task.numel


def _input_files(slot: int, source: Source, tasks: Sequence[TensorTask]) -> InputFiles:
    names = [t.name for t in tasks if slot in t.reads]
    if not names:
        return InputFiles("none", "", {})
    if isinstance(source, CheckpointSource):
        return InputFiles("checkpoint", "", {n: source.tensors[n] for n in names})
    assert isinstance(source, LoraSource)
    return InputFiles("lora", source.adapter.path, {})


class RayExecutor:
    """Runs a plan's units as Ray tasks (see the module docstring).  ``address``: a cluster to join
    (``auto``: the one running here); ``None``: the cluster this process already joined, else the
    one ``RAY_ADDRESS`` names, else a new local one for the run."""

    def __init__(self, address: str | None = None, retries: int | None = None) -> None:
        self.address = address
        self.retries = RETRIES if retries is None else retries

    def execute(
        self,
        plan: Plan,
        sources: Sequence[Source],
        sinks: Sequence[Sink],
        *,
        progress: Progress | None = None,
        nonfinite: str = "error",
    ) -> NonFiniteReport:
        writers = _file_writers(plan, sources, sinks)
        units, by_path = cut_units(plan, sources, writers)
        report = NonFiniteReport(plan)
        fault = os.environ.get(FAULT_ENV) or None
        label = progress.label if progress is not None else ""
        with _cluster(self.address) as ray:
            options: dict[str, Any] = {"max_retries": self.retries, "retry_exceptions": False, "num_cpus": 1}
            refs = {u.index: ray.put(u) for u in units}
            values = self._model_values(ray, ray.remote(**options)(unit_histograms), units, refs, progress)
            run = ray.remote(**options)(run_unit)
            order = sorted(units, key=lambda u: -u.nbytes)  # largest first: the tail is short
            pending = {run.remote(refs[u.index], values, nonfinite, fault): u for u in order}
            results = _gather(ray, pending, progress, f"{label} (ray)" if label else "", self.retries)
        _check_complete(units, results, by_path)
        for result in results.values():
            for key, (nan, inf) in result.inputs.items():
                counts = report.inputs.setdefault(key, [0, 0])
                counts[0] += nan
                counts[1] += inf
            for key, (rounding, accumulating) in result.overflow.items():
                counts = report.overflow.setdefault(key, [0, 0])
                counts[0] += rounding
                counts[1] += accumulating
            for key, count in result.program.items():
                report.program[key] = report.program.get(key, 0) + count
        if progress is not None:
            progress.finish()
            if progress.stream is not None:
                workers = {r.worker for r in results.values()}
                peak = max((r.peak_rss for r in results.values()), default=0)
                took = [r.seconds for r in results.values()] or [0.0]
                progress.stream.write(
                    f"ray: {len(units)} unit{'s' if len(units) != 1 else ''} on {len(workers)} worker "
                    f"process{'es' if len(workers) != 1 else ''} ({min(took):.1f}–{max(took):.1f} s each), "
                    f"peak resident memory per worker {peak / 2**20:.0f} MiB\n"
                )
        return report

    def _model_values(
        self, ray: Any, remote: Any, units: Sequence[Unit], refs: Mapping[int, Any], progress: Progress | None
    ) -> dict[int, float]:
        """Every model-wide k-th largest value, one distributed round at a time."""
        if not units or not units[0].plan.model_reductions:
            return {}
        reductions = units[0].plan.model_reductions  # the same keys, k and sizes in every unit
        selects = {r.key: KthLargest(r.k, r.numel, "F64") for r in reductions}
        for round_ in range(max(s.rounds for s in selects.values())):
            states = {k: (s.prefix, s.remaining) for k, s in selects.items() if s.fixed is None}
            if not states:
                break
            users = [u for u in units if any(r.users and r.key in states for r in u.plan.model_reductions)]
            pending = {remote.remote(refs[u.index], round_, states): u for u in users}
            hists = _gather(ray, pending, None, "", self.retries)
            for u in users:  # a fixed order: unit order
                if progress is not None:
                    progress.advance(u.reduction_bytes)
                for key, hist in hists[u.index].items():
                    selects[key].hist += np.array(hist)
            for key in states:
                selects[key].end_round()
        return {k: s.result() for k, s in selects.items()}


def _file_writers(plan: Plan, sources: Sequence[Source], sinks: Sequence[Sink]) -> list[CheckpointWriter]:
    for i, source in enumerate(sources):
        if not isinstance(source, (CheckpointSource, LoraSource)):
            raise TvParamError(
                f"the ray executor reads checkpoints from files; input `{plan.inputs[i].ref.label}` is in memory",
                help="bind a path that every node of the cluster sees, or use the local executor",
                code="E402",
            )
    writers = []
    for sink in sinks:
        if not isinstance(sink, CheckpointWriter):
            raise TvParamError(
                "the ray executor writes outputs to files; this run returns them in memory",
                help="give an output path that every node of the cluster sees, or use the local executor",
                code="E402",
            )
        writers.append(sink)
    return writers


@contextlib.contextmanager
def _cluster(address: str | None) -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        raise TvParamError(
            "the ray executor needs Ray, which is not installed",
            help='pip install "tvlang[ray]"',
            code="E402",
        ) from None
    if ray.is_initialized():
        yield ray
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"  # a cluster of its own, never one that happens to run here
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise TvParamError(
            f"cannot join the Ray cluster at {address}: {e}",
            help="start one (`ray start --head`) and pass its address, `auto`, or no address for a local one",
            code="E402",
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _gather(
    ray: Any, pending: dict[Any, Unit], progress: Progress | None, label: str, retries: int
) -> dict[int, Any]:
    """Every task's result by unit index; the first unit that fails for good stops the run, and
    anything still running is cancelled (on any exception, Ctrl-C included)."""
    from ray.exceptions import RayError, RayTaskError

    results: dict[int, Any] = {}
    total = len(pending)
    try:
        while pending:
            # a timeout, so that Ctrl-C is seen within half a second even while nothing finishes
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    results[unit.index] = ray.get(ref)
                except RayTaskError as e:
                    cause = e.cause
                    if isinstance(cause, TvError):
                        raise cause from None
                    raise _unit_failed(unit, f"{type(cause).__name__}: {cause}") from None
                except RayError as e:
                    why = str(e).strip().splitlines()[0]
                    runs = f"{retries + 1} time{'s' if retries else ''}"
                    raise _unit_failed(
                        unit, why, f"Ray ran it {runs} (a worker that dies is retried)"
                    ) from None
                if progress is not None:
                    if label:
                        progress.label = f"{label} {len(results)}/{total} units"
                    progress.advance(unit.nbytes)
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)  # interrupts a running unit; its worker lives on
        raise
    return results


def _unit_failed(unit: Unit, why: str, *notes: str) -> TvOutputError:
    shards = sorted({s.final for s in unit.shards})
    return TvOutputError(
        f"{unit.describe()} failed for good: {why}",
        notes=(*notes, "its shards: " + ", ".join(shards)),
        help="nothing was written; see the worker logs of the Ray cluster for why it died",
        code="E504",
    )


def _check_complete(
    units: Sequence[Unit], results: Mapping[int, UnitResult], by_path: Mapping[str, SafetensorsWriter]
) -> None:
    """Every element of every unit's tensors reported written and every shard at its planned size;
    only then are the driver's writers told, so that the caller's commit may rename."""
    for unit in units:
        result = results[unit.index]
        for shard in unit.shards:
            for name, (_, numel, _) in shard.slots.items():
                got = result.written.get((shard.output, name), 0)
                if got != numel:
                    raise _unit_failed(
                        unit, f"it reported {got:,} of the {numel:,} elements of `{name}` written"
                    )
            try:
                size = os.stat(shard.path).st_size
            except OSError as e:
                raise _unit_failed(unit, f"its shard {shard.final} is gone: {e.strerror}") from None
            if size != shard.size:
                raise _unit_failed(unit, f"its shard {shard.final} is {size:,} bytes, not {shard.size:,}")
    for unit in units:
        for shard in unit.shards:
            for name, (_, numel, _) in shard.slots.items():
                by_path[shard.path].record_written(name, numel)


# --- on the workers ------------------------------------------------------------------------------


def run_unit(unit: Unit, model_values: Mapping[int, float], nonfinite: str, fault: str | None) -> UnitResult:
    """One unit's element-wise pass, in a Ray worker: its shards written in place."""
    began = time.perf_counter()
    torch.set_num_threads(1)
    sources = _open_sources(unit)
    sinks = [
        _UnitSink(o, [s for s in unit.shards if s.output == o], fault) for o in range(len(unit.plan.outputs))
    ]
    try:
        with all_or_none(sinks):
            report = execute(unit.plan, sources, sinks, nonfinite=nonfinite, model_values=model_values)
    finally:
        for source in sources:
            source.close()
    return UnitResult(
        unit.index,
        {(sink.output, name): n for sink in sinks for name, n in sink.written.items()},
        dict(report.inputs),
        dict(report.overflow),
        dict(report.program),
        time.perf_counter() - began,
        f"{socket.gethostname()}:{os.getpid()}",
        _peak_rss(),
    )


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` where Linux has it (``ru_maxrss``
    starts from the parent's peak at exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def unit_histograms(
    unit: Unit, round_: int, states: Mapping[int, tuple[int, int]]
) -> dict[int, np.ndarray[Any, Any]]:
    """One round of each model-wide selection still running (``states``: key -> (prefix, remaining)),
    over this unit's tensors: the histograms the driver adds up."""
    torch.set_num_threads(1)
    sources = _open_sources(unit)
    kernels = prepare_kernels(unit.plan) if unit.plan.kernels == "compiled" else None
    scratch = Scratch()
    hists = {}
    try:
        for red in unit.plan.model_reductions:
            if red.key not in states or not red.users:
                continue
            select = KthLargest(red.k, red.numel, "F64", kernels.histogram if kernels is not None else None)
            select.prefix, select.remaining = states[red.key]
            select.round = round_
            model_reduction_round(unit.plan, sources, red, select, round_, scratch, None, kernels)
            hists[red.key] = select.hist
    finally:
        for source in sources:
            source.close()
    return hists


class _Unread:
    """The source of an input that none of a unit's tensors reads."""

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise AssertionError(f"tensor {name!r} is not read from this input in this unit")

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        pass

    def gather(self, name: str, positions: Any, run: int = 1) -> None:
        raise AssertionError(f"tensor {name!r} is not read from this input in this unit")

    def close(self) -> None:
        pass


def _open_sources(unit: Unit) -> list[Source]:
    """The unit's inputs, opened only where its tensors are, after checking that this worker sees
    the headers the driver planned with."""
    host = socket.gethostname()
    sources: list[Source] = []
    try:
        for slot, inp in enumerate(unit.inputs):
            label = unit.plan.inputs[slot].ref.label
            if inp.kind == "none":
                sources.append(_Unread())
            elif inp.kind == "lora":
                adapter: LoraAdapter = _seen(host, label, inp.location, LoraAdapter.open)
                metas = adapter.metas()
                for name, meta in unit.plan.inputs[slot].tensors.items():
                    if metas.get(name) != meta:
                        raise _differs(
                            host, label, inp.location, f"tensor `{name}` is {metas.get(name)}, not {meta}"
                        )
                sources.append(LoraSource(adapter))
            else:
                files = sorted({info.path for info in inp.tensors.values()})
                for path in files:
                    seen: dict[str, TensorInfo] = _seen(host, label, path, read_header)[0]
                    for name, info in inp.tensors.items():
                        if info.path == path and seen.get(name) != info:
                            found = seen.get(name)
                            what = (
                                "does not hold it"
                                if found is None
                                else f"has it at {found.offset}, {found.dtype} {list(found.shape)}"
                            )
                            raise _differs(
                                host,
                                label,
                                path,
                                f"tensor `{name}`: the driver planned {info.dtype} {list(info.shape)} at byte {info.offset}; this file {what}",
                            )
                ckpt = Checkpoint(os.path.dirname(files[0]), True, dict(inp.tensors), {}, files)
                sources.append(CheckpointSource(ckpt))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


def _seen(host: str, label: str, path: str, open_: Callable[[str], _T]) -> _T:
    """``open_(path)``, its error said as this worker not seeing what the driver saw."""
    try:
        return open_(path)
    except TvError as e:
        raise _differs(host, label, path, e.message) from None


def _differs(host: str, label: str, path: str, what: str) -> TvInputError:
    return TvInputError(
        f"the worker on {host} does not see input `{label}` as the driver does: {path}: {what}",
        help=_SHARED + "; see docs/distributed.md",
        code="E312",
    )


def _fault(spec: str, tensor: str) -> None:
    """The test hook (``TVLANG_TEST_FAULT``, see ``FAULT_ENV``), after a chunk of ``tensor`` was
    written: the worker process exits, or stalls, in the middle of its unit."""
    if "~" in spec:
        name, _, seconds = spec.partition("~")
        if name == tensor:
            time.sleep(float(seconds))
        return
    name, _, marker = spec.partition("@")
    if name != tensor:
        return
    if marker:
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
    os._exit(75)


class _UnitSink:
    """One output's shards of a unit: chunks ``pwrite``\\ n at the offsets the driver planned, into
    the files it created; counts what was written so the driver can check it."""

    def __init__(self, output: int, shards: Sequence[ShardTarget], fault: str | None) -> None:
        self.output = output
        self.path = shards[0].final if shards else "the output"  # for the runtime's error messages
        self.written: dict[str, int] = {}
        self._fds: list[int] = []
        self._route: dict[str, tuple[int, int, int, str]] = {}
        self._fault = fault
        try:
            for shard in shards:
                try:
                    fd = os.open(shard.path, os.O_WRONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise self._unseen(shard, e.strerror or str(e)) from None
                self._fds.append(fd)
                size = os.fstat(fd).st_size
                if size != shard.size:
                    raise self._unseen(shard, f"it is {size:,} bytes here, not {shard.size:,}")
                for name, (offset, numel, dtype) in shard.slots.items():
                    self._route[name] = (fd, offset, numel, dtype)
                    self.written[name] = 0
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _unseen(shard: ShardTarget, why: str) -> TvOutputError:
        return TvOutputError(
            f"the worker on {socket.gethostname()} cannot write {shard.final} (temporary {shard.path}): {why}",
            help=_SHARED + "; see docs/distributed.md",
            code="E504",
        )

    def write(self, name: str, start: int, chunk: Chunk) -> None:
        fd, offset, numel, dtype = self._route[name]
        data = storage(chunk)
        n = data.size
        if data.dtype != numpy_dtype(dtype) or not 0 <= start <= start + n <= numel:
            raise ValueError(f"{self.path}: chunk [{start}, {start + n}) of {name!r} does not fit its slot")
        buf = memoryview(np.ascontiguousarray(data).data).cast("B")
        pos = offset + start * ITEMSIZE[dtype]
        while buf:  # pwrite may write less than asked
            k = os.pwrite(fd, buf, pos)
            buf, pos = buf[k:], pos + k
        self.written[name] += n
        if self._fault is not None:
            _fault(self._fault, name)

    def commit(self) -> None:
        self.abort()

    def abort(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


__all__ = ["FAULT_ENV", "RETRIES", "RayExecutor", "Unit", "cut_units", "run_unit", "unit_histograms"]
