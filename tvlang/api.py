"""The Python interface: compile once, plan, explain, run many times.

>>> import torch, tvlang
>>> base = {"w": torch.tensor([1.0, 2.0])}
>>> ft = {"w": torch.tensor([3.0, 2.0])}
>>> out = tvlang.evaluate("base + 0.5*tau", bindings={"base": base, "tau": tvlang.task_vector(ft)})
>>> out["w"].tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tvlang.adapters import AdapterSpec, check_adapter, strip_adapters
from tvlang.backends.compiled import KERNEL_MODES, c_kernel_sources, resolve_mode
from tvlang.backends.device import resolve_device
from tvlang.codegen.c import compiler
from tvlang.dtypes import FLOATS
from tvlang.errors import TvError, TvInputError, TvNameError, TvOutputError, TvParamError
from tvlang.executors import check_executor, executor_for
from tvlang.io.card import CARD_NAME, CardInput, hub_id, model_card
from tvlang.io.checkpoint import INDEX_NAME, Checkpoint, CheckpointWriter
from tvlang.io.endpoints import (
    CheckpointSource,
    IntoSink,
    MemorySink,
    MemorySource,
    RenamedSource,
    Sink,
    Source,
    check_into,
    checkpoint_metas,
    into_dtypes,
    into_tensors,
    memory_metas,
)
from tvlang.io.lora import CONFIG as LORA_CONFIG
from tvlang.io.lora import LoraAdapter, LoraSource
from tvlang.io.lora_out import AdapterLayout, LoraWriter
from tvlang.io.overlap import InputFiles, refuse_overlap
from tvlang.io.safetensors import (
    MAX_HEADER_BYTES,
    check_free_space_together,
    parse_json_object,
    remove_stale_temporaries,
)
from tvlang.io.vocab import VocabPlan
from tvlang.ir import Graph, InputRef, Node, Op, format_graph
from tvlang.ir.build import sub
from tvlang.ir.node import LORA_KEY
from tvlang.layermap import restacked_sidecars
from tvlang.lower import Bound, Lowered, ParamValue, lower
from tvlang.passes import STAGES, optimize, stages
from tvlang.plan import DEFAULT_MEMORY, Plan, TensorMeta, build_plan, parse_dtype
from tvlang.runtime import Progress, check_nonfinite_mode
from tvlang.source import Source as TextSource
from tvlang.source import Span
from tvlang.syntax import ast
from tvlang.syntax.parser import parse
from tvlang.version import __version__

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "--memory") -> int:
    """``512M``, ``2G``, ``1.5GiB`` or plain bytes → bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise TvParamError(
            f"{what} {text!r} is not a size", help="write e.g. 512M, 2G or 1073741824", code="E402"
        )
    scale = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Options:
    """How to run a program; shared by the CLI and the Python API."""

    dtype: str | None = (
        None  # output dtype for float tensors (default: each tensor's dtype in the template input)
    )
    memory: int = DEFAULT_MEMORY  # working-memory budget in bytes; sets the chunk size
    threads: int | None = None  # worker threads (default: the CPUs this process may use)
    chunk: int | None = None  # elements per chunk (default: from the memory budget)
    shard_size: int = 5 * 2**30  # largest output shard of a Hugging Face directory, bytes
    overwrite: bool = False  # replace an existing output (only once the new one is complete)
    progress: bool = False  # a progress line with throughput on stderr
    roots: tuple[str, ...] | None = None  # if set, load() may only read below these directories
    keys: str = "exact"  # tensor names across an output's inputs: exact (else E303), intersection or union
    rows: str = "exact"  # shapes differing only in rows (resized vocabularies): exact (else E304) or common
    # NaN/±inf in inputs (E308) and overflow to ±inf in the output dtype (E309): "error" stops the
    # run and writes nothing, "warn" writes and prints one line per tensor on stderr, "propagate" writes
    nonfinite: str = "error"
    # Where the kernels run: "cpu", "cuda" (generated Triton kernels, streamed through the GPU; see
    # docs/gpu.md) or "auto" (cuda when a CUDA device and Triton are there, else cpu)
    device: str = "cpu"
    # CPU kernels: "auto" (fused loops compiled by the system C compiler when there is one, else
    # "eager"), "compiled" (error without a compiler) or "eager" (torch, op by op); same results
    kernels: str = "auto"
    # Where the tasks run: "local" (this process's threads or GPU) or "ray" (units of whole output
    # shards as tasks on a Ray cluster, the same bits; docs/distributed.md); ``address``: the cluster
    # to join ("auto": the one running here; None: the one this process joined, else $RAY_ADDRESS,
    # else a local one for the run)
    executor: str = "local"
    address: str | None = None
    # Write each output as a PEFT LoRA adapter of this rank (a directory; docs/language.md, "LoRA
    # adapters out"): its task vector (a model output minus `lora_base`) factored per 2-D weight
    as_lora: int | None = None
    lora_base: str = "base"  # the name (in the program or its bindings) of the adapter's base model
    lora_svd: str = "auto"  # auto (randomized for large matrices), exact or randomized

    def resolved_kernels(self) -> str:
        if self.kernels not in KERNEL_MODES:
            raise TvParamError(
                f"unknown kernel mode {self.kernels!r}", help="choose auto, compiled or eager", code="E402"
            )
        mode = resolve_mode(self.kernels)
        if mode == "compiled" and compiler() is None:
            raise TvParamError(
                "compiled kernels need a C compiler, and none was found",
                help="install gcc or clang (or set CC), or use kernels=eager (--kernels eager)",
                code="E402",
            )
        return mode

    def resolved_threads(self) -> int:
        if self.threads is not None:
            if self.threads < 1:
                raise TvParamError(f"threads must be at least 1, not {self.threads}", code="E402")
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)


