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
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tvlang.backends.compiled import KERNEL_MODES, resolve_mode
from tvlang.backends.gpu import execute_gpu, resolve_device
from tvlang.codegen.c import compiler
from tvlang.errors import TvError, TvInputError, TvOutputError, TvParamError
from tvlang.io.checkpoint import Checkpoint, CheckpointWriter
from tvlang.io.endpoints import (
    CheckpointSource,
    IntoSink,
    MemorySink,
    MemorySource,
    Sink,
    Source,
    check_into,
    checkpoint_metas,
    into_dtypes,
    into_tensors,
    memory_metas,
)
from tvlang.io.lora import LoraAdapter, LoraSource
from tvlang.ir import Graph, InputRef, format_graph
from tvlang.lower import LORA_KEY, Bound, Lowered, ParamValue, lower
from tvlang.passes import optimize
from tvlang.plan import DEFAULT_MEMORY, Plan, TensorMeta, build_plan
from tvlang.runtime import Progress, check_nonfinite_mode, execute
from tvlang.syntax import ast
from tvlang.syntax.parser import parse

__version__ = "0.1.0"


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
        self.syntax = syntax
        self.bindings = {k: _as_bound(v) for k, v in (bindings or {}).items()}

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
        graph = optimize(self.lower(params, bindings, options).graph)
        return _plan(graph, options)[0]

    def explain(
        self,
        params: Mapping[str, ParamValue] | None = None,
        bindings: Mapping[str, Any] | None = None,
        options: Options | None = None,
        *,
        all_tensors: bool = False,
    ) -> str:
        """The IR as written, after the passes, and the per-tensor plan with totals."""
        options = options or Options()
        lowered = self.lower(params, bindings, options)
        optimized = optimize(lowered.graph)
        plan, _ = _plan(optimized, options)
        sections = [
            "# IR as written",
            format_graph(lowered.graph),
            "",
            "# IR after passes (fold_constants, linearize)",
            format_graph(optimized),
            "",
            "# plan",
            plan.explain(per_tensor=None if all_tensors else 12),
        ]
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
        lowered = self.lower(params, bindings, options)
        graph = optimize(lowered.graph)
        targets = None
        if into is not None:
            if out is not None:
                raise TvParamError("give either an output path or into=, not both", code="E402")
            if options.dtype is not None:
                raise TvParamError(
                    "into= writes each tensor in the model's own dtype; dtype= cannot change it",
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
        plan, opened = _plan(graph, options, into_dtypes(targets) if targets is not None else None)
        if targets is not None:
            output = plan.outputs[0]
            check_into(targets, output.tensors, output.name, lowered.output_spans.get(output.name))
        dests = _destinations(plan, out, opened)
        _refuse_overwriting_inputs(plan, dests)
        metadata = {"tvlang.version": __version__}
        if self.syntax.source.name != "<expr>":
            metadata["tvlang.program"] = self.source
        sources: list[Source] = []
        sinks: list[Sink] = []
        try:
            for inp in plan.inputs:
                handle = opened[inp.ref.key]
                if isinstance(handle, Checkpoint):
                    sources.append(CheckpointSource(handle))
                elif isinstance(handle, LoraAdapter):
                    sources.append(LoraSource(handle))
                else:
                    sources.append(MemorySource(handle))
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
                template = opened[plan.inputs[output.template].ref.key]
                sidecars = template.sidecar_files() if isinstance(template, Checkpoint) else []
                sinks.append(
                    CheckpointWriter(
                        dest,
                        output.tensors,
                        meta,
                        max_shard_bytes=options.shard_size,
                        sidecars=sidecars,
                        overwrite=options.overwrite,
                    )
                )
            progress = (
                Progress(plan.bytes_read + plan.bytes_written, sys.stderr) if options.progress else None
            )
            device = resolve_device(options.device)
            if device == "cpu":
                report = execute(plan, sources, sinks, progress=progress, nonfinite=options.nonfinite)
            else:  # "interpret": the same kernels in Triton's interpreter, on CPU tensors (TRITON_INTERPRET=1)
                report = execute_gpu(
                    plan,
                    sources,
                    sinks,
                    progress=progress,
                    nonfinite=options.nonfinite,
                    device="cuda" if device == "cuda" else "cpu",
                )
            for sink in sinks:
                sink.commit()
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        finally:
            for source in sources:
                source.close()
        if report:
            stderr = sys.stderr
            for line in report.lines():
                print(line, file=stderr)
        if into is not None:
            return into
        if all(d is None for d in dests):
            results = {o.name: s.result for o, s in zip(plan.outputs, sinks, strict=True)}  # type: ignore[attr-defined]
        else:
            results = {o.name: d for o, d in zip(plan.outputs, dests, strict=True)}
        return next(iter(results.values())) if len(results) == 1 else results


def _plan(
    graph: Graph, options: Options, tensor_dtypes: Mapping[str, str] | None = None
) -> tuple[Plan, dict[str, Any]]:
    opened: dict[str, Any] = {}
    on_cuda = resolve_device(options.device) == "cuda"

    def open_input(ref: InputRef) -> tuple[str, Mapping[str, TensorMeta], bool]:
        if ref.handle is not None:
            opened[ref.key] = ref.handle
            if on_cuda:  # tensors already on the GPU are read in place
                return "memory", memory_metas(ref.handle, ref.label, "cuda"), False
            return "memory", memory_metas(ref.handle, ref.label), False
        if ref.key.startswith(LORA_KEY):
            adapter = LoraAdapter.open(ref.key[len(LORA_KEY) :])
            opened[ref.key] = adapter
            return adapter.path, adapter.metas(), True
        ckpt = Checkpoint.open(ref.key)
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
        tensor_dtypes=tensor_dtypes,
    )
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
    os.makedirs(path, exist_ok=True)
    dests: list[str | None] = []
    for output in plan.outputs:
        template = opened[plan.inputs[output.template].ref.key]
        as_dir = isinstance(template, Checkpoint) and template.is_dir
        dests.append(os.path.join(path, output.name if as_dir else output.name + ".safetensors"))
    return dests


def _refuse_overwriting_inputs(plan: Plan, dests: Sequence[str | None]) -> None:
    inputs = [Path(i.location).resolve() for i in plan.inputs if i.location != "memory"]
    for dest in dests:
        if dest is None:
            continue
        target = Path(dest).resolve()
        for inp in inputs:
            if target == inp or target in inp.parents:
                raise TvOutputError(
                    f"refusing to write {dest}: it would replace the input {inp}",
                    help="choose another output path",
                    code="E502",
                )


def compile(
    source: str, *, filename: str | None = None, bindings: Mapping[str, Any] | None = None
) -> Program:
    """Parse a program or expression.  ``filename`` names it in errors; relative ``load()`` paths
    resolve against its directory (the current directory for strings without one)."""
    base_dir = os.path.dirname(os.path.abspath(filename)) if filename else None
    return Program(parse(source, filename or "<expr>", base_dir), bindings)


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
