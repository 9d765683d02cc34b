"""AST → IR: resolve names, check kinds, apply parameters, build the graph.

This is where a program's meaning is fixed: every error that can be found
without reading a checkpoint header is raised here, positioned at the source.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvlang.check import KindError
from tvlang.errors import TvInputError, TvNameError, TvParamError, TvTypeError
from tvlang.hub import resolve_reference
from tvlang.ir import build
from tvlang.ir.node import DELTA, MODEL, SCALAR, Graph, InputRef, Kind, Node, Op, const, scalar_value
from tvlang.ir.printer import format_weight
from tvlang.lowering.builtins import BUILTINS, REQUIRED, ParamSpec, layer_length
from tvlang.ops import COMPARISONS
from tvlang.passes.linearize import linear_form
from tvlang.source import SourceText, Span
from tvlang.syntax import ast
from tvlang.syntax.parser import too_deep

if TYPE_CHECKING:  # (imported by the `vocab` statement's lowering, which few programs have)
    from tvlang.ir.vocab import TokenRule, VocabSpec

MAX_INPUTS = 4096
MAX_OUTPUTS = 4096
FLOAT32_MAX = 3.4028234663852886e38
MAX_EXPANSION = 64
DEFAULT_OUTPUT = "out"


def _close_matches(word: str, choices: Sequence[str]) -> list[str]:
    """The closest of ``choices`` to a misspelt ``word`` (at most one), for an error's help.
    difflib is imported here, when an error needs it, not at every start (~2 ms)."""
    import difflib

    return difflib.get_close_matches(word, choices, n=1)


@dataclass(frozen=True)
class Binding:
    """A name bound by the caller (CLI ``--bind``, Python ``bindings=``).

    ``role`` is ``model`` (a checkpoint), ``delta`` (a stored task vector),
    ``task`` (a fine-tuned checkpoint, bound as itself minus ``base``) or
    ``scalar``.  ``value`` is a path, an in-memory mapping of tensors, or a number.
    """

    value: Any
    role: str = "model"
    base: str = "base"


@dataclass(frozen=True)
class Lowered:
    """A program lowered to the IR, with the parameters it used."""

    graph: Graph
    params: dict[str, float]  # every parameter's value as used (the first combination of a sweep)
    output_spans: dict[str, Span]
    output_params: tuple[dict[str, float], ...] = ()  # per output, for sweeps
    vocab: VocabSpec | None = None  # a `vocab` statement: rows matched by token (tvlang.io.vocab)


class Lowering:
    """One lowering of one program; holds the environment while walking it."""

    def __init__(
        self,
        program: ast.Program,
        roots: Sequence[str | os.PathLike[str]] | None,
        resolved: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.program = program
        # load() paths already resolved (shared by a sweep's lowerings: each path is looked up once)
        self.resolved = resolved if resolved is not None else {}
        self.source = program.source
        self.roots = None if roots is None else [Path(r).resolve() for r in roots]
        self.env: dict[str, tuple[Node, Span | None]] = {}
        self.defs: dict[str, ast.Define] = {}
        self.depth = 0
        self.expansions: list[str] = []  # call sites of the user methods being expanded (random streams)
        self.n_inputs = 0
        # Names the program binds, so a use before the binding gets a precise error.
        self.later_bindings: dict[str, Span] = {
            s.target.id: s.target.span for s in program.statements if isinstance(s, (ast.Binding, ast.Param))
        }

    # -- paths ---------------------------------------------------------------
    def resolve_checkpoint(self, path: str, span: Span) -> str:
        """An absolute path for ``load()``'s argument: relative to the program's directory, or the cached
        snapshot of a Hugging Face reference (``hf://org/name[@rev]``; see :mod:`tvlang.hub`)."""
        base = Path(self.source.base_dir) if self.source.base_dir else Path.cwd()
        key = (path, str(base))
        if key not in self.resolved:
            self.resolved[key] = self._resolve(path, base, span)
        self.n_inputs += 1
        if self.n_inputs > MAX_INPUTS:
            raise TvInputError(f"more than {MAX_INPUTS} inputs", span, code="E306")
        return self.resolved[key]

    def _resolve(self, path: str, base: Path, span: Span) -> str:
        local = resolve_reference(path, base, span)  # a Hugging Face reference → its cached snapshot
        candidates = [base / local]
        if not local.endswith(".safetensors"):
            candidates.append(base / (local + ".safetensors"))
        try:
            found = next((c for c in candidates if c.exists()), None)
        except OSError as e:  # a name too long for the filesystem, say
            raise TvInputError(f"cannot use {path!r} as a path: {e.strerror}", span, code="E300") from None
        if found is None:
            looked = " or ".join(str(c) for c in candidates)
            raise TvInputError(f"no such checkpoint: {path}", span, label=f"looked for {looked}", code="E300")
        resolved = found.resolve()
        if self.roots is not None and not any(resolved.is_relative_to(r) for r in self.roots):
            raise TvInputError(
                f"{path} is outside the directories this program may read",
                span,
                label=f"resolves to {resolved}",
                help="allowed: " + ", ".join(str(r) for r in self.roots),
                code="E305",
            )
        return str(resolved)

    # -- expressions ---------------------------------------------------------
    def expr(self, e: ast.Expr) -> Node:
        if isinstance(e, ast.Number):
            return const(e.value)
        if isinstance(e, ast.Name):
            return self.lookup(e)
        if isinstance(e, ast.String):
            raise TvTypeError(
                "a string can only be a path argument",
                e.span,
                label="not a value",
                help='load a checkpoint with `load("path")`',
                code="E202",
            )
        if isinstance(e, ast.Unary):
            operand = self.expr(e.operand)
            return operand if e.op == "+" else build.neg(operand)
        if isinstance(e, ast.Binary):
            return self.binary(e)
        if isinstance(e, ast.Compare):
            left, right = self.expr(e.left), self.expr(e.right)
            return self.checked(e.span, lambda: self._compare(e.op, left, right))
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.List):
            raise TvTypeError(
                "a list can only be a function argument",
                e.span,
                help="e.g. `ties(a, b, weights=[0.6, 0.4])`",
                code="E202",
            )
        raise AssertionError(f"unknown AST node {e!r}")

    @staticmethod
    def _compare(op: str, left: Node, right: Node) -> Node:
        if (left.kind.tensor and not left.kind.is_delta) or (right.kind.tensor and not right.kind.is_delta):
            raise KindError("comparisons work on numbers and task vectors, not on models")
        return build.call(COMPARISONS[op], left, right)

    def checked(self, span: Span, make: Callable[[], Node]) -> Node:
        """Run an IR constructor, turning a kind-rule violation into a positioned error."""
        try:
            return make()
        except KindError as err:
            raise TvTypeError(err.message, span, label=err.label, help=err.help, code="E201") from None

    def lookup(self, name: ast.Name) -> Node:
        if name.id in self.env:
            return self.env[name.id][0]
        if name.id in BUILTINS:
            raise TvTypeError(
                f"`{name.id}` is a function", name.span, label="call it with arguments", code="E202"
            )
        later = self.later_bindings.get(name.id)
        if later is not None:
            line, _ = later.line_col()
            raise TvNameError(
                f"`{name.id}` is used before it is bound",
                name.span,
                label=f"bound later, on line {line}",
                help="move its binding above this line",
                code="E200",
            )
        close = _close_matches(name.id, [*self.env, *self.later_bindings])
        raise TvNameError(
            f"unknown name `{name.id}`",
            name.span,
            label="not bound anywhere",
            help=f"did you mean `{close[0]}`?" if close else _binding_help(name.id),
            code="E200",
        )

    def binary(self, e: ast.Binary) -> Node:
        left, right = self.expr(e.left), self.expr(e.right)
        return self.checked(e.span, lambda: build.binary(e.op, left, right))

    def call(self, e: ast.Call) -> Node:
        if e.func.id in self.defs:
            return self.expand(self.defs[e.func.id], e)
        fn = BUILTINS.get(e.func.id)
        if fn is None:
            known = [*BUILTINS, *self.defs]
            close = _close_matches(e.func.id, known)
            raise TvNameError(
                f"unknown function `{e.func.id}`",
                e.func.span,
                help=f"did you mean `{close[0]}`?" if close else "functions: " + ", ".join(sorted(known)),
                code="E200",
            )
        given, spans = self.bind_arguments(
            fn.name, [(p.name, p.default is REQUIRED, p.variadic) for p in fn.params], e
        )
        values: dict[str, Any] = {}
        for p in fn.params:
            if p.name not in given:
                values[p.name] = p.default
                continue
            arg = given[p.name]
            if p.variadic:
                assert isinstance(arg, tuple)
                values[p.name] = tuple(self.argument(fn.name, p, a) for a in arg)
            else:
                values[p.name] = self.argument(fn.name, p, arg)
        return self.checked(e.span, lambda: fn.lower(self, values, spans, e.span))

    def bind_arguments(
        self, fname: str, params: list[tuple[str, bool, bool]], e: ast.Call
    ) -> tuple[dict[str, Any], dict[str, Span]]:
        """Match a call's arguments to parameters (name, required, variadic)."""
        names = [n for n, _, _ in params]
        variadic = next((n for n, _, v in params if v), None)
        positional = [n for n, _, v in params if not v]
        given: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        args = list(e.args)
        if variadic is not None:
            # parameters before the variadic one take the first arguments; it takes the rest
            lead = [n for n, _, _ in params[: names.index(variadic)]]
            rest = args[len(lead) :]
            given[variadic] = tuple(rest)
            for i, item in enumerate(rest):
                spans[f"{variadic}[{i}]"] = item.span
            if rest:
                spans[variadic] = rest[0].span
            args, positional = args[: len(lead)], lead
        if len(args) > len(positional):
            raise TvTypeError(
                f"`{fname}` takes {len(positional)} argument{'s' if len(positional) != 1 else ''}, got {len(args)}",
                args[len(positional)].span,
                label="unexpected argument",
                code="E203",
            )
        for name, arg in zip(positional, args, strict=False):
            given[name], spans[name] = arg, arg.span
        for kw in e.kwargs:
            if kw.name.id not in names or kw.name.id == variadic:
                close = _close_matches(kw.name.id, names)
                raise TvTypeError(
                    f"`{fname}` has no parameter `{kw.name.id}`",
                    kw.name.span,
                    help=f"did you mean `{close[0]}`?" if close else "parameters: " + ", ".join(names),
                    code="E203",
                )
            if kw.name.id in given:
                raise TvTypeError(f"`{kw.name.id}` given twice", kw.span, code="E203")
            given[kw.name.id], spans[kw.name.id] = kw.value, kw.value.span
        for name, required, is_variadic in params:
            if required and (name not in given or (is_variadic and not given[name])):
                raise TvTypeError(
                    f"`{fname}` needs its `{name}` argument", e.span, label="missing", code="E203"
                )
        return given, spans

    def argument(self, fname: str, p: ParamSpec, arg: ast.Expr) -> Any:
        """One argument, checked against its declared kind."""
        if p.kind in ("path", "string"):
            if not isinstance(arg, ast.String):
                example = (
                    f'{fname}("ckpt/base")' if p.kind == "path" else f'{p.name}="{(p.choices or ("…",))[0]}"'
                )
                raise TvTypeError(
                    f"`{fname}`'s `{p.name}` must be a string, like `{example}`", arg.span, code="E203"
                )
            if p.choices and arg.value not in p.choices:
                raise TvTypeError(
                    f"`{fname}`'s `{p.name}` must be one of " + ", ".join(f'"{c}"' for c in p.choices),
                    arg.span,
                    code="E203",
                )
            return arg.value
        if p.kind == "numbers":
            if not isinstance(arg, ast.List):
                raise TvTypeError(
                    f"`{fname}`'s `{p.name}` must be a list, like `[0.5, 0.5]`", arg.span, code="E203"
                )
            return tuple(self.argument(fname, ParamSpec(p.name, "number"), item) for item in arg.items)
        node = self.expr(arg)
        if p.kind == "value":
            if node.kind.tensor:
                self.require_point_or_vector(node, arg)
            return node
        if p.kind in ("number", "int"):
            if node.kind.tensor:
                raise TvTypeError(
                    f"`{fname}`'s `{p.name}` must be a number",
                    arg.span,
                    label=f"this is a {node.kind}",
                    code="E203",
                )
            if p.kind == "int":
                value = scalar_value(node)
                if value is None or value != int(value):
                    raise TvTypeError(f"`{fname}`'s `{p.name}` must be a whole number", arg.span, code="E203")
                return int(value)
            return node
        self.require_point_or_vector(node, arg)
        if (p.kind == "model" and not node.kind.is_model) or (p.kind == "delta" and not node.kind.is_delta):
            hint = " (a task vector is a difference of models, e.g. `ft - base`)" if p.kind == "delta" else ""
            raise TvTypeError(
                f"`{fname}`'s `{p.name}` must be a {p.kind}{hint}",
                arg.span,
                label=f"this is a {node.kind}",
                code="E203",
            )
        return node

    def expand(self, define: ast.Define, e: ast.Call) -> Node:
        """A user method: its body lowered with the parameters bound to the arguments."""
        params = [(name.id, default is None, False) for name, default in define.params]
        given, _ = self.bind_arguments(
            define.name.id, params, e
        )  # every parameter without a default is given
        # arguments are evaluated where the call is, before its body is entered
        scope = {name.id: self.expr(given.get(name.id, default)) for name, default in define.params}  # type: ignore[arg-type]
        if self.depth >= MAX_EXPANSION:
            raise TvTypeError(
                f"`{define.name.id}` expands more than {MAX_EXPANSION} levels deep (does it call itself?)",
                e.span,
                code="E210",
            )
        self.depth += 1
        self.expansions.append(e.span.text)
        saved = {k: self.env[k] for k in scope if k in self.env}
        try:
            for k, v in scope.items():
                self.env[k] = (v, None)
            return self.expr(define.body)
        finally:
            for k in scope:
                del self.env[k]
            self.env.update(saved)
            self.depth -= 1
            self.expansions.pop()

    # -- the affine rule at use sites ---------------------------------------
    def require_point_or_vector(self, node: Node, e: ast.Expr) -> None:
        kind = node.kind
        if not kind.tensor:
            raise TvTypeError(
                "this is a number, not a model or task vector", e.span, label="a scalar", code="E204"
            )
        if kind.is_model or kind.is_delta:
            return
        form = linear_form(node)
        weights = ", ".join(f"{a.arg.label} {format_weight(w)}" for a, w in form.items() if a.kind.is_model)
        message = "this is neither a model nor a task vector"
        help_ = "a model's weights must sum to 1 (e.g. `0.5*a + 0.5*b`), a task vector's to 0 (e.g. `a - b`)"
        if (
            isinstance(e, ast.Binary)
            and e.op == "+"
            and _is_model_expr(e.left, self)
            and _is_model_expr(e.right, self)
        ):
            message = "cannot add `model` to `model`"
            help_ = _add_models_help(e, self)
        raise TvTypeError(
            message,
            e.span,
            label=f"the weights of models here sum to {format_weight(kind.mass)}",
            help=help_,
            notes=(f"model weights: {weights}",) if weights else (),
            code="E201",
        )

    # -- statements ----------------------------------------------------------
    def define(self, d: ast.Define) -> None:
        name = d.name
        if name.id in BUILTINS or name.id in self.defs:
            what = "a built-in function" if name.id in BUILTINS else "already defined"
            raise TvNameError(f"`{name.id}` is {what}", name.span, label="defined again here", code="E205")
        seen: set[str] = set()
        for pname, _ in d.params:
            if pname.id in seen:
                raise TvNameError(f"parameter `{pname.id}` appears twice", pname.span, code="E205")
            seen.add(pname.id)
        self.defs[name.id] = d

    def bind(self, name: ast.Name, node: Node, span: Span | None) -> None:
        if name.id in BUILTINS:
            raise TvNameError(f"`{name.id}` is a function and cannot be rebound", name.span, code="E205")
        if name.id in self.env:
            previous = self.env[name.id][1]
            where = ""
            if previous is not None:
                line, col = previous.line_col()
                where = f" (first bound at {previous.source.name}:{line}:{col})"
            raise TvNameError(
                f"`{name.id}` is already bound{where}",
                name.span,
                label="bound again here",
                help="names are bound once; pick a new name",
                code="E205",
            )
        self.env[name.id] = (node, span)
        if span is not None and self.later_bindings.get(name.id) == name.span:
            del self.later_bindings[name.id]


