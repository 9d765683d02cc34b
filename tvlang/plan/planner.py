"""IR graph + checkpoint headers → :class:`~tvlang.plan.plan.Plan`.

Reads headers only (through the ``open_input`` callback); every mismatch is a
positioned error that names the tensor and both inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from tvlang.context import TensorContext, count_layers
from tvlang.errors import TvInputError, TvParamError, TvPlanError
from tvlang.ir.node import Graph, InputRef, Node, Op, scalar_value, toposort
from tvlang.passes.specialize import has_context, specialize
from tvlang.plan.plan import (
    FLOATS,
    WIDE,
    Copy,
    Kernel,
    ModelReduction,
    Plan,
    PlannedInput,
    PlannedOutput,
    ProgramOutput,
    TensorMeta,
    TensorTask,
    TensorWrite,
    WeightedSum,
    bytes_per_element,
    row_length,
)
from tvlang.plan.program import TensorProgram, compile_program

BLOCK = 4096  # tvlang.backends.reductions.BLOCK: reductions sum fixed blocks of this many elements

OpenInput = Callable[[InputRef], tuple[str, Mapping[str, TensorMeta]]]

MAX_CHUNK = 1 << 20  # elements; eager chunked kernels are fastest at 256K–1M (benchmarks/RESULTS.md)
MIN_CHUNK = 1 << 12
PROGRAM_CHUNK = 1 << 18
DEFAULT_MEMORY = 256 << 20

DTYPE_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "f16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "f32": "F32",
    "float32": "F32",
    "float": "F32",
    "fp64": "F64",
    "f64": "F64",
    "float64": "F64",
    "double": "F64",
}


def parse_dtype(name: str | None) -> str | None:
    """``"bf16"`` → ``"BF16"``; None stays None (keep each tensor's template dtype)."""
    if name is None:
        return None
    code = DTYPE_ALIASES.get(str(name).lower().removeprefix("torch."))
    if code is None:
        raise TvParamError(
            f"unknown output dtype {name!r}",
            help="choose one of bf16, fp16, fp32, fp64",
            code="E402",
        )
    return code


def build_plan(
    graph: Graph,
    open_input: OpenInput,
    *,
    dtype: str | None = None,
    memory: int = DEFAULT_MEMORY,
    threads: int = 1,
    chunk: int | None = None,
) -> Plan:
    out_dtype = parse_dtype(dtype)
    refs = graph.inputs()
    index = {ref.key: i for i, ref in enumerate(refs)}
    inputs = []
    for ref in refs:
        try:
            location, tensors = open_input(ref)
        except TvInputError as err:
            if err.span is None and ref.span is not None:
                err.span = ref.span
            raise
        inputs.append(PlannedInput(ref, location, tensors))

    outputs: list[PlannedOutput] = []
    # (tensor name, shape) -> reads, writes, generic roots (for a program)
    tasks: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[TensorWrite], list[Node]]] = {}
    for out_idx, (name, node) in enumerate(graph.outputs):
        used = _inputs_of(node, index)
        template = used[0]
        _check_compatible(inputs, used)
        per_tensor = has_context(node)  # weights that depend on the tensor's name or layer
        num_layers = count_layers(inputs[template].tensors)
        order = []
        for tname, meta in inputs[template].tensors.items():
            metas = [inputs[i].tensors[tname] for i in used]
            task_reads, writes, roots = tasks.setdefault((tname, meta.shape), ([], [], []))
            if meta.dtype in FLOATS:
                tensor_node = specialize(node, TensorContext(tname, num_layers)) if per_tensor else node
                terms = _terms(tensor_node, index)
                odt = out_dtype or meta.dtype
                wide = any(m.dtype in WIDE for m in metas) or odt in WIDE
                kernel: Kernel
                if terms is not None:
                    kernel = WeightedSum(tuple(terms), "F64" if wide else "F32")
                else:
                    kernel = ProgramOutput(len(roots))
                    roots.append(tensor_node)
                reads = _inputs_of(tensor_node, index) if per_tensor else used
            else:
                odt, kernel, reads = meta.dtype, Copy(template), [template]
            order.append((tname, odt, meta.shape))
            task_reads.extend(r for r in reads if r not in task_reads)
            writes.append(TensorWrite(out_idx, odt, kernel))
        kind = "model" if node.kind.is_model else "delta"
        expr = graph.expressions[out_idx] if out_idx < len(graph.expressions) else ""
        outputs.append(PlannedOutput(name, kind, template, tuple(order), expr))

    slots = {ref.key: i for i, ref in enumerate(refs)}
    all_roots = [r for _, _, roots in tasks.values() for r in roots]
    global_nodes = [n for n in toposort(all_roots) if n.op is Op.GLOBAL]
    global_index = {id(n): i for i, n in enumerate(global_nodes)}
    programs: dict[tuple[tuple[int, ...], str], TensorProgram] = {}
    planned_tasks = []
    for (tname, shape), (reads, writes, roots) in tasks.items():
        program = None
        if roots:
            dtypes = [inputs[i].tensors[tname].dtype for i in reads]
            wide = any(d in WIDE for d in dtypes) or any(w.dtype in WIDE for w in writes)
            acc = "F64" if wide else "F32"
            key = (tuple(id(r) for r in roots), acc)
            if key not in programs:
                programs[key] = compile_program(roots, slots, acc, global_index)
            program = programs[key]
        planned_tasks.append(TensorTask(tname, shape, tuple(sorted(reads)), tuple(writes), program))
    plan = Plan(tuple(inputs), tuple(outputs), tuple(planned_tasks), chunk or MAX_CHUNK, threads, memory)
    if chunk is None:
        per_element = max((bytes_per_element(plan, t) for t in planned_tasks), default=1)
        fit = memory // max(1, threads * per_element)
        chunk = max(MIN_CHUNK, min(MAX_CHUNK, fit // MIN_CHUNK * MIN_CHUNK))
    # Reductions sum fixed blocks, so their chunks hold whole blocks (the bits then never depend on chunking).
    final = tuple(_aligned(t, chunk) for t in planned_tasks)
    globals_ = tuple(_model_reduction(i, n, final) for i, n in enumerate(global_nodes))
    return Plan(plan.inputs, plan.outputs, final, chunk, threads, memory, globals_)


def _model_reduction(key: int, node: Node, tasks: Sequence[TensorTask]) -> ModelReduction:
    """A model-wide k-th largest: which tensors feed it and k, from the headers."""
    users = []
    for i, t in enumerate(tasks):
        if t.program is None:
            continue
        for ins in t.program.instrs:
            if ins.op == "global" and ins.attr == key:
                if t.program.instrs[ins.args[0]].need:
                    raise TvPlanError(
                        "a model-wide threshold cannot depend on per-tensor statistics",
                        help="compute it from the task vectors themselves (e.g. abs(d))",
                        code="E601",
                    )
                users.append((i, ins.args[0]))
    density = scalar_value(node.args[1])
    if density is None:
        raise TvPlanError("a model-wide density must be a number known before any data is read", code="E601")
    total = sum(tasks[i].numel for i, _ in users)
    return ModelReduction(key, tuple(users), math.floor(density * total), total)


def _aligned(task: TensorTask, chunk: int) -> TensorTask:
    """Reductions sum fixed blocks and row-wise operations need whole rows: round the chunk up so
    that every chunk starts on a block (and a row) boundary."""
    if task.program is not None:
        # Eager element-wise programs run many ops per chunk, each with small temporaries:
        # chunks of 256K elements keep them in cache and the allocator's footprint small.
        chunk = min(chunk, PROGRAM_CHUNK)
    unit = 1
    if task.passes > 1:
        unit = BLOCK
    if task.program is not None and task.program.row_wise:
        unit = math.lcm(unit, row_length(task.shape))
    if unit == 1:
        return task
    return replace(task, chunk=-(-chunk // unit) * unit)


def _inputs_of(node: Node, index: Mapping[str, int]) -> list[int]:
    """The inputs an output reads, in first-use order (the first is its template)."""
    seen: list[int] = []
    for n in node.toposort():
        if n.op is Op.INPUT and index[n.arg.key] not in seen:
            seen.append(index[n.arg.key])
    if node.op is Op.WSUM:  # the linear form's order puts the base first
        firsts = [index[a.arg.key] for a in node.args if a.op is Op.INPUT]
        seen = firsts + [i for i in seen if i not in firsts]
    return seen


def _terms(node: Node, index: Mapping[str, int]) -> list[tuple[float, int]] | None:
    """The weighted sum an output is, if it is one over inputs (the fast path); else None."""
    if node.op is Op.INPUT:
        return [(1.0, index[node.arg.key])]
    if node.op is Op.WSUM and all(a.op is Op.INPUT for a in node.args):
        return [(w, index[a.arg.key]) for w, a in zip(node.arg, node.args, strict=True)]
    return None


def _check_compatible(inputs: list[PlannedInput], used: list[int]) -> None:
    """Every input of one output must hold the same tensor names with the same shapes."""
    ref = inputs[used[0]]
    for i in used[1:]:
        other = inputs[i]
        missing = [n for n in ref.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in ref.tensors]
        if missing or extra:
            if missing:
                what = f"tensor `{missing[0]}` of `{ref.ref.label}` is missing from `{other.ref.label}`"
            else:
                what = f"`{other.ref.label}` has tensor `{extra[0]}`, which `{ref.ref.label}` lacks"
            raise TvInputError(
                what,
                other.ref.span,
                label=f"{len(missing)} missing, {len(extra)} extra tensor(s) here",
                notes=(f"{ref.ref.label}: {ref.location}", f"{other.ref.label}: {other.location}"),
                help="task arithmetic needs checkpoints of the same architecture",
                code="E303",
            )
        for name, meta in ref.tensors.items():
            theirs = other.tensors[name]
            if theirs.shape != meta.shape:
                raise TvInputError(
                    f"tensor `{name}` has shape {list(meta.shape)} in `{ref.ref.label}` "
                    f"but {list(theirs.shape)} in `{other.ref.label}`",
                    other.ref.span,
                    label="this input",
                    notes=(f"{ref.ref.label}: {ref.location}", f"{other.ref.label}: {other.location}"),
                    code="E304",
                )
            if (theirs.dtype in FLOATS) != (meta.dtype in FLOATS):
                raise TvInputError(
                    f"tensor `{name}` is {meta.dtype} in `{ref.ref.label}` but {theirs.dtype} in "
                    f"`{other.ref.label}`",
                    other.ref.span,
                    label="this input",
                    code="E304",
                )
