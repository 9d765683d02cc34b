"""The Python interface: compile once, plan, explain, run many times.

>>> import torch, tvlang
>>> base = {"w": torch.tensor([1.0, 2.0])}
>>> ft = {"w": torch.tensor([3.0, 2.0])}
>>> out = tvlang.evaluate("base + 0.5*tau", bindings={"base": base, "tau": tvlang.task_vector(ft)})
>>> out["w"].tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tvlang.backends.compiled import c_kernel_sources
from tvlang.driver import OutSpec, PlanCache, plan_program, vocab_plan, write_outputs
from tvlang.errors import TvError, TvInputError, TvNameError, TvParamError
from tvlang.io.card import CardInput, model_card
from tvlang.io.endpoints import (
    check_into,
    into_dtypes,
    into_tensors,
)
from tvlang.ir import Graph, Node, Op, format_graph
from tvlang.ir.build import sub
from tvlang.ir.node import Origin
from tvlang.lowering.adapters import AdapterSpec, check_adapter, strip_adapters
from tvlang.lowering.lower import Binding, Lowered, ParamValue, lower
from tvlang.options import CHAT_TEMPLATES, Options
from tvlang.passes import STAGES, optimize, stages
from tvlang.plan import Plan
from tvlang.source import SourceText, Span
from tvlang.syntax import ast
from tvlang.syntax.parser import parse
from tvlang.version import __version__


def task_vector(finetuned: Any, base: str = "base") -> Binding:
    """Bind a fine-tuned checkpoint as its task vector: ``finetuned - <base>``, where ``base`` names another binding."""
    return Binding(_as_value(finetuned), "task", base)


def delta(stored: Any) -> Binding:
    """Bind a stored task vector (a checkpoint that already holds fine-tuned minus base)."""
    return Binding(_as_value(stored), "delta")


def _as_value(value: Any) -> Any:
    if hasattr(value, "state_dict") and callable(value.state_dict):  # an nn.Module
        return value.state_dict()
    return value


def _as_bound(value: Any) -> Binding:
    if isinstance(value, Binding):
        return value
    if isinstance(value, bool):
        raise TvParamError("a binding cannot be a bool", code="E403")
    if isinstance(value, (int, float)):
        return Binding(float(value), "scalar")
    value = _as_value(value)
    if isinstance(value, (str, os.PathLike, Mapping)):
        return Binding(value, "model")
    raise TvParamError(
        f"cannot bind a {type(value).__name__}: use a path, a state dict, an nn.Module or a number",
        code="E403",
    )


class Program:
    """A parsed program.  Lowering, planning and running take parameters and bindings each time,
    so one compiled program serves a whole sweep."""

    def __init__(self, syntax: ast.Program, bindings: Mapping[str, Any] | None = None) -> None:
        self.syntax, self.adapters = strip_adapters(syntax)  # as_lora(...) outputs: written as adapters
        self.bindings = {k: _as_bound(v) for k, v in (bindings or {}).items()}
        self.mergekit_config: str | None = None  # the mergekit YAML it was translated from, for the card
        self._plans = PlanCache()  # the last plan, for a repeated run

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
        return plan_program(lowered.graph, options, graph, vocab_plan(lowered, graph, options))[0]

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
        vocab = vocab_plan(lowered, optimized, options)
        plan, _ = plan_program(lowered.graph, options, optimized, vocab)
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
        if options.chat_template is not None:
            template = options.chat_template
            named = template if template in CHAT_TEMPLATES else f"the text given ({len(template)} characters)"
            sections.append(
                f"chat template: {named}, into the tokenizer files of each model directory output"
            )
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
        vocab = vocab_plan(lowered, graph, options)
        tensor_dtypes = into_dtypes(targets) if targets is not None else None
        if vocab is None and not adapters:
            plan, opened = self._plans.get(written, plan_options, graph, tensor_dtypes)
        else:
            plan, opened = plan_program(written, plan_options, graph, vocab, tensor_dtypes)
        if targets is not None:
            output = plan.outputs[0]
            check_into(targets, output.tensors, output.name, lowered.output_spans.get(output.name))
        metadata = {"tvlang.version": __version__}
        if self.syntax.source.name != "<expr>":
            metadata["tvlang.program"] = self.source
        return write_outputs(
            plan,
            opened,
            lowered,
            options,
            out,
            metadata=metadata,
            card_for=lambda title, used: self._card_maker(plan, title, used),
            vocab=vocab,
            adapters=adapters,
            bases=bases,
            targets=targets,
            into=into,
        )

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
        span = Span(SourceText(name, "--lora-base"), 0, len(name))
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
                "lora" if i.ref.origin is Origin.ADAPTER else str(i.ref.kind),
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