def task_vector(finetuned: Any, base: str = "base") -> Bound:
    """Bind a fine-tuned checkpoint as its task vector: ``finetuned - <base>``, where ``base`` names another binding."""
    return Bound(_as_value(finetuned), "task", base)


def delta(stored: Any) -> Bound:
    """Bind a stored task vector (a checkpoint that already holds fine-tuned minus base)."""
    return Bound(_as_value(stored), "delta")


def _as_value(value: Any) -> Any:
    if hasattr(value, "state_dict") and callable(value.state_dict):  # an nn.Module
        return value.state_dict()
    return value


def _as_bound(value: Any) -> Bound:
    if isinstance(value, Bound):
        return value
    if isinstance(value, bool):
        raise TvParamError("a binding cannot be a bool", code="E403")
    if isinstance(value, (int, float)):
        return Bound(float(value), "scalar")
    value = _as_value(value)
    if isinstance(value, (str, os.PathLike, Mapping)):
        return Bound(value, "model")
    raise TvParamError(
        f"cannot bind a {type(value).__name__}: use a path, a state dict, an nn.Module or a number",
        code="E403",
    )


OutSpec = str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None


class Program:
    """A parsed program.  Lowering, planning and running take parameters and bindings each time,
    so one compiled program serves a whole sweep."""

    def __init__(self, syntax: ast.Program, bindings: Mapping[str, Any] | None = None) -> None:
        self.syntax, self.adapters = strip_adapters(syntax)  # as_lora(...) outputs: written as adapters
        self.bindings = {k: _as_bound(v) for k, v in (bindings or {}).items()}
        self.mergekit_config: str | None = None  # the mergekit YAML it was translated from, for the card
        self._last_plan: _CachedPlan | None = None  # see _planned

    @property
    def source(self) -> str:
        return self.syntax.source.text

    def lower(
        self,
        params: Mapping[str, ParamValue] | None = None,
        bindings: Mapping[str, Any] | None = None,
        options: Options | None = None,
    ) -> Lowered:
        merged = {**self.bindings, **{k: _as_bound(v) for k, v in (bindings or {}).items()}}
        roots = (options or Options()).roots
        return lower(self.syntax, params=params, bindings=merged, roots=roots)

    def graph(
        self,
        params: Mapping[str, ParamValue] | None = None,
        bindings: Mapping[str, Any] | None = None,
        *,
        optimized: bool = True,
    ) -> Graph:
        graph = self.lower(params, bindings).graph
        return optimize(graph) if optimized else graph

    def plan(
        self,
        params: Mapping[str, ParamValue] | None = None,
        bindings: Mapping[str, Any] | None = None,
        options: Options | None = None,
    ) -> Plan:
        """The plan, from checkpoint headers only (no tensor data is read)."""
        options = options or Options()
        lowered = self.lower(params, bindings, options)
        graph = optimize(lowered.graph)
        return _plan(lowered.graph, options, graph, _vocab_plan(lowered, graph, options))[0]

    def explain(
        self,
        params: Mapping[str, ParamValue] | None = None,
        bindings: Mapping[str, Any] | None = None,
        options: Options | None = None,
        *,
        all_tensors: bool = False,
        stage: str | None = None,
    ) -> str:
        """The IR as written, after the passes, and the per-tensor plan with totals; ``stage`` (one
        of ``STAGES``) prints that stage alone: the source, the IR as written, the IR after each
        pass, the plan, or the generated C or Triton kernels."""
        if stage is not None and stage not in STAGES:
            raise TvParamError(
                f"unknown stage {stage!r}", help="choose one of " + ", ".join(STAGES), code="E402"
            )
        if stage == "source":
            return self.source.rstrip("\n")
        options = options or Options()
        lowered = self.lower(params, bindings, options)
        if stage == "written":
            return format_graph(lowered.graph)
        after = stages(lowered.graph)
        if stage == "passes":
            return "\n\n".join(f"# IR after {name}\n{format_graph(g)}" for name, g in after)
        optimized = after[-1][1] if after else lowered.graph
        vocab = _vocab_plan(lowered, optimized, options)
        plan, _ = _plan(lowered.graph, options, optimized, vocab)
        if stage in ("c", "triton"):
            if vocab is not None:
                vocab.close()
            return _kernel_text(plan, stage)
        sections = [
            "# IR as written",
            format_graph(lowered.graph),
            "",
            f"# IR after passes ({', '.join(name for name, _ in after)})",
            format_graph(optimized),
            "",
            "# plan",
            plan.explain(per_tensor=None if all_tensors else 12),
        ]
        if vocab is not None:
            sections.append(vocab.describe())
            vocab.close()
        if stage == "plan":
            return "\n".join(sections[7:])
        if lowered.params:
            sections[0:0] = ["# parameters", *(f"{k} = {v:g}" for k, v in lowered.params.items()), ""]
        return "\n".join(sections)

    def run(
        self,
        out: OutSpec = None,
        params: Mapping[str, ParamValue] | None = None,
        bindings: Mapping[str, Any] | None = None,
        options: Options | None = None,
        *,
        into: Any = None,
    ) -> Any:
        """Compute every output.

        ``out=None`` returns the result in memory: a state dict for a program with one
        output, else ``{output name: state dict}``.  A path writes there (``.safetensors``
        → one file, anything else → a Hugging Face directory); with several outputs it is
        a directory holding one checkpoint per output; a mapping gives each output's path.
        Returns the written path(s) in the same shape.

        ``into=`` an ``nn.Module`` (or a state dict of preallocated tensors) writes the one
        output into its parameters and buffers in place, chunk by chunk, in each tensor's own
        dtype and on its own device, and returns it.  Names are matched as the module's
        ``state_dict()`` keys; a missing, extra or mis-shaped tensor is an error (E510) raised
        before anything is written.
        """
        options = options or Options()
        check_nonfinite_mode(options.nonfinite)
        check_executor(options.executor)
        lowered = self.lower(params, bindings, options)
        adapters = self._adapter_specs(lowered.graph, options)
        bases = {a.base: self._lora_base(a, params, bindings, options) for a in adapters.values()}
        written, plan_options = lowered.graph, options
        if adapters:  # the task vectors, in float64, for the adapters' SVDs
            written = _task_vectors(lowered.graph, {n: bases[a.base] for n, a in adapters.items()})
            plan_options = replace(options, dtype="fp64")
        graph = optimize(written)
        targets = None
        if into is not None:
            if out is not None:
                raise TvParamError("give either an output path or into=, not both", code="E402")
            if options.dtype is not None or adapters:
                raise TvParamError(
                    "into= writes each tensor in the model's own dtype; dtype= and as_lora cannot change it",
                    help="convert the model first (model.to(torch.bfloat16)) or leave dtype unset",
                    code="E402",
                )
            if len(graph.outputs) != 1:
                names = ", ".join(n for n, _ in graph.outputs)
                raise TvParamError(
                    f"into= takes one output, and this program has {len(graph.outputs)} ({names})",
                    help="run one output at a time, or write them to files",
                    code="E405",
                )
            targets = into_tensors(into)
        vocab = _vocab_plan(lowered, graph, options)
        tensor_dtypes = into_dtypes(targets) if targets is not None else None
        if vocab is None and not adapters:
            plan, opened = self._planned(written, plan_options, graph, tensor_dtypes)
        else:
            plan, opened = _plan(written, plan_options, graph, vocab, tensor_dtypes)
        if targets is not None:
            output = plan.outputs[0]
            check_into(targets, output.tensors, output.name, lowered.output_spans.get(output.name))
        dests = (_adapter_destinations if adapters else _destinations)(plan, out, opened)
        _refuse_overwriting_inputs(plan, opened, dests)
        to_disk = [(d, o.nbytes) for d, o in zip(dests, plan.outputs, strict=True) if d is not None]
        for target, _ in to_disk:
            for stale, pid in remove_stale_temporaries(target):
                print(f"note: removed {stale}, left by an interrupted run (process {pid})", file=sys.stderr)
        check_free_space_together(to_disk)
        metadata = {"tvlang.version": __version__}
        if self.syntax.source.name != "<expr>":
            metadata["tvlang.program"] = self.source
        sources: list[Source] = []
        sinks: list[Sink] = []
        # side files an output changes (tokenizer, config.json) wait here until the writer copies them
        edited_dir = tempfile.TemporaryDirectory(prefix="tvlang-sidecars-")
        extra_sources: list[Source] = []  # the adapters' base model, read for modules saved whole
        try:
            for inp in plan.inputs:
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
                sources.append(source if inp.names is None else RenamedSource(source, inp.names))
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
                card = self._card_maker(
                    plan, os.path.basename(dest.rstrip(os.sep)) or output.name, params_used
                )
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
            for sink in sinks:
                sink.commit()
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
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
        if options.progress:
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

    def _planned(
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
            options.resolved_kernels(),
            tuple(sorted(tensor_dtypes.items())) if tensor_dtypes is not None else None,
            _memory_layout(written),
        )
        last, self._last_plan = self._last_plan, None
        known: dict[str, Checkpoint] = {}
        if last is not None:
            if last.key == key and _input_files(last.opened) == last.files:
                self._last_plan = last
                return last.plan, last.opened
            # a new plan (new coefficients): the headers of unchanged files are not read again
            before = dict(last.files)
            for name, handle in last.opened.items():
                if isinstance(handle, Checkpoint) and all(
                    before.get(p) == ident for p, ident in _checkpoint_files(handle)
                ):
                    known[name] = handle
        plan, opened = _plan(written, options, graph, None, tensor_dtypes, known)
        files = _input_files(opened)
        if files is not None:
            self._last_plan = _CachedPlan(key, files, plan, opened)
        return plan, opened

    def _adapter_specs(self, graph: Graph, options: Options) -> dict[str, AdapterSpec]:
        """Which outputs are written as adapters (``as_lora(...)`` in the program, else every one
        with ``options.as_lora``), by output name; {} for none."""
        default = None
        if options.as_lora is not None:
            check_adapter(options.as_lora, options.lora_svd)
            default = AdapterSpec(options.as_lora, options.lora_base, options.lora_svd)
        names = [name for name, _ in graph.outputs]
        specs = {}
        for name in names:
            spec = self.adapters.get(name.partition(".")[0], default)  # a sweep's outputs are NAME.p=v
            if spec is not None:
                specs[name] = spec
        if specs and len(specs) < len(names):
            plain = next(n for n in names if n not in specs)
            raise TvParamError(
                f"output `{plain}` is a model, and other outputs are adapters: one run writes either",
                next(iter(specs.values())).span,
                help="run the merges and the adapters separately (or give every output as_lora(...))",
                code="E408",
            )
        return specs

    def _lora_base(
        self,
        spec: AdapterSpec,
        params: Mapping[str, ParamValue] | None,
        bindings: Mapping[str, Any] | None,
        options: Options,
    ) -> Node:
        """The checkpoint ``spec.base`` names, found by lowering the program's bindings with that
        name as the only output (headers only, nothing is read)."""
        name = spec.base
        if not (isinstance(name, str) and name.isidentifier()):
            raise TvParamError(f"the LoRA base must be a name, not {name!r}", code="E408")
        span = Span(TextSource(name, "--lora-base"), 0, len(name))
        kept = [s for s in self.syntax.statements if isinstance(s, (ast.Binding, ast.Param, ast.Define))]
        probe = ast.Output(ast.Name("lora_base", span), ast.Name(name, span), span)
        program = Program(replace(self.syntax, statements=(*kept, probe)), self.bindings)
        why = (
            "an adapter holds a task vector relative to a base model: a model output M is written as "
            f"M - {name}, and modules saved whole are {name} + (M - {name})"
        )
        try:
            node = program.lower(params, bindings, options).graph.outputs[0][1]
        except TvNameError:
            raise TvParamError(
                f"an adapter needs its base model, and no model is named `{name}`",
                spec.span,
                notes=(why,),
                help="name it with --lora-base NAME (Options(lora_base=...)), or bind `base`",
                code="E408",
            ) from None
        if node.op is not Op.INPUT or not node.kind.is_model:
            raise TvParamError(
                f"the LoRA base `{name}` is a {node.kind}, not a checkpoint",
                spec.span,
                notes=(why,),
                help="name a model bound to a checkpoint (load(...), --bind, a state dict)",
                code="E408",
            )
        return node

    def _card_maker(self, plan: Plan, title: str, params: Mapping[str, float]) -> Any:
        """A function of the adapter's card section (None for a merge) that writes the model card."""
        inputs = [
            CardInput(
                i.ref.label,
                "lora" if i.ref.key.startswith(LORA_KEY) else str(i.ref.kind),
                i.location,
            )
            for i in plan.inputs
        ]

        def card(section: str | None, base: str | None = None) -> str:
            return model_card(
                title=title,
                program=self.source,
                inputs=inputs,
                params=params,
                version=__version__,
                mergekit_config=self.mergekit_config,
                library="transformers" if section is None else "peft",
                extra=() if section is None else (section,),
                base_model=None if base is None else [base],
            )

        return card


