"""IR graph + checkpoint headers → :class:`~tvlang.plan.plan.Plan`.

Reads headers only (through the ``open_input`` callback); every mismatch is a
positioned error that names the tensor and both inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from tvlang.context import TensorContext, count_layers, layer_of
from tvlang.dtypes import FLOATS, OUTPUT_NAMES, WIDE, TensorMeta
from tvlang.errors import TvInputError, TvParamError
from tvlang.ir.node import Graph, InputRef, Node, Op, scalar_value, toposort
from tvlang.layermap import output_order
from tvlang.options import DEFAULT_MEMORY, KEY_POLICIES
from tvlang.passes.linearize import anchor_of, is_difference
from tvlang.passes.specialize import has_context, has_stack, specialize
from tvlang.plan.plan import (
    BLOCK,
    GPU_DEVICES,
    SLOTS,
    Copy,
    Kernel,
    ModelReduction,
    Plan,
    PlannedInput,
    PlannedOutput,
    ProgramOutput,
    TensorTask,
    TensorWrite,
    WeightedSum,
    bytes_per_element,
    gpu_bytes_per_element,
    row_length,
)
from tvlang.plan.tensor_program import TensorProgram, compile_program
from tvlang.source import Span

# ref -> (location, tensors, sparse): a sparse input is a task vector that is zero where it has no tensor
OpenInput = Callable[[InputRef], tuple[str, Mapping[str, TensorMeta], bool]]

MAX_CHUNK = 1 << 20  # elements; eager chunked kernels were fastest at 256K–1M (measured)
MIN_CHUNK = 1 << 12
PROGRAM_CHUNK = 1 << 18  # elements; an eager program's many per-op temporaries stay in cache


def parse_dtype(name: str | None) -> str | None:
    """``"bf16"`` → ``"BF16"``; None stays None (keep each tensor's template dtype)."""
    if name is None:
        return None
    code = OUTPUT_NAMES.get(str(name).lower().removeprefix("torch."))
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
    keys: str = "exact",
    rows: str = "exact",
    kernels: str = "eager",
    written: Graph | None = None,
    tensor_dtypes: Mapping[str, str] | None = None,
    device: str = "cpu",
) -> Plan:
    """``tensor_dtypes``: the output dtype of named float tensors, before ``dtype`` (a model being
    merged into has its own).  ``keys``: ``exact`` (every input of an output holds the same tensor names, else E303),
    ``intersection`` (only the names all of them hold) or ``union`` (every name any holds; a model
    that lacks a tensor counts as the first input that has it, so its task vector is zero there,
    and a stored task vector that lacks one is zero there).  ``rows``: ``exact`` (shapes must match,
    else E304) or ``common`` (tensors whose shapes differ only in their first dimension, such as
    embeddings over a resized vocabulary, merge the rows every input has).

    ``written`` is the program before the passes: an input it names whose weight folded to zero
    (``base + (ft - base)``) is still opened and checked against the others, from its header
    only, because a task vector exists only between models of one architecture.

    ``device``: ``cpu``, or ``cuda``/``interpret`` (the GPU backend, on a GPU or in Triton's
    interpreter), whose chunks each fill a staging slot's share of the memory budget (``gpu_chunk``);
    a ``chunk`` given by the caller wins on every device."""
    if rows not in ("exact", "common"):
        raise TvParamError(f"unknown row policy {rows!r}", help="choose exact or common", code="E402")
    if keys not in KEY_POLICIES:
        raise TvParamError(
            f"unknown key policy {keys!r}", help="choose one of " + ", ".join(KEY_POLICIES), code="E402"
        )
    out_dtype = parse_dtype(dtype)
    refs = graph.inputs()
    index = {ref.key: i for i, ref in enumerate(refs)}
    inputs = []
    opened: dict[str, tuple[str, Mapping[str, TensorMeta], bool]] = {}  # a checkpoint read through views
    for ref in refs:
        base = ref if ref.view is None else replace(ref, key=ref.base_key, view=None)
        try:
            if base.key not in opened:
                opened[base.key] = open_input(base)
            location, tensors, sparse = opened[base.key]
        except TvInputError as err:
            if err.span is None and ref.span is not None:
                err.span = ref.span
            raise
        if ref.view is None:
            inputs.append(PlannedInput(ref, location, tensors, sparse))
        else:
            inputs.append(_view_input(ref, location, tensors, sparse))
    folded = _folded_inputs(written, index, open_input)
    checked = {key: len(inputs) + i for i, key in enumerate(folded)}
    validate = [*inputs, *folded.values()]

    outputs: list[PlannedOutput] = []
    # (tensor name, shape) -> reads, writes, generic roots (for a program)
    tasks: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[TensorWrite], list[Node]]] = {}
    for out_idx, (name, node) in enumerate(graph.outputs):
        used = _inputs_of(node, index)
        dense = [i for i in used if not inputs[i].sparse]
        used = dense + [i for i in used if inputs[i].sparse]
        template = used[0]
        if inputs[template].sparse:
            raise TvInputError(
                f"output `{name}` reads only adapters, which hold just the layers they change",
                inputs[template].ref.span,
                help='add the adapter to the model it was trained on: `base + lora("path")`',
                code="E303",
            )
        stacked = has_stack(node)  # layer ranges: each tensor reads the inputs its slice maps it to
        if not stacked:
            _check_compatible(inputs, used, names=keys == "exact", common_rows=rows == "common")
        if written is not None and not stacked:
            cancelled = [checked[r.key] for r in _refs_of(written.outputs[out_idx][1]) if r.key in checked]
            _check_compatible(
                validate, [template, *cancelled], names=keys == "exact", common_rows=rows == "common"
            )
        per_tensor = has_context(node)  # weights that depend on the tensor's name or layer
        names = _stacked_names(inputs, used) if stacked else _tensor_names(inputs, used, keys)
        num_layers = count_layers(names if stacked else inputs[template].tensors)
        input_nodes = {index[n.arg.key]: n for n in node.toposort() if n.op is Op.INPUT}
        order = []
        layer_sources: dict[int, list[tuple[int, int]]] = {}
        for tname in names:
            if stacked:
                tctx = TensorContext(tname, num_layers)
                tensor_node = specialize(node, tctx)
                reads = _inputs_of(tensor_node, index)
                _check_slice(inputs, reads, tname)
                # the inputs it reads that hold it; when its weights fold to zero (a `scale` of 0),
                # the slice's input that holds it gives its shape
                present = [i for i in reads if tname in inputs[i].tensors]
                present = present or [next(i for i in used if tname in inputs[i].tensors)]
                if len(present) < len(reads):  # adapters that leave this tensor alone: zero there
                    lacking = {id(input_nodes[i]): _stand_in(input_nodes[i], input_nodes[present[0]])
                               for i in reads if i not in present}  # fmt: skip
                    tensor_node = specialize(node, tctx, lacking)
                _note_sources(layer_sources, inputs, present, tname)
            else:
                present = [i for i in used if tname in inputs[i].tensors]
            meta = inputs[present[0]].tensors[tname]
            metas = [inputs[i].tensors[tname] for i in present]
            if rows == "common" and meta.shape:  # the rows every input has: a prefix of each
                meta = TensorMeta(meta.dtype, (min(m.shape[0] for m in metas), *meta.shape[1:]))
            task_reads, writes, roots = tasks.setdefault((tname, meta.shape), ([], [], []))
            if meta.dtype in FLOATS:
                absent = {} if stacked else {id(input_nodes[i]): _stand_in(input_nodes[i], input_nodes[present[0]])
                          for i in used if i not in present}  # fmt: skip
                if not stacked:
                    tensor_node = node
                    if per_tensor or absent:
                        tensor_node = specialize(node, TensorContext(tname, num_layers), absent)
                per_tensor_reads = per_tensor or bool(absent)
                terms = _terms(tensor_node, index)
                odt = (tensor_dtypes or {}).get(tname) or out_dtype or meta.dtype
                wide = any(m.dtype in WIDE for m in metas) or odt in WIDE
                kernel: Kernel
                if terms is not None:
                    kernel = WeightedSum(tuple(terms), "F64" if wide else "F32")
                else:
                    kernel = ProgramOutput(len(roots))
                    roots.append(tensor_node)
                reads = _inputs_of(tensor_node, index) if per_tensor_reads else used
            else:
                odt, kernel, reads = meta.dtype, Copy(present[0]), [present[0]]
            order.append((tname, odt, meta.shape))
            task_reads.extend(r for r in reads if r not in task_reads)
            writes.append(TensorWrite(out_idx, odt, kernel))
        kind = "model" if node.kind.is_model else "delta"
        expr = graph.expressions[out_idx] if out_idx < len(graph.expressions) else ""
        layers = None
        if stacked:
            layers = tuple(tuple(layer_sources.get(k, ())) for k in range(num_layers))
        outputs.append(PlannedOutput(name, kind, template, tuple(order), expr, layers))

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
    on_gpu = device in GPU_DEVICES
    if chunk is not None:
        # Reductions sum fixed blocks, so their chunks hold whole blocks (the bits never depend on chunking).
        final = tuple(_aligned(t, chunk, kernels) for t in planned_tasks)
    elif on_gpu:
        chunk = gpu_chunk(memory, max((gpu_bytes_per_element(plan, t) for t in planned_tasks), default=1))
        final = tuple(
            _gpu_aligned(t, gpu_chunk(memory, gpu_bytes_per_element(plan, t))) for t in planned_tasks
        )
    else:
        per_element = max((bytes_per_element(plan, t) for t in planned_tasks), default=1)
        fit = memory // max(1, threads * per_element)
        chunk = max(MIN_CHUNK, min(MAX_CHUNK, fit // MIN_CHUNK * MIN_CHUNK))
        final = tuple(_aligned(t, chunk, kernels) for t in planned_tasks)
    globals_ = tuple(_model_reduction(i, n, final) for i, n in enumerate(global_nodes))
    return Plan(
        plan.inputs,
        plan.outputs,
        final,
        chunk,
        threads,
        memory,
        globals_,
        kernels,
        tuple(folded.values()),
        device if on_gpu else "cpu",
    )


def gpu_chunk(memory: int, per_element: int) -> int:
    """Elements per GPU chunk: as many as fit one of ``SLOTS`` staging slots' share of the memory
    budget, a whole number of reduction blocks (at least one)."""
    return max(BLOCK, memory // (SLOTS * max(1, per_element)) // BLOCK * BLOCK)


def _gpu_aligned(task: TensorTask, chunk: int) -> TensorTask:
    """A GPU chunk (already whole blocks) rounded up to whole rows where the program works by rows."""
    if task.program is not None and task.program.row_wise:
        unit = math.lcm(BLOCK, row_length(task.shape))
        chunk = -(-chunk // unit) * unit
    return replace(task, chunk=chunk)


def _refs_of(node: Node) -> list[InputRef]:
    return [n.arg for n in node.toposort() if n.op is Op.INPUT]


def _folded_inputs(
    written: Graph | None, index: Mapping[str, int], open_input: OpenInput
) -> dict[str, PlannedInput]:
    """The inputs ``written`` names that the optimised graph (``index``) no longer reads, opened
    (headers only)."""
    folded: dict[str, PlannedInput] = {}
    if written is None:
        return folded
    for ref in written.inputs():
        if ref.key in index or ref.key in folded or ref.view is not None:
            continue
        folded[ref.key] = _open(ref, open_input)
    return folded


def _open(ref: InputRef, open_input: OpenInput) -> PlannedInput:
    """An input's headers; errors without a position point at its ``load()``."""
    try:
        location, tensors, sparse = open_input(ref)
    except TvInputError as err:
        if err.span is None and ref.span is not None:
            err.span = ref.span
        raise
    return PlannedInput(ref, location, tensors, sparse)


def _model_reduction(key: int, node: Node, tasks: Sequence[TensorTask]) -> ModelReduction:
    """A model-wide k-th largest: which tensors feed it and k, from the headers."""
    users = []
    for i, t in enumerate(tasks):
        if t.program is None:
            continue
        for ins in t.program.instrs:
            if ins.op == "global" and ins.attr == key:
                # lowering guarantees both (tvlang.lowering.methods.magnitude_prune): no per-tensor statistic
                # feeds a model-wide one, and its density is a constant
                assert t.program.instrs[ins.args[0]].need == 0
                users.append((i, ins.args[0]))
    density = scalar_value(node.args[1])
    assert density is not None
    total = sum(tasks[i].numel for i, _ in users)
    return ModelReduction(key, tuple(users), math.floor(density * total), total)


def _aligned(task: TensorTask, chunk: int, kernels: str) -> TensorTask:
    """Reductions sum fixed blocks and row-wise operations need whole rows: round the chunk up so
    that every chunk starts on a block (and a row) boundary."""
    if task.program is not None and kernels == "eager":
        # Eager element-wise programs run many ops per chunk, each with small temporaries:
        # chunks of 256K elements keep them in cache and the allocator's footprint small.  A
        # compiled program holds no temporaries, and its larger chunks halve the page-dropping
        # calls (each one interrupts the other cores: TIES ran 10-15 % faster at 1M).
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
    """The inputs an output reads, in first-use order, its anchor first (the first is its template)."""
    seen: list[int] = []
    for n in node.toposort():
        if n.op is Op.INPUT and index[n.arg.key] not in seen:
            seen.append(index[n.arg.key])
    anchor = anchor_of(node)
    if anchor is not None and anchor.op is Op.INPUT:  # the base: its layout is the output's
        first = index[anchor.arg.key]
        seen = [first] + [i for i in seen if i != first]
    return seen


def _terms(node: Node, index: Mapping[str, int]) -> list[tuple[float, int, int | None]] | None:
    """The weighted sum an output is, if it is one over inputs and their differences (the fast
    path); else None."""
    pairs = zip(node.arg, node.args, strict=True) if node.op is Op.WSUM else [(1.0, node)]
    terms = []
    for w, a in pairs:
        term = _term(w, a, index)
        if term is None:
            return None
        terms.append(term)
    return terms


def _term(weight: float, node: Node, index: Mapping[str, int]) -> tuple[float, int, int | None] | None:
    if node.op is Op.INPUT:
        return (weight, index[node.arg.key], None)
    if is_difference(node) and all(a.op is Op.INPUT for a in node.args):
        return (weight, index[node.args[0].arg.key], index[node.args[1].arg.key])
    return None


def _tensor_names(inputs: list[PlannedInput], used: list[int], keys: str) -> list[str]:
    """An output's tensors, in the template's order (then, for a union, each other input's new ones)."""
    names = list(inputs[used[0]].tensors)
    if keys == "intersection":
        return [n for n in names if all(n in inputs[i].tensors for i in used)]
    if keys == "union":
        seen = set(names)
        for i in used[1:]:
            for n in inputs[i].tensors:
                if n not in seen:
                    seen.add(n)
                    names.append(n)
    return names


def _view_input(
    ref: InputRef, location: str, tensors: Mapping[str, TensorMeta], sparse: bool
) -> PlannedInput:
    """A checkpoint seen through a layer range: its tensors under the output's names.  A range
    outside the model is an error (E310) at the ``layers()`` call, naming the model's depth."""
    view = ref.view
    assert view is not None
    depth = count_layers(tensors)
    if not sparse and view.hi > depth:
        raise TvInputError(
            f"layers {view.lo}..{view.hi} are outside `{ref.label}`, which has {depth} layer"
            + ("s" if depth != 1 else "")
            + (f" (0..{depth})" if depth else ""),
            view.span or ref.span,
            label=f"`{ref.label}` has {depth} layers",
            notes=(f"{ref.label}: {location}",),
            help=f"a range is start..stop with stop <= {depth}"
            if depth
            else "this model has no numbered layers",
            code="E313",
        )
    presented = view.present(tensors)
    return PlannedInput(
        ref,
        location,
        {out: meta for out, (_, meta) in presented.items()},
        sparse,
        {out: src for out, (src, _) in presented.items()},
    )


def _stacked_names(inputs: list[PlannedInput], used: list[int]) -> list[str]:
    """A stacked output's tensors: every name its slices present, in model order (embeddings first,
    then layer by layer, then the rest; within a layer, in the first input's order)."""
    names: dict[str, None] = {}
    for i in used:
        names.update(dict.fromkeys(inputs[i].tensors))
    return output_order(list(names))


def _check_slice(inputs: list[PlannedInput], reads: list[int], tname: str) -> None:
    """The inputs one tensor of a stacked output reads must all hold it, with one shape."""
    holders = [i for i in reads if tname in inputs[i].tensors]
    if not holders:
        return
    first = inputs[holders[0]]
    for i in reads:
        other = inputs[i]
        if other.sparse:
            continue
        if tname not in other.tensors:
            source = first.names.get(tname, tname) if first.names else tname
            raise TvInputError(
                f"tensor `{tname}` of the output (`{source}` of `{first.ref.label}`) has no counterpart in "
                f"`{other.ref.label}`",
                _view_span(other),
                label="this input",
                notes=(f"{first.ref.label}: {first.location}", f"{other.ref.label}: {other.location}"),
                help="the models combined in one slice need the same architecture",
                code="E303",
            )
        if other.tensors[tname].shape != first.tensors[tname].shape:
            raise TvInputError(
                f"tensor `{tname}` has shape {list(first.tensors[tname].shape)} in `{first.ref.label}` "
                f"but {list(other.tensors[tname].shape)} in `{other.ref.label}`",
                _view_span(other),
                label="this input",
                code="E304",
            )


def _view_span(inp: PlannedInput) -> Span | None:
    return inp.ref.view.span if inp.ref.view is not None and inp.ref.view.span is not None else inp.ref.span


def _note_sources(
    layer_sources: dict[int, list[tuple[int, int]]], inputs: list[PlannedInput], reads: list[int], tname: str
) -> None:
    """Record which input layers an output layer reads (for the plan's layer map and config.json)."""
    layer = layer_of(tname)
    if layer < 0:
        return
    pairs = layer_sources.setdefault(layer, [])
    for i in reads:
        names = inputs[i].names
        source = layer_of(names.get(tname, tname) if names else tname)
        if (i, source) not in pairs:
            pairs.append((i, source))


def _stand_in(missing: Node, present: Node) -> Node:
    """What an input that lacks a tensor contributes under the union policy: a model counts as the
    first input that has it (so its task vector is zero), a stored task vector as zero."""
    if missing.kind.is_model and present.kind.is_model:
        return present
    return Node(Op.WSUM, (), (), missing.kind)


def _rows_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Shapes that differ only in their first dimension (an embedding or head over a resized vocabulary)."""
    return len(a) == len(b) >= 1 and a[1:] == b[1:] and a[0] != b[0]


def _check_compatible(
    inputs: list[PlannedInput], used: list[int], *, names: bool = True, common_rows: bool = False
) -> None:
    """The inputs of one output must agree on the shapes of the tensors they share, and (unless
    ``names`` is off, for the union and intersection policies) hold the same tensor names."""
    ref = inputs[used[0]]
    for i in used[1:]:
        other = inputs[i]
        missing = [] if other.sparse else [n for n in ref.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in ref.tensors]
        if (names or other.sparse) and (missing or extra):
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
            if name not in other.tensors:
                continue
            theirs = other.tensors[name]
            if theirs.shape != meta.shape and not (common_rows and _rows_only(theirs.shape, meta.shape)):
                raise TvInputError(
                    f"tensor `{name}` has shape {list(meta.shape)} in `{ref.ref.label}` "
                    f"but {list(theirs.shape)} in `{other.ref.label}`",
                    other.ref.span,
                    label="this input",
                    notes=(f"{ref.ref.label}: {ref.location}", f"{other.ref.label}: {other.location}"),
                    help="they differ only in their rows (a resized vocabulary?): `--rows common` merges the rows "
                    "every input has"
                    if _rows_only(theirs.shape, meta.shape)
                    else None,
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
