"""The compiled CPU path: each task's element-wise pass as one fused C loop (:mod:`tvlang.codegen.c`).

A task's kernel reads every input chunk once and writes every float output of the task
(a sweep's ten outputs included) in the same loop; a program's reduction pass is one kernel
too, which adds its sums block by block as it goes (:func:`tvlang.codegen.spec.reduction_spec`).  Kernels are built once per distinct spec (tensors of the same
dtypes and structure share one) before the run starts, so compile errors and compile time
never land in the middle of a merge.  What no kernel computes (column sums, float8 outputs)
runs on the eager path, tensor by tensor.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from tvlang.backends.cpu import Scratch
from tvlang.backends.interpreter import random_key
from tvlang.chunks import Chunk, holds, is_torch, storage_code
from tvlang.codegen import c
from tvlang.codegen.spec import SUM, KernelCall, Unsupported, program_spec, reduction_spec, task_spec
from tvlang.dtypes import KERNEL_DTYPES
from tvlang.plan.plan import BLOCK, Plan, ProgramOutput, TensorTask, WeightedSum
from tvlang.plan.tensor_program import TensorProgram


def resolve_mode(mode: str) -> str:
    """``auto`` is ``compiled`` where a C compiler is found, else ``eager``."""
    if mode == "auto":
        return "compiled" if c.compiler() is not None else "eager"
    return mode


@dataclass(frozen=True)
class Compiled:
    """A loaded kernel and the call that binds it to a task's values."""

    kernel: c.CKernel
    bound: KernelCall


@dataclass(frozen=True)
class TaskKernel(Compiled):
    """A task's output kernel and the writes it fills."""

    writes: tuple[int, ...]  # the task's writes (indices) that the outputs fill, in order


