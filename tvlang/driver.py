"""Running a planned program: open its inputs, build its outputs' writers, execute, commit.

:class:`tvlang.api.Program` lowers and optimises; this module does everything that touches the
files from there on.  :func:`plan_program` opens every input (checkpoints, adapters, state dicts;
roots checked) and plans from their headers; :class:`PlanCache` keeps the last plan for a
repeated run; :func:`write_outputs` picks each output's destination, refuses any that would touch
an input (E502), makes the writers (files, directories, adapters, state dicts, a live model),
runs the plan on the chosen executor and commits every output or none.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvlang.backends.compiled import resolve_mode
from tvlang.backends.device import resolve_device
from tvlang.codegen.c import compiler
from tvlang.codegen.spec import eager_tasks
from tvlang.dtypes import FLOATS, TensorMeta
from tvlang.errors import TvInputError, TvOutputError, TvParamError
from tvlang.executors import executor_for
from tvlang.io import chat_template
from tvlang.io.card import CARD_NAME, hub_id
from tvlang.io.checkpoint import INDEX_NAME, Checkpoint, CheckpointWriter
from tvlang.io.endpoints import (
    CheckpointSource,
    IntoSink,
    MemorySink,
    MemorySource,
    RenamedSource,
    Sink,
    Source,
    all_or_none,
    checkpoint_metas,
    memory_metas,
)
from tvlang.io.lora import CONFIG as LORA_CONFIG
from tvlang.io.lora import LoraAdapter, LoraSource
from tvlang.io.overlap import InputFiles, refuse_overlap
from tvlang.io.safetensors import (
    MAX_HEADER_BYTES,
    check_free_space_together,
    parse_json_object,
    remove_stale_temporaries,
)
from tvlang.ir import Graph, InputRef, Node
from tvlang.ir.node import Origin
from tvlang.layermap import restacked_sidecars
from tvlang.lowering.adapters import AdapterSpec
from tvlang.lowering.lower import Lowered
from tvlang.options import Options
from tvlang.plan import Plan, build_plan, parse_dtype
from tvlang.runtime import Progress

# Imported where needed, not at every start: LoRA outputs and `vocab` statements are rare.
if TYPE_CHECKING:
    from tvlang.io.lora_out import LoraWriter
    from tvlang.io.vocab import VocabPlan

OutSpec = str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None
CardFor = Callable[[str, Mapping[str, float]], Any]  # (title, params) -> card(section, base) -> text


def _chat_template(
    plan: Plan,
    opened: Mapping[str, Any],
    options: Options,
    dests: Sequence[str | None],
    adapters: Mapping[str, AdapterSpec],
) -> str | None:
    """The chat template the run's model directories get (``Options.chat_template``; ``auto``
    looks at every input model directory), or None: none asked for, or ``auto`` found none.  An
    output written to files that cannot carry one (a single file, an adapter) is refused with E402
    before anything is written; results in memory have no tokenizer files to set it in."""
    if options.chat_template is None:
        return None
    for output, dest in zip(plan.outputs, dests, strict=True):
        if dest is not None and (output.name in adapters or dest.endswith(".safetensors")):  # (as the writer)
            kind = "a LoRA adapter" if output.name in adapters else "one .safetensors file"
            raise TvParamError(
                f"output {dest} is {kind}: it has no tokenizer files to carry a chat template",
                help="write the output as a model directory, or run without --chat-template",
                code="E402",
            )
    handles = [opened.get(inp.ref.base_key) for inp in plan.inputs]
    folders = [h.path for h in handles if isinstance(h, Checkpoint) and h.is_dir]
    return chat_template.choose(options.chat_template, folders)


def write_outputs(
    plan: Plan,
    opened: dict[str, Any],
    lowered: Lowered,
    options: Options,
    out: OutSpec,
    *,
    metadata: Mapping[str, str],
    card_for: CardFor,
    vocab: VocabPlan | None = None,
    adapters: Mapping[str, AdapterSpec] | None = None,
    bases: Mapping[str, Node] | None = None,
    targets: Mapping[str, Any] | None = None,
    into: Any = None,
) -> Any:
    """Write every output of ``plan`` (see :meth:`tvlang.api.Program.run` for ``out``, ``into``
    and the result): the outputs' files are complete and renamed into place, or none is.
    ``opened``: every input's handle, by key; ``adapters``/``bases``: outputs written as LoRA
    adapters and their base models; ``targets``: the tensors of the model ``into`` writes into."""
    adapters = adapters or {}
    bases = bases or {}
    dests = (adapter_destinations if adapters else destinations)(plan, out, opened)
    refuse_overwriting_inputs(plan, opened, dests)
    to_disk = [(d, o.nbytes) for d, o in zip(dests, plan.outputs, strict=True) if d is not None]
    for target, _ in to_disk:
        for stale, pid in remove_stale_temporaries(target):
            print(f"note: removed {stale}, left by an interrupted run (process {pid})", file=sys.stderr)
    check_free_space_together(to_disk)
    template_text = _chat_template(plan, opened, options, dests, adapters)
    sources: list[Source] = []
    sinks: list[Sink] = []
    # side files an output changes (tokenizer, config.json) wait here until the writer copies them
    edited_dir = tempfile.TemporaryDirectory(prefix="tvlang-sidecars-")
    extra_sources: list[Source] = []  # the adapters' base model, read for modules saved whole
    try:
        with all_or_none(sinks):
            sources.extend(_source(plan, i, opened, vocab) for i in range(len(plan.inputs)))
            for i, (output, dest) in enumerate(zip(plan.outputs, dests, strict=True)):
                params_used = lowered.output_params[i]
                meta = {
                    **metadata,
                    "tvlang.expression": output.expression,
                    "tvlang.output": output.name,
                    "tvlang.params": json.dumps(params_used, sort_keys=True),
                }
                if targets is not None:
                    sinks.append(IntoSink(targets, [name for name, _, _ in output.tensors]))
                    continue
                if dest is None:
                    sinks.append(MemorySink(output.tensors))
                    continue
                card = card_for(os.path.basename(dest.rstrip(os.sep)) or output.name, params_used)
                spec = adapters.get(output.name)
                if spec is not None:
                    base_node = bases[spec.base]
                    base = _open_base(base_node, opened, options)
                    extra_sources.append(
                        CheckpointSource(base) if isinstance(base, Checkpoint) else MemorySource(base)
                    )
                    sinks.append(
                        _adapter_writer(
                            dest,
                            output.tensors,
                            spec,
                            base_node,
                            base,
                            extra_sources[-1],
                            meta,
                            card,
                            options,
                        )
                    )
                    continue
                template = opened[plan.inputs[output.template].ref.base_key]
                sidecars = template.sidecar_files() if isinstance(template, Checkpoint) else []
                if vocab is not None and isinstance(template, Checkpoint) and template.is_dir:
                    sidecars = vocab.sidecars(sidecars, edited_dir.name)  # the new tokenizer and vocab_size
                if output.layers is not None:  # a stacked model: config.json says its depth
                    sidecars = restacked_sidecars(sidecars, output.layers, edited_dir)
                if template_text is not None:  # one folder per output: each keeps its files' names
                    folder = tempfile.mkdtemp(dir=edited_dir.name)
                    sidecars = chat_template.carry(sidecars, template_text, dest, folder)
                sinks.append(
                    CheckpointWriter(
                        dest,
                        output.tensors,
                        meta,
                        max_shard_bytes=options.shard_size,
                        sidecars=sidecars,
                        overwrite=options.overwrite,
                        config_dtype=_main_dtype(output.tensors),
                        generated=None if dest.endswith(".safetensors") else {CARD_NAME: card(None)},
                    )
                )
            progress = (
                Progress(plan.bytes_read + plan.bytes_written, sys.stderr) if options.progress else None
            )
            executor = executor_for(
                options.executor, device=resolve_device(options.device), address=options.address
            )
            report = executor.execute(plan, sources, sinks, progress=progress, nonfinite=options.nonfinite)
    finally:
        for source in [*sources, *extra_sources]:
            source.close()
        if vocab is not None:
            vocab.close()
        edited_dir.cleanup()
    if report:
        stderr = sys.stderr
        for line in report.lines():
            print(line, file=stderr)
    if options.progress and adapters:  # (only adapter outputs have a LoraWriter's summary)
        from tvlang.io.lora_out import LoraWriter

        for sink in sinks:
            for line in sink.summary() if isinstance(sink, LoraWriter) else ():
                print(line, file=sys.stderr)
    if into is not None:
        return into
    if all(d is None for d in dests):
        results = {o.name: s.result for o, s in zip(plan.outputs, sinks, strict=True)}  # type: ignore[attr-defined]
    else:
        results = {o.name: d for o, d in zip(plan.outputs, dests, strict=True)}
    return next(iter(results.values())) if len(results) == 1 else results


def _source(plan: Plan, index: int, opened: Mapping[str, Any], vocab: VocabPlan | None) -> Source:
    """What the runtime reads input ``index`` of ``plan`` through: its checkpoint, adapter or state
    dict, with rows re-indexed by token and tensors renamed where the plan says so."""
    inp = plan.inputs[index]
    handle = opened[inp.ref.base_key]
    source: Source
    if isinstance(handle, Checkpoint):
        source = CheckpointSource(handle)
    elif isinstance(handle, LoraAdapter):
        source = LoraSource(handle)
    else:
        source = MemorySource(handle)
    if vocab is not None:
        source = vocab.source(inp.ref, source)
    return source if inp.names is None else RenamedSource(source, inp.names)


class PlanCache:
    """The last plan of one program, reused by a run that changes nothing it was built from."""

    def __init__(self) -> None:
        self._last: _CachedPlan | None = None

    def get(
        self,
        written: Graph,
        options: Options,
        graph: Graph,
        tensor_dtypes: Mapping[str, str] | None,
    ) -> tuple[Plan, dict[str, Any]]:
        """:func:`_plan`, or the previous run's plan when nothing it was built from has changed: the
        graphs (parameter values and bindings are in them), the options, the targets' dtypes, the
        layout of in-memory inputs and the identity (device, inode, size, mtime) of every input file,
        so that an edited checkpoint is planned again.  A repeated run then skips reading the headers
        and looking the kernels up.  One plan is kept (a search with new values each trial misses)."""
        key = (
            written,
            graph,
            options,
            resolve_device(options.device),
            options.resolved_threads(),
            kernel_mode(options),
            tuple(sorted(tensor_dtypes.items())) if tensor_dtypes is not None else None,
            _memory_layout(written),
        )
        last, self._last = self._last, None
        known: dict[str, Checkpoint] = {}
        if last is not None:
            if last.key == key and _input_files(last.opened) == last.files:
                self._last = last
                return last.plan, last.opened
            # a new plan (new coefficients): the headers of unchanged files are not read again
            before = dict(last.files)
            for name, handle in last.opened.items():
                if isinstance(handle, Checkpoint) and all(
                    before.get(p) == ident for p, ident in _checkpoint_files(handle)
                ):
                    known[name] = handle
        plan, opened = plan_program(written, options, graph, None, tensor_dtypes, known)
        files = _input_files(opened)
        if files is not None:
            self._last = _CachedPlan(key, files, plan, opened)
        return plan, opened


def kernel_mode(options: Options) -> str:
    """The CPU kernels a run uses: ``auto`` is ``compiled`` where a C compiler is found."""
    mode = resolve_mode(options.kernels)
    if mode == "compiled" and compiler() is None:
        raise TvParamError(
            "compiled kernels need a C compiler, and none was found",
            help="install gcc or clang (or set CC), or use kernels=eager (--kernels eager)",
            code="E402",
        )
    return mode


def adapter_destinations(plan: Plan, out: OutSpec, opened: Mapping[str, Any]) -> list[str | None]:
    """An adapter is a directory; several outputs are directories inside ``out``, by output name."""
    if out is None:
        raise TvParamError(
            "--as-lora writes adapter directories: give an output path", help="e.g. -o adapter/", code="E408"
        )
    names = [o.name for o in plan.outputs]
    if isinstance(out, Mapping):
        dests = destinations(plan, out, opened)
    else:
        path = os.fspath(out)
        dests = [path] if len(names) == 1 else [os.path.join(path, n) for n in names]
    for dest in dests:
        if dest is not None and dest.endswith(".safetensors"):
            raise TvOutputError(
                f"a LoRA adapter is a directory ({LORA_CONFIG}, adapter_model.safetensors), not {dest}",
                help="give a directory path, e.g. -o adapter/",
                code="E505",
            )
    return list(dests)


def _open_base(base: Node, opened: dict[str, Any], options: Options) -> Checkpoint | Mapping[str, Any]:
    """The adapter's base: already open when the task vectors read it, else opened here (its weight
    may have cancelled out of every output)."""
    ref: InputRef = base.arg
    handle = opened.get(ref.key)
    if handle is None:
        if ref.origin is Origin.MEMORY:
            handle = ref.handle
        else:
            handle = Checkpoint.open(ref.path)
            if options.roots is not None:
                _check_inside_roots(handle, options.roots, ref)
        opened[ref.key] = handle
    assert isinstance(handle, (Checkpoint, Mapping))
    return handle


def _base_config(base: Checkpoint | Mapping[str, Any]) -> dict[str, Any]:
    """The base's ``config.json`` (model type and architecture decide PEFT's layout), or {}."""
    if not isinstance(base, Checkpoint):
        return {}
    for path in base.sidecar_files():
        if os.path.basename(path) == "config.json":
            try:
                with open(path, "rb") as f:
                    raw = f.read(MAX_HEADER_BYTES + 1)
            except OSError:
                return {}
            if len(raw) > MAX_HEADER_BYTES:
                return {}
            try:
                return parse_json_object(raw, path, "config")
            except TvInputError:
                return {}
    return {}


def _adapter_writer(
    dest: str | None,
    tensors: Sequence[tuple[str, str, tuple[int, ...]]],
    spec: AdapterSpec,
    base_node: Node,
    base: Checkpoint | Mapping[str, Any],
    source: Source,
    metadata: Mapping[str, str],
    card: Any,
    options: Options,
) -> LoraWriter:
    from tvlang.io.lora_out import AdapterLayout, LoraWriter

    assert dest is not None
    ref: InputRef = base_node.arg
    metas = checkpoint_metas(base) if isinstance(base, Checkpoint) else memory_metas(base, ref.label)
    layout = AdapterLayout.plan(
        tensors,
        spec.rank,
        base_dtypes={name: meta.dtype for name, meta in metas.items()},
        dtype=parse_dtype(options.dtype),
        config=_base_config(base),
    )
    location = base.path if isinstance(base, Checkpoint) else None
    base_id = location and (hub_id(location) or location)
    return LoraWriter(
        dest,
        layout,
        base=source,
        metadata={**metadata, "tvlang.lora.rank": str(spec.rank), "tvlang.lora.base": ref.label},
        config=layout.adapter_config(base_id),
        card=lambda section: card(section, base_id),
        svd=spec.svd,
        overwrite=options.overwrite,
    )


def _main_dtype(tensors: Sequence[tuple[str, str, Sequence[int]]]) -> str | None:
    """The float dtype of most of an output's elements: what its config.json should say."""
    count: dict[str, int] = {}
    for _, dtype, shape in tensors:
        if dtype in FLOATS:
            count[dtype] = count.get(dtype, 0) + math.prod(shape)
    return max(count, key=count.__getitem__) if count else None