def _task_vectors(graph: Graph, bases: Mapping[str, Node]) -> Graph:
    """Every output as a task vector: a model output ``M`` becomes ``M - base`` (folded by the passes
    into one weighted sum, so ``base`` is read once and cancels exactly where it can)."""
    outputs = tuple(
        (name, sub(node, bases[name]) if node.kind.is_model else node) for name, node in graph.outputs
    )
    return replace(graph, outputs=outputs)


def _adapter_destinations(plan: Plan, out: OutSpec, opened: Mapping[str, Any]) -> list[str | None]:
    """An adapter is a directory; several outputs are directories inside ``out``, by output name."""
    if out is None:
        raise TvParamError(
            "--as-lora writes adapter directories: give an output path", help="e.g. -o adapter/", code="E408"
        )
    names = [o.name for o in plan.outputs]
    if isinstance(out, Mapping):
        dests = _destinations(plan, out, opened)
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
        if ref.handle is not None:
            handle = ref.handle
        else:
            handle = Checkpoint.open(ref.key)
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


def _vocab_plan(lowered: Lowered, graph: Graph, options: Options) -> VocabPlan | None:
    """The output vocabulary and each model's row map, for a program with a `vocab` statement."""
    if lowered.vocab is None:
        return None
    roots = options.roots

    def check(ref: InputRef, ckpt: Checkpoint) -> None:
        if roots is not None:
            _check_inside_roots(ckpt, roots, ref)

    return VocabPlan(lowered.vocab, graph.inputs(), check)