def _is_model_expr(e: ast.Expr, ctx: Lowering) -> bool:
    try:
        return ctx.expr(e).kind.is_model
    except Exception:
        return False


def _add_models_help(e: ast.Binary, ctx: Lowering) -> str:
    left = e.left.span.text
    right = e.right.span.text
    models = [n for n, (node, _) in ctx.env.items() if node.op is Op.INPUT and node.kind.is_model]
    base = next((n for n in ("base", "pretrained", *models[:1]) if n in ctx.env), None)
    average = f"to average the two models: `0.5*{left} + 0.5*{right}`"
    if base and base != right:
        return f"a task vector is a difference of models: did you mean `{left} + ({right} - {base})`? Or, {average}"
    return f"{average}; to add a task vector, subtract the base model first"


def _binding_help(name: str) -> str:
    return f'bind it in the program (`{name} = load("path")`) or from the caller (`--bind {name}=PATH`)'


ParamValue = float | Sequence[float]


def lower(
    program: ast.Program,
    *,
    params: Mapping[str, ParamValue] | None = None,
    bindings: Mapping[str, Binding] | None = None,
    roots: Sequence[str | os.PathLike[str]] | None = None,
) -> Lowered:
    """Lower a parsed program to an IR graph with the given parameter values and bindings.

    A parameter given a list of values (``param lam = [0.2, 0.4]``, ``--set lam=0:1:0.1``) is a
    sweep: every output that depends on it is produced once per value, all in one graph, so
    one pass over the inputs writes them all.  Each is named ``NAME.lam=0.2`` (``NAME.lam=0.2,d=0.5``
    for a grid).
    """
    try:
        sweeps = _sweeps(program, params or {})
        if not sweeps:
            return _lower(program, params=params, bindings=bindings, roots=roots)
        return _lower_sweep(program, dict(params or {}), sweeps, bindings, roots)
    except RecursionError:
        raise too_deep(program.source) from None