def vocab_plan(lowered: Lowered, graph: Graph, options: Options) -> VocabPlan | None:
    """The output vocabulary and each model's row map, for a program with a `vocab` statement."""
    if lowered.vocab is None:
        return None
    roots = options.roots

    def check(ref: InputRef, ckpt: Checkpoint) -> None:
        if roots is not None:
            _check_inside_roots(ckpt, roots, ref)

    from tvlang.io.vocab import VocabPlan

    return VocabPlan(lowered.vocab, graph.inputs(), check)


@dataclass(frozen=True)
class _CachedPlan:
    """A plan with what it was built from (:class:`PlanCache`)."""

    key: tuple[Any, ...]
    files: tuple[tuple[str, tuple[int, int, int, int] | None], ...]
    plan: Plan
    opened: dict[str, Any]


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _checkpoint_files(ckpt: Checkpoint) -> list[tuple[str, tuple[int, int, int, int] | None]]:
    """The files a checkpoint's headers came from (a directory, its index, its shards), each with
    its identity now."""
    index = [os.path.join(ckpt.path, INDEX_NAME)] if ckpt.is_dir else []
    return [(p, _file_identity(p)) for p in dict.fromkeys([ckpt.path, *index, *ckpt.files])]


def _input_files(
    opened: Mapping[str, Any],
) -> tuple[tuple[str, tuple[int, int, int, int] | None], ...] | None:
    """Each input file (a directory, its index and shards too) with its identity now; None when an
    input is neither a checkpoint nor in memory (an adapter: not cached)."""
    found: list[tuple[str, tuple[int, int, int, int] | None]] = []
    for _, handle in sorted(opened.items(), key=lambda kv: kv[0]):
        if isinstance(handle, Checkpoint):
            found.extend(_checkpoint_files(handle))
        elif not isinstance(handle, Mapping):
            return None
    return tuple(found)