@dataclass(frozen=True)
class _CachedPlan:
    """A plan with what it was built from (:meth:`Program._planned`)."""

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


def _plan(
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
        if ref.handle is not None:
            opened[ref.key] = ref.handle
            if on_cuda:  # tensors already on the GPU are read in place
                return "memory", memory_metas(ref.handle, ref.label, "cuda"), False
            return "memory", memory_metas(ref.handle, ref.label), False
        if ref.key.startswith(LORA_KEY):
            adapter = LoraAdapter.open(ref.key[len(LORA_KEY) :])
            opened[ref.key] = adapter
            return adapter.path, adapter.metas(), True
        ckpt = (known or {}).get(ref.key) or Checkpoint.open(ref.key)
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
        kernels=options.resolved_kernels(),
        # with a vocabulary, rows are re-indexed for the models merged; one whose weight folded to
        # zero has no row map to compare its embeddings through, so only merged models are checked
        written=written if vocab is None else None,
        tensor_dtypes=tensor_dtypes,
        device=device,
    )
    return plan, opened


def _kernel_text(plan: Plan, language: str) -> str:
    """Each distinct generated kernel of ``plan``, C (the compiled CPU backend) or Triton (the GPU
    backend), under a comment saying what it computes and for which tensors."""
    if language == "c":
        kernels = c_kernel_sources(plan)
    else:
        from tvlang.backends.gpu import kernel_sources

        kernels = kernel_sources(plan)
    if not kernels:
        where = "eagerly" if language == "c" else "on the CPU path"
        return f"# no {'C' if language == 'c' else 'Triton'} kernels: every task of this plan runs {where}"
    return "\n".join(f"# {what}\n{source}" for what, source in kernels).rstrip("\n")


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