def _sweeps(program: ast.Program, params: Mapping[str, ParamValue]) -> dict[str, tuple[float, ...]]:
    """The swept parameters and their values, in declaration order."""
    sweeps: dict[str, tuple[float, ...]] = {}
    for stmt in program.statements:
        if not isinstance(stmt, ast.Param):
            continue
        given = params.get(stmt.target.id)
        if given is not None and not isinstance(given, (int, float)):
            values = tuple(float(v) for v in given)
        elif given is None and isinstance(stmt.default, ast.List):
            values = tuple(_constant(program, item) for item in stmt.default.items)
        else:
            continue
        if not values:
            span = stmt.default.span if given is None else None
            raise TvParamError(f"parameter `{stmt.target.id}` sweeps over no values", span, code="E402")
        sweeps[stmt.target.id] = values
    return sweeps


def _constant(program: ast.Program, e: ast.Expr) -> float:
    value = scalar_value(Lowering(program, None).expr(e))
    if value is None:
        raise TvTypeError("a swept parameter's values must be numbers", e.span, code="E202")
    return value


def _lower_sweep(
    program: ast.Program,
    params: dict[str, ParamValue],
    sweeps: dict[str, tuple[float, ...]],
    bindings: Mapping[str, Binding] | None,
    roots: Sequence[str | os.PathLike[str]] | None,
) -> Lowered:
    combos = [dict(zip(sweeps, values, strict=True)) for values in itertools.product(*sweeps.values())]
    if len(combos) > MAX_OUTPUTS:
        raise TvParamError(
            f"the sweep has {len(combos)} combinations; the limit is {MAX_OUTPUTS}", code="E402"
        )
    resolved: dict[tuple[str, str], str] = {}  # each load() path is looked up once for the whole sweep
    runs = [
        _lower(program, params={**params, **combo}, bindings=bindings, roots=roots, resolved=resolved)
        for combo in combos
    ]
    outputs: list[tuple[str, Node]] = []
    expressions: list[str] = []
    output_params: list[dict[str, float]] = []
    spans: dict[str, Span] = {}
    first = runs[0]
    for j, (name, _) in enumerate(first.graph.outputs):
        seen: dict[int, str] = {}
        # the swept parameters this output depends on: changing one alone changes its graph
        # (on a full grid that also catches every joint dependence, so labels never collide)
        deps = [p for p in sweeps if _varies(runs, combos, j, p)]
        for run, combo in zip(runs, combos, strict=True):
            node = run.graph.outputs[j][1]
            if id(node) in seen:
                continue
            # no brackets or other glob and shell characters: the label names files and directories
            label = name + ("." + ",".join(f"{p}={combo[p]:g}" for p in deps) if deps else "")
            seen[id(node)] = label
            outputs.append((label, node))
            expressions.append(run.graph.expressions[j])
            output_params.append(run.params)
            spans[label] = first.output_spans[name]
    graph = Graph(tuple(outputs), tuple(expressions))
    return Lowered(graph, first.params, spans, tuple(output_params), first.vocab)