def _memory_layout(graph: Graph) -> tuple[Any, ...]:
    """Names, dtypes, shapes and devices of the in-memory inputs' tensors: what planning reads of them."""
    return tuple(
        (
            ref.key,
            tuple(
                (
                    str(k),
                    type(v).__name__,
                    getattr(v, "dtype", None),
                    tuple(getattr(v, "shape", ())),
                    str(getattr(v, "device", "")),
                )
                for k, v in ref.handle.items()
            ),
        )
        for ref in graph.inputs()
        if isinstance(ref.handle, Mapping)
    )


def plan_program(
    written: Graph,
    options: Options,
    graph: Graph,
    vocab: VocabPlan | None,
    tensor_dtypes: Mapping[str, str] | None = None,
    known: Mapping[str, Checkpoint] | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Plan ``graph``, the program ``written`` after the passes; ``opened`` holds every input's
    handle, the ones whose weights folded to zero included (opened and checked, never read).
    ``tensor_dtypes``: each named tensor's output dtype (a model merged into keeps its own).
    ``known``: checkpoints already opened, by key, whose files have not changed since."""
    opened: dict[str, Any] = {}
    device = resolve_device(options.device)
    on_cuda = device == "cuda"

    def open_input(ref: InputRef) -> tuple[str, Mapping[str, TensorMeta], bool]:
        location, metas, sparse = _open(ref)
        return location, metas if vocab is None else vocab.metas(ref, metas), sparse

    def _open(ref: InputRef) -> tuple[str, Mapping[str, TensorMeta], bool]:
        if ref.origin is Origin.MEMORY:
            opened[ref.key] = ref.handle
            if on_cuda:  # tensors already on the GPU are read in place
                return "memory", memory_metas(ref.handle, ref.label, "cuda"), False
            return "memory", memory_metas(ref.handle, ref.label), False
        if ref.origin is Origin.ADAPTER:
            adapter = LoraAdapter.open(ref.path)
            opened[ref.key] = adapter
            return adapter.path, adapter.metas(), True
        ckpt = (known or {}).get(ref.key) or Checkpoint.open(ref.path)
        if options.roots is not None:
            _check_inside_roots(ckpt, options.roots, ref)
        opened[ref.key] = ckpt
        return ref.key, checkpoint_metas(ckpt), False

    plan = build_plan(
        graph,
        open_input,
        dtype=options.dtype,
        memory=options.memory,
        threads=options.resolved_threads(),
        chunk=options.chunk,
        keys=options.keys,
        rows=options.rows,
        kernels=kernel_mode(options),
        # with a vocabulary, rows are re-indexed for the models merged; one whose weight folded to
        # zero has no row map to compare its embeddings through, so only merged models are checked
        written=written if vocab is None else None,
        tensor_dtypes=tensor_dtypes,
        device=device,
    )
    if device != "cpu" or plan.kernels == "compiled":  # which tensors no generated kernel computes
        plan = replace(plan, eager=eager_tasks(plan, "c" if device == "cpu" else "triton"))
    return plan, opened


def _check_inside_roots(ckpt: Checkpoint, roots: Sequence[str], ref: InputRef) -> None:
    """Every file a checkpoint directory reads or carries over must resolve inside the roots too,
    so a symlinked shard or config.json cannot pull in a file from elsewhere."""
    allowed = [Path(r).resolve() for r in roots]
    for path in [*ckpt.files, *ckpt.sidecar_files()]:
        real = Path(path).resolve()
        if not any(real.is_relative_to(r) for r in allowed):
            raise TvInputError(
                f"{path} is outside the directories this program may read",
                ref.span,
                label=f"this checkpoint's file resolves to {real}",
                help="allowed: " + ", ".join(str(r) for r in allowed),
                code="E305",
            )


def destinations(plan: Plan, out: OutSpec, opened: Mapping[str, Any]) -> list[str | None]:
    names = [o.name for o in plan.outputs]
    if out is None:
        return [None] * len(names)
    if isinstance(out, Mapping):
        unknown = [k for k in out if k not in names]
        if unknown:
            raise TvParamError(
                f"no output named `{unknown[0]}`", help="outputs: " + ", ".join(names), code="E405"
            )
        missing = [n for n in names if n not in out]
        if missing:
            raise TvParamError(f"no destination for output `{missing[0]}`", code="E405")
        return [os.fspath(out[n]) for n in names]
    path = os.fspath(out)
    if len(names) == 1:
        return [path]
    if path.endswith(".safetensors"):
        raise TvOutputError(
            f"this program has {len(names)} outputs ({', '.join(names)}); {path} can hold only one",
            help="give a directory: each output is written inside it under its name",
            code="E501",
        )
    dests: list[str | None] = []
    for output in plan.outputs:
        template = opened[plan.inputs[output.template].ref.base_key]
        as_dir = isinstance(template, Checkpoint) and template.is_dir
        dests.append(os.path.join(path, output.name if as_dir else output.name + ".safetensors"))
    return dests


def refuse_overwriting_inputs(plan: Plan, opened: Mapping[str, Any], dests: Sequence[str | None]) -> None:
    """E502 before anything is opened for writing: no output may create, replace or delete a file
    of any input (those whose weights folded to zero included)."""
    inputs = []
    for inp in (*plan.inputs, *plan.checked):
        handle = opened[inp.ref.base_key]
        if isinstance(handle, Checkpoint):
            index = [os.path.join(handle.path, INDEX_NAME)] if handle.is_dir else []
            files = [*handle.files, *handle.sidecar_files(), *index]
            inputs.append(
                InputFiles(inp.ref.label, files, handle.path if handle.is_dir else None, inp.ref.span)
            )
        elif isinstance(handle, LoraAdapter):
            inputs.append(InputFiles(inp.ref.label, handle.files(), handle.path, inp.ref.span))
    for dest in dests:
        if dest is not None:
            refuse_overlap(dest, inputs)
