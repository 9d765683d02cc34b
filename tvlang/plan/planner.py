"""IR graph + checkpoint headers → :class:`~tvlang.plan.plan.Plan`.

Reads headers only (through the ``open_input`` callback); every mismatch is a
positioned error that names the tensor and both inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tvlang.errors import TvInputError, TvParamError
from tvlang.ir.node import Graph, InputRef, Node, Op
from tvlang.plan.plan import (
    FLOATS,
    WIDE,
    Copy,
    Plan,
    PlannedInput,
    PlannedOutput,
    TensorMeta,
    TensorTask,
    TensorWrite,
    WeightedSum,
    bytes_per_element,
)

OpenInput = Callable[[InputRef], tuple[str, Mapping[str, TensorMeta]]]

MAX_CHUNK = 1 << 20  # elements; eager chunked kernels are fastest at 256K–1M (benchmarks/RESULTS.md)
MIN_CHUNK = 1 << 12
DEFAULT_MEMORY = 512 << 20

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
    tasks: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[TensorWrite]]] = {}
    for out_idx, (name, node) in enumerate(graph.outputs):
        terms = _terms(node, index)
        template = terms[0][1]
        _check_compatible(inputs, [i for _, i in terms])
        order = []
        for tname, meta in inputs[template].tensors.items():
            metas = [inputs[i].tensors[tname] for _, i in terms]
            if meta.dtype in FLOATS:
                odt = out_dtype or meta.dtype
                wide = any(m.dtype in WIDE for m in metas) or odt in WIDE
                kernel: WeightedSum | Copy = WeightedSum(tuple(terms), "F64" if wide else "F32")
                reads = sorted({i for _, i in terms})
            else:
                odt, kernel, reads = meta.dtype, Copy(template), [template]
            order.append((tname, odt, meta.shape))
            key = (tname, meta.shape)
            task_reads, writes = tasks.setdefault(key, ([], []))
            task_reads.extend(r for r in reads if r not in task_reads)
            writes.append(TensorWrite(out_idx, odt, kernel))
        kind = "model" if node.kind.is_model else "delta"
        expr = graph.expressions[out_idx] if out_idx < len(graph.expressions) else ""
        outputs.append(PlannedOutput(name, kind, template, tuple(order), expr))

    planned_tasks = tuple(
        TensorTask(name, shape, tuple(sorted(reads)), tuple(writes))
        for (name, shape), (reads, writes) in tasks.items()
    )
    plan = Plan(tuple(inputs), tuple(outputs), planned_tasks, chunk or MAX_CHUNK, threads, memory)
    if chunk is None:
        per_element = max((bytes_per_element(plan, t) for t in planned_tasks), default=1)
        fit = memory // max(1, threads * per_element)
        chunk = max(MIN_CHUNK, min(MAX_CHUNK, fit // MIN_CHUNK * MIN_CHUNK))
        plan = Plan(plan.inputs, plan.outputs, plan.tasks, chunk, threads, memory)
    return plan


def _terms(node: Node, index: Mapping[str, int]) -> list[tuple[float, int]]:
    if node.op is Op.INPUT:
        return [(1.0, index[node.arg.key])]
    if node.op is Op.WSUM and all(a.op is Op.INPUT for a in node.args):
        return [(w, index[a.arg.key]) for w, a in zip(node.arg, node.args, strict=True)]
    raise AssertionError(f"no kernel for {node!r}: the passes should have linearised it")


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