def _varies(runs: Sequence[Lowered], combos: Sequence[dict[str, float]], j: int, p: str) -> bool:
    """Whether output ``j`` changes when only parameter ``p`` changes."""
    by_rest: dict[tuple[tuple[str, float], ...], set[int]] = {}
    for run, combo in zip(runs, combos, strict=True):
        rest = tuple(sorted((k, v) for k, v in combo.items() if k != p))
        by_rest.setdefault(rest, set()).add(id(run.graph.outputs[j][1]))
    return any(len(ids) > 1 for ids in by_rest.values())


def _lower(
    program: ast.Program,
    *,
    params: Mapping[str, ParamValue] | None,
    bindings: Mapping[str, Binding] | None,
    roots: Sequence[str | os.PathLike[str]] | None,
    resolved: dict[tuple[str, str], str] | None = None,
) -> Lowered:
    ctx = Lowering(program, roots, resolved)
    overrides = dict(params or {})
    _bind_external(ctx, bindings or {})

    declared: dict[str, float] = {}
    outputs: list[tuple[str, Node]] = []
    expressions: list[str] = []
    output_spans: dict[str, Span] = {}
    vocab_stmt: ast.Vocab | None = None
    vocab: VocabSpec | None = None
    tokens: list[TokenRule] = []
    statements = program.statements
    bare = [s for s in statements if isinstance(s, ast.ExprStmt)]
    if bare and (
        len(bare) > 1 or bare[0] is not statements[-1] or any(isinstance(s, ast.Output) for s in statements)
    ):
        stray = bare[0] if bare[0] is not statements[-1] or len(bare) == 1 else bare[1]
        raise TvTypeError(
            "a bare expression can only be the last line of a program without `output` lines",
            stray.span,
            label="its value would be lost",
            help="name it: `output NAME = ...`",
            code="E206",
        )

    for stmt in statements:
        if isinstance(stmt, ast.Param):
            if stmt.target.id in overrides:
                value = float(overrides.pop(stmt.target.id))  # type: ignore[arg-type]
            else:
                default = ctx.expr(stmt.default)
                v = scalar_value(default)
                if v is None:
                    raise TvTypeError(
                        "a parameter's default must be a number",
                        stmt.default.span,
                        label=f"this is a {default.kind}",
                        code="E202",
                    )
                value = v
            declared[stmt.target.id] = value
            ctx.bind(stmt.target, const(value, stmt.target.id), stmt.span)
        elif isinstance(stmt, ast.Binding):
            ctx.bind(stmt.target, ctx.expr(stmt.value), stmt.span)
        elif isinstance(stmt, ast.Define):
            ctx.define(stmt)
        elif isinstance(stmt, ast.Vocab):
            if vocab_stmt is not None:
                raise TvNameError(
                    "a program has one `vocab` statement", stmt.span, label="the second one", code="E211"
                )
            vocab_stmt = stmt
            vocab = _vocab(ctx, stmt)
        elif isinstance(stmt, ast.TokenRow):
            tokens.append(_token_rule(ctx, stmt))
        else:
            name = DEFAULT_OUTPUT if isinstance(stmt, ast.ExprStmt) else stmt.target.id
            if name in output_spans:
                raise TvNameError(f"two outputs named `{name}`", stmt.span, code="E205")
            node = ctx.expr(stmt.value)
            ctx.require_point_or_vector(node, stmt.value)
            layer_length(node)  # layer ranges combined in it agree
            weights = linear_form(node)
            if not weights:
                raise TvTypeError(
                    "the weights here cancel out: this output would be zero everywhere",
                    stmt.value.span,
                    code="E207",
                )
            huge = next((w for w in weights.values() if not abs(w) <= FLOAT32_MAX), None)
            if huge is not None:
                raise TvTypeError(
                    f"a weight of {huge:g} here is beyond the float32 range (±3.4e38)",
                    stmt.value.span,
                    label="16-bit inputs are accumulated in float32: every value would overflow",
                    code="E210",
                )
            outputs.append((name, node))
            expressions.append(stmt.value.span.text)
            output_spans[name] = stmt.span
            if len(outputs) > MAX_OUTPUTS:
                raise TvTypeError(f"more than {MAX_OUTPUTS} outputs", stmt.span, code="E208")
    if overrides:
        unknown = next(iter(overrides))
        close = _close_matches(unknown, list(declared))
        src = SourceText(f"{unknown}={overrides[unknown]:g}", "--set")
        raise TvParamError(
            f"no parameter named `{unknown}`",
            Span(src, 0, len(unknown)),
            label="overridden here",
            help=f"did you mean `{close[0]}`?"
            if close
            else ("parameters: " + ", ".join(declared) if declared else "this program declares no `param`"),
            code="E401",
        )
    if not outputs:
        end = len(program.source.text)
        raise TvTypeError(
            "nothing to compute",
            Span(program.source, end, end),
            help="add an output line: `output merged = ...`",
            code="E209",
        )
    if tokens:
        if vocab is None:
            raise TvNameError(
                "a `token` statement needs a `vocab` statement",
                tokens[0].span,
                help="say which vocabulary the output takes first: `vocab union` or `vocab MODEL`",
                code="E211",
            )
        seen: dict[str, TokenRule] = {}
        for rule in tokens:
            if rule.token in seen:
                raise TvNameError(f"two `token` statements for {rule.token!r}", rule.span, code="E211")
            seen[rule.token] = rule
        vocab = replace(vocab, tokens=tuple(tokens))
    return Lowered(
        Graph(tuple(outputs), tuple(expressions)),
        declared,
        output_spans,
        tuple(declared for _ in outputs),
        vocab,
    )