def _destinations(plan: Plan, out: OutSpec, opened: Mapping[str, Any]) -> list[str | None]:
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


def _refuse_overwriting_inputs(plan: Plan, opened: Mapping[str, Any], dests: Sequence[str | None]) -> None:
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


def compile(
    source: str, *, filename: str | None = None, bindings: Mapping[str, Any] | None = None
) -> Program:
    """Parse a program or expression.  ``filename`` names it in errors; relative ``load()`` paths
    resolve against its directory (the current directory for strings without one)."""
    base_dir = os.path.dirname(os.path.abspath(filename)) if filename else None
    return Program(parse(source, filename or "<expr>", base_dir), bindings)


def declare_params(program: Program, params: Mapping[str, ParamValue], origin: str) -> Program:
    """``program`` with ``param NAME = VALUE`` ahead of it for each of ``params`` it does not
    declare.  An expression (``tvlang eval``, a job's ``expression:``) has no ``param`` lines: this
    lets ``--set`` and sweeps work on it as on a ``.tv`` file, keeps a misspelt ``--set`` name an
    error, and records the values in the output's metadata."""
    syntax = program.syntax
    declared = {s.target.id for s in syntax.statements if isinstance(s, ast.Param)}
    header = []
    for name, value in params.items():
        if name not in declared:
            text = repr(float(value)) if isinstance(value, (int, float)) else repr([float(v) for v in value])
            header.append(parse(f"param {name} = {text}", f"{origin} (params)").statements[0])
    if not header:
        return program
    return Program(replace(syntax, statements=(*header, *syntax.statements)), program.bindings)


def compile_file(path: str | os.PathLike[str], *, bindings: Mapping[str, Any] | None = None) -> Program:
    """Read and parse a ``.tv`` file; its ``load()`` paths are relative to it."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise TvInputError(f"no such program file: {path}", code="E300") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TvInputError(f"cannot read {path}: {e}", code="E300") from None
    return compile(text, filename=path, bindings=bindings)


def evaluate(
    source: str,
    bindings: Mapping[str, Any] | None = None,
    *,
    out: OutSpec = None,
    params: Mapping[str, ParamValue] | None = None,
    into: Any = None,
    **options: Any,
) -> Any:
    """Compile and run ``source`` once.  ``bindings`` maps names to paths, state dicts,
    ``nn.Module``\\ s, numbers, :func:`task_vector` or :func:`delta`; ``options`` are
    :class:`Options` fields.  See :meth:`Program.run` for ``out``, ``into`` and the result."""
    try:
        opts = replace(Options(), **options)
    except TypeError as e:
        raise TvParamError(f"unknown option: {e}", code="E402") from None
    return compile(source, bindings=bindings).run(out, params, options=opts, into=into)


__all__ = ["Options", "Program", "TvError", "compile", "compile_file", "delta", "evaluate", "task_vector"]
