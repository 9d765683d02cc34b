"""The Plan: what will be read, computed and written, as a printable value.

Planning reads checkpoint headers only.  It checks that the inputs of every
output agree on tensor names and shapes, decides each output tensor's dtype,
the kernel that computes it and the accumulation dtype, and the chunk size
that fits the memory budget.  The runtime then executes the plan and decides
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tvlang.dtypes import ITEMSIZE, TensorMeta
from tvlang.ir.node import InputRef
from tvlang.ir.printer import format_weight
from tvlang.layermap import LayerSources, layer_ranges
from tvlang.plan.tensor_program import TensorProgram

BLOCK = 4096  # reductions add fixed blocks of this many elements, so no chunking changes a sum
# Within a block, element j is added to lane j % LANES, each lane in element order, and the lanes
# are then added pairwise ((l0 + l1) + (l2 + l3)) + …: one fixed order, which vector registers
# follow (a single running sum waits four cycles an element on its own additions).
LANES = 8
SLOTS = 3  # staging slots on the GPU: copy in, compute, copy back, each on its own chunk
GPU_DEVICES = ("cuda", "interpret")  # devices whose chunks stream through SLOTS staging slots

_WHERE = {"cuda": "on the GPU", "interpret": "in Triton's interpreter (on the CPU)"}


@dataclass(frozen=True)
class PlannedInput:
    """A checkpoint the plan reads, with the tensors it has."""

    ref: InputRef
    location: str  # a path, or "memory"
    tensors: Mapping[str, TensorMeta] = field(repr=False)
    sparse: bool = False  # a task vector that is zero on the tensors it lacks (a LoRA adapter)
    # a range of the checkpoint's layers (ref.view): each of ``tensors`` (output names) → the
    # checkpoint tensor it reads
    names: Mapping[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WeightedSum:
    """``out = round(Σ weight_i · term_i)``, a term being an input or the difference of two
    (``input − anchor``, formed exactly in ``acc``): each product accumulated in ``acc`` (fused
    multiply-add, in term order, starting from zero), rounded once to the output dtype."""

    terms: tuple[tuple[float, int, int | None], ...]  # (weight, input index, input subtracted or None)
    acc: str  # "F32" or "F64"

    @property
    def inputs(self) -> tuple[int, ...]:
        """The inputs read, each once, in first-use order."""
        seen: dict[int, None] = {}
        for _, slot, minus in self.terms:
            seen[slot] = None
            if minus is not None:
                seen[minus] = None
        return tuple(seen)

    def describe(self) -> str:
        parts = []
        for i, (w, slot, minus) in enumerate(self.terms):
            sign = "" if i == 0 else (" - " if w < 0 else " + ")
            term = f"in{slot}" if minus is None else f"(in{slot} - in{minus})"
            parts.append(f"{sign}{format_weight(w if i == 0 else abs(w))}*{term}")
        return f"wsum[{self.acc.lower()}] " + "".join(parts)


@dataclass(frozen=True)
class Copy:
    """Pass a non-float tensor (integer ids, boolean masks) through from the template input unchanged."""

    source: int

    def describe(self) -> str:
        return f"copy in{self.source}"


@dataclass(frozen=True)
class ProgramOutput:
    """Output ``index`` of the task's :class:`~tvlang.plan.tensor_program.TensorProgram` (element-wise
    functions, reductions, random masks), rounded once to the output dtype."""

    index: int

    def describe(self) -> str:
        return f"program output {self.index}"


Kernel = WeightedSum | Copy | ProgramOutput


@dataclass(frozen=True)
class TensorWrite:
    """One tensor of one output, and the kernel that computes it."""

    output: int  # index into Plan.outputs
    dtype: str
    kernel: Kernel


@dataclass(frozen=True)
class TensorTask:
    """One tensor name: read each input's chunk once, compute every output from it."""

    name: str
    shape: tuple[int, ...]
    reads: tuple[int, ...]  # input indices
    writes: tuple[TensorWrite, ...]
    program: TensorProgram | None = None  # for ProgramOutput writes
    chunk: int = 0  # elements per chunk (0: the plan's)

    @property
    def numel(self) -> int:
        return TensorMeta("U8", self.shape).numel

    @property
    def passes(self) -> int:
        return self.program.passes if self.program is not None else 1


@dataclass(frozen=True)
class PlannedOutput:
    """A checkpoint the plan writes: its tensors in order and what it follows."""

    name: str
    kind: str  # "model" or "delta"
    template: int  # input whose names, order, non-float tensors and side files the output follows
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...] = field(
        repr=False
    )  # (name, dtype, shape), in order
    expression: str = ""
    # a stacked output (layers(), stack()): per output layer, the (input, source layer) pairs it reads
    layers: tuple[LayerSources, ...] | None = None

    @property
    def nbytes(self) -> int:
        return sum(TensorMeta(d, s).nbytes for _, d, s in self.tensors)