def _model_ref(ctx: Lowering, name: ast.Name, what: str) -> InputRef:
    """The checkpoint a name is bound to (a `vocab` or `token` statement names models)."""
    node = ctx.lookup(name)
    if node.op is not Op.INPUT or not node.kind.is_model:
        raise TvTypeError(
            f"{what} names a model, and `{name.id}` is a {node.kind}"
            + ("" if node.op is Op.INPUT else " expression"),
            name.span,
            help='bind the checkpoint to a name first: `chatml = load("path")`',
            code="E211",
        )
    ref = node.arg
    assert isinstance(ref, InputRef)
    return ref


VOCAB_OPTIONS = ("base", "pad_to")


def _vocab(ctx: Lowering, stmt: ast.Vocab) -> VocabSpec:
    from tvlang.ir.vocab import VocabSpec

    source = None if stmt.source.id == "union" else _model_ref(ctx, stmt.source, "`vocab`")
    base: InputRef | None = None
    pad_to: int | None = None
    seen: set[str] = set()
    for opt in stmt.options:
        key = opt.name.id
        if key not in VOCAB_OPTIONS or key in seen:
            close = _close_matches(key, VOCAB_OPTIONS)
            raise TvNameError(
                f"`{key}` given twice" if key in seen else f"`vocab` has no option `{key}`",
                opt.name.span,
                help=f"did you mean `{close[0]}`?"
                if close and key not in seen
                else "options: base=MODEL, pad_to=N",
                code="E211",
            )
        seen.add(key)
        if key == "base":
            if not isinstance(opt.value, ast.Name):
                raise TvTypeError("`base=` names a model", opt.value.span, code="E211")
            base = _model_ref(ctx, opt.value, "`base=`")
        else:
            value = scalar_value(ctx.expr(opt.value))
            if value is None or value != int(value) or value < 1:
                raise TvTypeError("`pad_to=` is a positive whole number", opt.value.span, code="E211")
            pad_to = int(value)
    return VocabSpec(source, base, pad_to, (), stmt.span)