class Kernels:
    """The compiled kernels of one plan's run."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._tasks: dict[int, TaskKernel | None] = {}
        # Tasks of one shape (the same writes, program and input dtypes, as their repr spells them:
        # -0.0 is not 0.0 there) share a kernel, built once.  A plan's tensors are mostly a few
        # shapes repeated: a Llama-shaped task arithmetic has 156 tasks and one kernel.
        self._shapes: dict[str, TaskKernel | None] = {}
        self._programs: dict[tuple[int, tuple[int, ...], tuple[tuple[int, str], ...]], Compiled | None] = {}
        self._reductions: dict[tuple[int, tuple[int, ...], tuple[tuple[int, str], ...]], Compiled | None] = {}
        self._keys: dict[tuple[int, str, str], int] = {}
        self._lock = threading.Lock()
        self.failures: list[str] = []
        self.histogram: c.RadixHistogram | None = None  # for k-th largest values: radix rounds
        self.bracket: c.BracketCount | None = None  # and the sampled selection's pass
        if any(t.passes > 1 for t in plan.tasks) or plan.model_reductions:
            try:
                self.histogram = c.radix_histogram()
                self.bracket = c.bracket_count()
            except c.CompileError as e:
                self._failed(e)

    def prepare(self) -> int:
        """Build every task's kernel now; returns how many distinct kernels the plan uses."""
        specs = set()
        for task in self.plan.tasks:
            tk = self.task(task)
            if tk is not None:
                specs.add(tk.bound.spec.key)
        return len(specs)

    def task(self, task: TensorTask) -> TaskKernel | None:
        key = id(task)
        if key in self._tasks:
            return self._tasks[key]
        writes = tuple(
            i for i, w in enumerate(task.writes) if isinstance(w.kernel, WeightedSum | ProgramOutput)
        )
        result = None
        if writes:
            metas = (self.plan.inputs[i].tensors.get(task.name) for i in task.reads)
            dtypes = {i: m.dtype for i, m in zip(task.reads, metas, strict=True) if m is not None}
            shape = repr((task.writes, task.program, sorted(dtypes.items())))
            if shape in self._shapes:
                result = self._shapes[shape]
            else:
                compiled = self._build(lambda: task_spec(task, dtypes, "c"))
                if compiled is not None:
                    result = TaskKernel(compiled.kernel, compiled.bound, writes)
                self._shapes[shape] = result
        self._tasks[key] = result
        return result

    def program(
        self, program: TensorProgram, targets: tuple[int, ...], codes: Mapping[int, str]
    ) -> Compiled | None:
        """The kernel computing the program instructions ``targets`` into accumulation-dtype buffers
        from inputs of the dtypes ``codes`` (model-wide selections' operands; a program's outputs
        when a chunk is redone eagerly)."""
        key = (id(program), targets, tuple(sorted(codes.items())))
        if key not in self._programs:
            self._programs[key] = self._build(lambda: program_spec(program, targets, codes, "c"))
        return self._programs[key]

    def run_program(
        self,
        program: TensorProgram,
        targets: tuple[int, ...],
        views: Mapping[int, Chunk],
        outputs: Sequence[Chunk],
        scalars: Mapping[int, float],
        tensor: str,
        start: int,
        row: int = 1,
        codes: Mapping[int, str] | None = None,
    ) -> bool:
        """Compute ``targets`` of one chunk into ``outputs`` (accumulation dtype); False when no
        kernel does (the caller then runs them eagerly).  ``row``: elements per row; ``codes``: the
        inputs' dtypes, as the plan says (a numpy chunk of bytes may hold either float8)."""
        compiled = self.program(program, targets, input_codes(views, codes))
        if compiled is None:
            return False
        keys = self.random_keys(compiled.bound, tensor)
        return call(compiled, views, outputs, scalars, keys, start, row=row) >= 0

    def run_reductions(
        self,
        program: TensorProgram,
        work: Sequence[int],
        views: Mapping[int, Chunk],
        scratch: Scratch,
        scalars: Mapping[int, float],
        tensor: str,
        start: int,
        stop: int,
        row: int = 1,
        codes: Mapping[int, str] | None = None,
    ) -> list[Chunk] | None:
        """One chunk of a reduction pass: per reduction of ``work``, its operand (k-th
        largest, count) or its float64 block sums (sum, dot, sumsq); None when no kernel does it.
        ``codes``: the inputs' dtypes, as the plan says."""
        compiled = self._reduction(program, work, input_codes(views, codes))
        if compiled is None:
            return None
        n = stop - start
        outs: list[Chunk] = [
            scratch.array(("sums", k), "F64", -(-n // BLOCK))
            if dtype == SUM
            else scratch.array(("slot", k), program.acc, n)
            for k, (_, dtype) in enumerate(compiled.bound.spec.outputs)
        ]
        keys = self.random_keys(compiled.bound, tensor)
        return outs if call(compiled, views, outs, scalars, keys, start, n, row) >= 0 else None

    def run_bracketed(
        self,
        program: TensorProgram,
        work: Sequence[int],
        views: Mapping[int, Chunk],
        scalars: Mapping[int, float],
        tensor: str,
        start: int,
        stop: int,
        selections: list[tuple[int, int, np.ndarray[Any, Any], np.ndarray[Any, Any]]],
        codes: Mapping[int, str] | None = None,
    ) -> bool:
        """One chunk of a reduction pass whose reductions ``work`` are all k-th largest values with a
        bracket (``selections``: each one's ``(lo, hi, stash, counts)``), counted as the pass's
        kernel computes them, a block at a time (:meth:`tvlang.codegen.c.CKernel.bracketed`);
        False (nothing counted) when no kernel does it."""
        if self.bracket is None or program.row_wise:
            return False
        compiled = self._reduction(program, work, input_codes(views, codes))
        if compiled is None:
            return False
        bound = compiled.bound
        inputs = [views[i] for i in bound.inputs]
        if not all(_takes(x, d) for x, d in zip(inputs, bound.spec.inputs, strict=True)):
            return False
        params = [scalars[i] for i in bound.params]
        keys = self.random_keys(bound, tensor)
        kernel = compiled.kernel
        return kernel.bracketed(self.bracket, inputs, params, keys, start, stop - start, selections) >= 0

    def _reduction(
        self, program: TensorProgram, work: Sequence[int], dtypes: dict[int, str]
    ) -> Compiled | None:
        """The compiled kernel of a reduction pass's ``work`` (built once), or None."""
        key = (id(program), tuple(work), tuple(sorted(dtypes.items())))
        if key not in self._reductions:
            self._reductions[key] = self._build(lambda: reduction_spec(program, work, dtypes, "c"))
        return self._reductions[key]

    def random_keys(self, bound: KernelCall, tensor: str) -> list[int]:
        out = []
        for seed, stream in bound.keys:
            k = (seed, stream, tensor)
            if k not in self._keys:
                self._keys[k] = random_key(seed, stream, tensor)
            out.append(self._keys[k])
        return out

    def _build(self, make: Callable[[], KernelCall]) -> Compiled | None:
        try:
            bound = make()
        except (Unsupported, KeyError):  # KeyError: an input dtype without a kernel type
            return None
        try:
            return Compiled(c.load(bound.spec), bound)
        except c.CompileError as e:
            self._failed(e)
            return None

    def _failed(self, e: Exception) -> None:
        with self._lock:
            if not self.failures:
                warnings.warn(f"tvlang: running eagerly, kernel compilation failed: {e}", stacklevel=3)
            self.failures.append(str(e))


def input_codes(views: Mapping[int, Chunk], known: Mapping[int, str] | None) -> dict[int, str]:
    """The dtype code of each input chunk: the plan's (``known``), else what its storage says by
    itself; an input whose dtype no generated kernel takes (or that bytes cannot name) is left out."""
    codes = {i: (known or {}).get(i) or storage_code(x) for i, x in views.items()}
    return {i: code for i, code in codes.items() if code is not None and code in KERNEL_DTYPES}


def _takes(x: Any, code: str) -> bool:
    """Whether a kernel built for ``code`` takes the chunk ``x`` (stored as ``code``, contiguous,
    on the CPU)."""
    if not holds(x, code):
        return False
    if is_torch(x):
        return bool(x.is_contiguous() and x.device.type == "cpu")
    return bool(x.flags.c_contiguous)


def call(
    compiled: Compiled,
    views: Mapping[int, Chunk],
    outputs: Sequence[Chunk],
    scalars: Mapping[int, float],
    keys: Sequence[int],
    start: int,
    n: int | None = None,
    row: int = 1,
) -> int:
    """Run ``compiled`` on one chunk (``row``: elements per row, for kernels of whole rows); returns
    the count of elements with non-finite rounded outputs, or -1 (nothing computed) when a chunk's
    dtype is not the one the kernel was built for."""
    bound = compiled.bound
    inputs = [views[i] for i in bound.inputs]
    if not all(_takes(x, d) for x, d in zip(inputs, bound.spec.inputs, strict=True)):
        return -1
    params = [scalars[i] for i in bound.params]
    return compiled.kernel(inputs, list(outputs), params, list(keys), start, n, row)


def prepare_kernels(plan: Plan) -> Kernels:
    """The plan's kernels, all built (compiled or loaded from the disk cache); kept with the plan,
    so a plan that runs again finds them without looking each task's kernel up."""
    kernels = plan.memo.get("kernels")
    if not isinstance(kernels, Kernels):
        kernels = Kernels(plan)
        kernels.prepare()
        plan.memo["kernels"] = kernels
    return kernels


def c_kernel_sources(plan: Plan) -> list[tuple[str, str]]:
    """(what it computes and for which tensors, C source) of each distinct kernel the compiled CPU
    backend builds for ``plan`` (``tvlang plan --stage c``): model-wide selections' operands, each
    reduction pass, the fused element-wise pass.  What no kernel computes is left out (eager)."""
    found: dict[str, tuple[str, list[str]]] = {}

    def add(make: Callable[[], KernelCall], role: str, tensor: str) -> None:
        try:
            source = c.c_source(make().spec)
        except (Unsupported, KeyError):  # the eager path computes it
            return
        tensors = found.setdefault(source, (role, []))[1]
        if tensor not in tensors:  # a kernel serving several passes of one tensor
            tensors.append(tensor)

    for red in plan.model_reductions:
        for task_index, operand in red.users:
            task = plan.tasks[task_index]
            program = task.program
            assert program is not None
            dtypes = plan.input_dtypes(task)
            add(
                partial(program_spec, program, (operand,), dtypes, "c"),
                f"model_kth#{red.key}: its operand",
                task.name,
            )
    for task in plan.tasks:
        if not any(isinstance(w.kernel, WeightedSum | ProgramOutput) for w in task.writes):
            continue
        dtypes = plan.input_dtypes(task)
        program = task.program
        for q in range(1, task.passes):
            assert program is not None
            add(
                partial(reduction_spec, program, program.reductions_in(q), dtypes, "c"),
                f"pass {q}: reductions",
                task.name,
            )
        add(partial(task_spec, task, dtypes, "c"), "element-wise pass: the outputs", task.name)
    out = []
    for source, (role, tensors) in found.items():
        names = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
        out.append((f"{role}; {len(tensors)} tensor(s): {names}", source))
    return out