@dataclass(frozen=True)
class ModelReduction:
    """A model-wide k-th largest value (TIES with ``scope="model"``): exact radix selection in float64
    over every chunk of every tensor that uses it, 4 passes over those tensors before the per-tensor work."""

    key: int
    users: tuple[tuple[int, int], ...]  # (task index, instruction of its operand)
    k: int
    numel: int

    ROUNDS = 4


@dataclass(frozen=True)
class Plan:
    """The whole program lowered to per-tensor tasks, with the budget they run under."""

    inputs: tuple[PlannedInput, ...]
    outputs: tuple[PlannedOutput, ...]
    tasks: tuple[TensorTask, ...] = field(repr=False)
    chunk: int  # elements per chunk
    threads: int
    memory: int  # the budget, bytes
    model_reductions: tuple[ModelReduction, ...] = ()
    kernels: str = "eager"  # "compiled": fused C loops (tvlang.codegen.c); "eager": torch op by op
    # inputs the program names whose weights the passes folded to zero: their headers were checked
    # against the others, their data is never read
    checked: tuple[PlannedInput, ...] = ()
    # where the kernels run: "cpu", or the GPU backend ("cuda", or "interpret": Triton's interpreter)
    device: str = "cpu"
    # tensors no generated kernel computes, with why (tvlang.codegen.spec.eager_tasks): they run on
    # the eager path (on the GPU, on the CPU path); the backends obey it
    eager: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def memo(self) -> dict[str, Any]:
        """What a backend derives from this plan and keeps with it (its compiled kernels), so that
        a plan run again (a Program reuses its last plan) looks nothing up again.  Not pickled."""
        return {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "memo"}

    def input_dtypes(self, task: TensorTask) -> dict[int, str]:
        """The dtype code of ``task``'s tensor in each input it reads (what its kernels are built for)."""
        return {i: self.inputs[i].tensors[task.name].dtype for i in task.reads}

    @property
    def bytes_read(self) -> int:
        """Bytes read from the inputs, every pass (model-wide ones included) counted."""
        per_task = [
            sum(TensorMeta(self.inputs[i].tensors[t.name].dtype, t.shape).nbytes for i in t.reads)
            for t in self.tasks
        ]
        model_wide = sum(
            per_task[i] * ModelReduction.ROUNDS for r in self.model_reductions for i, _ in r.users
        )
        return sum(b * t.passes for b, t in zip(per_task, self.tasks, strict=True)) + model_wide

    @property
    def bytes_written(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def peak_memory(self) -> int:
        """Estimated working memory: per worker, one chunk of every input mapped, the accumulator, the outputs."""
        if self.device in GPU_DEVICES:  # host and device: every slot holds a chunk in flight
            return SLOTS * max(
                (min(t.chunk or self.chunk, t.numel) * gpu_bytes_per_element(self, t) for t in self.tasks),
                default=0,
            )
        return self.threads * max(
            (min(t.chunk or self.chunk, t.numel) * bytes_per_element(self, t) for t in self.tasks), default=0
        )

    def layer_map(self, out: PlannedOutput) -> list[str]:
        """A stacked output's layers and where each comes from, in runs: ``0–23 ← a 0–23``."""
        assert out.layers is not None
        lines = [f"layer map ({len(out.layers)} layers):"]
        for first, last, sources in layer_ranges(out.layers):
            span = f"{first}–{last}" if last > first else f"{first}"
            froms = ", ".join(
                f"in{k} {self.inputs[k].ref.label} " + (f"{s}–{s + last - first}" if last > first else f"{s}")
                for k, s in sources
            )
            lines.append(f"  {span:<9} ← {froms}")
        return lines

    def explain(self, *, per_tensor: int | None = 12) -> str:
        """The per-tensor plan and totals, for people (``tvlang plan``)."""
        lines = ["inputs:"]
        for i, inp in enumerate(self.inputs):
            size = sum(m.nbytes for m in inp.tensors.values())
            view = inp.ref.view
            seen = (
                f"  (layers {view.lo}–{view.hi - 1} as {view.offset}–{view.offset + view.length - 1})"
                if view
                else ""
            )
            lines.append(
                f"  in{i}  {inp.ref.label:<16} {inp.ref.kind!s:<5}  {len(inp.tensors)} tensors, "
                f"{_human(size)}  {inp.location}{seen}"
            )
        for inp in self.checked:
            lines.append(
                f"  --   {inp.ref.label:<16} {inp.ref.kind!s:<5}  weight 0: headers checked, never read  {inp.location}"
            )
        lines.append("outputs:")
        for i, out in enumerate(self.outputs):
            lines.append(
                f"  out{i} {out.name:<16} {out.kind:<5}  {len(out.tensors)} tensors, {_human(out.nbytes)}"
                f"  (layout of in{out.template})"
            )
            if out.layers is not None:
                lines.extend(f"    {line}" for line in self.layer_map(out))
        kernels: dict[tuple[str, ...], str] = {}
        for t in self.tasks:
            kernels.setdefault(_writes_text(t), f"k{len(kernels)}")
        counts = {k: 0 for k in kernels.values()}
        for t in self.tasks:
            counts[kernels[_writes_text(t)]] += 1
        lines.append("kernels (each reads its inputs' chunks once and writes every output):")
        for text, kid in kernels.items():
            lines.append(f"  {kid}  ({counts[kid]} tensor{'s' if counts[kid] != 1 else ''})")
            lines.extend(f"      {line}" for line in text)
        for r in self.model_reductions:
            lines.append(
                f"model-wide: model_kth#{r.key}: the {r.k:,}-th largest of {r.numel:,} elements in {len(r.users)} "
                f"tensors, {ModelReduction.ROUNDS} passes over them before the per-tensor work"
            )
        lines.append("tensors:")
        shown = self.tasks if per_tensor is None else self.tasks[:per_tensor]
        for t in shown:
            shape = "×".join(map(str, t.shape)) or "scalar"
            size = t.chunk or self.chunk
            chunks = max(1, -(-t.numel // size))
            notes = f", {t.passes} passes" if t.passes > 1 else ""
            if t.program is not None and t.program.row_wise:
                notes += f", whole rows of {row_length(t.shape):,} per chunk"
            if t.name in self.eager:
                notes += f", {self._eager_where}: {self.eager[t.name]}"
            lines.append(
                f"  {t.name}  [{shape}]  {kernels[_writes_text(t)]}  {chunks} chunk{'s' if chunks > 1 else ''} of {size:,}{notes}"
            )
        if per_tensor is not None and len(self.tasks) > per_tensor:
            lines.append(f"  … {len(self.tasks) - per_tensor} more tensors (--all lists them)")
        lines.append(
            f"totals: {len(self.tasks)} tensors, read {_human(self.bytes_read)}, "
            f"write {_human(self.bytes_written)}, chunk {self.chunk:,} elements, {self.threads} thread(s), "
            f"peak working memory ≈ {_human(self.peak_memory)} (budget {_human(self.memory)}), "
            + (
                f"generated Triton kernels {_WHERE.get(self.device, self.device)}, chunks through {SLOTS} staging slots"
                if self.device != "cpu"
                else f"{'compiled fused' if self.kernels == 'compiled' else 'eager'} CPU kernels"
            )
            + self._eager_summary()
        )
        return "\n".join(lines)

    @property
    def _eager_where(self) -> str:
        return "eager" if self.device == "cpu" else "on the CPU path"

    def _eager_summary(self) -> str:
        if not self.eager:
            return ""
        reasons = sorted(set(self.eager.values()))
        n = len(self.eager)
        return f"; {n} tensor{'s' if n != 1 else ''} {self._eager_where} ({'; '.join(reasons)})"


def row_length(shape: tuple[int, ...]) -> int:
    """Elements per row for row-wise operations: the tensor flattened to (shape[0], -1); a vector is one row."""
    if len(shape) < 2:
        return max(1, TensorMeta("U8", shape).numel)
    return max(1, TensorMeta("U8", shape[1:]).numel)


def _writes_text(task: TensorTask) -> tuple[str, ...]:
    lines = tuple(f"out{w.output} {w.dtype:<5} = {w.kernel.describe()}" for w in task.writes)
    return lines + (tuple(task.program.describe()) if task.program is not None else ())


def bytes_per_element(plan: Plan, task: TensorTask) -> int:
    """Working bytes per element of a chunk: every input's mapped bytes, the accumulator, one output."""
    inputs = sum(ITEMSIZE[plan.inputs[i].tensors[task.name].dtype] for i in task.reads)
    acc = max((8 if isinstance(w.kernel, WeightedSum) and w.kernel.acc == "F64" else 4) for w in task.writes)
    if task.program is not None:
        width = 8 if task.program.acc == "F64" else 4
        acc = max(acc, width * (1 + task.program.max_live))
    return inputs + acc + max(ITEMSIZE[w.dtype] for w in task.writes)


def gpu_bytes_per_element(plan: Plan, task: TensorTask) -> int:
    """Bytes a GPU staging slot holds per element: every input's chunk, every output's, and room
    for the reduction passes' outputs (float64 block sums or accumulation-dtype operands)."""
    inputs = sum(ITEMSIZE[plan.inputs[i].tensors[task.name].dtype] for i in task.reads)
    outputs = sum(ITEMSIZE[w.dtype] for w in task.writes)
    return inputs + outputs + (32 if task.passes > 1 else 0)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_bytes(n: float) -> str:
    return _human(n)


__all__: Sequence[str] = [
    "GPU_DEVICES",
    "SLOTS",
    "Copy",
    "Kernel",
    "ModelReduction",
    "Plan",
    "PlannedInput",
    "PlannedOutput",
    "ProgramOutput",
    "TensorTask",
    "TensorWrite",
    "WeightedSum",
    "gpu_bytes_per_element",
    "human_bytes",
    "row_length",
]