def _token_rule(ctx: Lowering, stmt: ast.TokenRow) -> TokenRule:
    from tvlang.ir.vocab import TokenRule

    force = False
    for flag in stmt.flags:
        if flag.id != "force" or force:
            raise TvNameError(
                f"unknown `token` flag `{flag.id}`" if flag.id != "force" else "`force` given twice",
                flag.span,
                help="the one flag is `force` (this row also for models that have the token)",
                code="E211",
            )
        force = True
    if stmt.model.id == "zero":
        if stmt.index is not None:
            raise TvTypeError("`zero` has no rows to index", stmt.index.span, code="E211")
        return TokenRule(stmt.token.value, None, None, force, stmt.span)
    ref = _model_ref(ctx, stmt.model, "`token`")
    index: str | int | None = None
    if isinstance(stmt.index, ast.String):
        index = stmt.index.value
    elif isinstance(stmt.index, ast.Number):
        if stmt.index.value != int(stmt.index.value):
            raise TvTypeError("a row id is a whole number", stmt.index.span, code="E211")
        index = int(stmt.index.value)
    return TokenRule(stmt.token.value, ref, index, force, stmt.span)


def _bind_external(ctx: Lowering, bindings: Mapping[str, Binding]) -> None:
    """Caller bindings become names in scope before the program's first line."""
    order = sorted(bindings, key=lambda n: bindings[n].role == "task")  # tasks refer to their base
    for name in order:
        bound = bindings[name]
        src = SourceText(f"{name}={_describe(bound.value)}", f"--bind {name}")
        span = Span(src, 0, len(src.text))
        if not name.isidentifier():
            raise TvParamError(f"`{name}` is not a valid name", span, code="E403")
        target = ast.Name(name, Span(src, 0, len(name)))
        if bound.role == "scalar":
            ctx.bind(target, const(float(bound.value), name), None)
            continue
        kind: Kind = DELTA if bound.role == "delta" else MODEL
        if isinstance(bound.value, Mapping):
            ref = InputRef.memory(name, bound.value, kind, span)
        else:
            path = ctx.resolve_checkpoint(os.fspath(bound.value), span)
            ref = InputRef(path, name, kind, span)
        node = Node(Op.INPUT, (), ref, kind)
        if bound.role == "task":
            if bound.base not in ctx.env:
                raise TvParamError(
                    f"task vector `{name}` is relative to `{bound.base}`, which is not bound",
                    span,
                    help=f"bind the pretrained model too: `--bind {bound.base}=PATH`",
                    code="E404",
                )
            base = ctx.env[bound.base][0]
            node = Node(Op.SUB, (node, base), None, Kind(True, 1.0 - base.kind.mass))
            if not node.kind.is_delta:
                raise TvParamError(f"`{bound.base}` is not a model", span, code="E404")
        elif bound.role not in ("model", "delta"):
            raise TvParamError(f"unknown binding role {bound.role!r}", span, code="E403")
        ctx.bind(target, node, None)


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"<state dict of {len(value)} tensors>"
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else repr(value)


__all__ = ["SCALAR", "Binding", "Lowered", "lower"]
