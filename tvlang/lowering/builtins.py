"""The functions a program can call: one literal table.

Each entry declares its parameters (with the kind each must have), a summary,
a paper link where there is one, and how it lowers to IR.  The lowering checks
calls against these declarations, so misuse is a positioned error like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tvlang.check import KindError
from tvlang.errors import TvTypeError
from tvlang.ir.build import call, context, div, mul, numel, rand, reduce, sub
from tvlang.ir.node import DELTA, MODEL, Graph, InputRef, Kind, Node, Op, scalar_value
from tvlang.layermap import LayerView
from tvlang.lowering import methods
from tvlang.ops import ELEMENTWISE, ElementwiseOp
from tvlang.passes.rewrite import rewrite
from tvlang.source import Span


class Lowering(Protocol):
    """What a builtin needs of the lowering that calls it (:class:`tvlang.lowering.lower.Lowering`):
    builtins are a table the lowering reads, so they never import it."""

    expansions: list[str]  # call sites of the user methods being expanded (random streams)

    def resolve_checkpoint(self, path: str, span: Span) -> str: ...


REQUIRED: Any = object()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a built-in function: its name, kind and default."""

    name: str
    # "path" | "string" (a string literal), "number" (a scalar, possibly per tensor), "int" (a
    # constant integer), "model" | "delta" | "tensor" (either), "value" (a number or a tensor),
    # "numbers" (a list of scalars)
    kind: str
    default: Any = REQUIRED
    variadic: bool = False  # collects the remaining positional arguments
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Builtin:
    """A built-in function: its parameters and how a call lowers to the IR."""

    name: str
    params: tuple[ParamSpec, ...]
    summary: str
    lower: Callable[[Lowering, dict[str, Any], dict[str, Span], Span], Node]
    paper: str = ""
    group: str = "function"  # "input", "element-wise", "reduction", "context", "structure", "method"


Lower = Callable[["Lowering", dict[str, Any], dict[str, Span], Span], Node]


def _load(kind: Kind) -> Lower:
    def lower(ctx: Lowering, args: dict[str, Any], spans: dict[str, Span], span: Span) -> Node:
        path = ctx.resolve_checkpoint(args["path"], spans["path"])
        return Node(Op.INPUT, (), InputRef(path, args["path"], kind, span), kind)

    return lower


def _lower_lora(ctx: Lowering, args: dict[str, Any], spans: dict[str, Span], span: Span) -> Node:
    path = ctx.resolve_checkpoint(args["path"], spans["path"])
    ref = InputRef.adapter(path, args["path"], span)
    return Node(Op.INPUT, (), ref, DELTA)


def _elementwise(op: ElementwiseOp) -> Lower:
    """On numbers: a number.  On tensors: the entry's kind rule (tvlang.ops.KIND_RULES): ``keeps`` and
    ``select`` give a model when every tensor operand they look at is a model; a vector (delta)
    otherwise."""
    name = op.name

    def lower(ctx: Lowering, args: dict[str, Any], spans: dict[str, Span], span: Span) -> Node:
        values = [args[p.name] for p in BUILTINS[name].params]
        selected = values[1:] if op.kind == "select" else values
        tensors = [v for v in selected if v.kind.tensor]
        kind = None
        if op.kind != "vector" and tensors and all(t.kind.is_model for t in tensors):
            if len(tensors) != len(selected):
                raise KindError(f"`{name}` cannot mix a model with numbers")
            kind = MODEL
        elif any(t.kind.tensor and not t.kind.is_delta for t in values):
            raise KindError(f"`{name}` works on numbers and task vectors, not on models")
        return call(name, *values, kind=kind)

    return lower


def _apply(fn: Callable[..., Node]) -> Lower:
    """Lower by calling ``fn`` with the checked argument values as keywords."""

    def lower(ctx: Lowering, args: dict[str, Any], spans: dict[str, Span], span: Span) -> Node:
        return fn(**args)

    return lower


def _streams(ctx: Lowering, spans: dict[str, Span], name: str, count: int = 1) -> list[str]:
    """Random-stream names for a method's operands: each operand's source text, prefixed by the
    calls of user methods it was expanded from (so ``my(x)`` and ``my(y)`` draw different masks)."""
    texts = [
        spans[f"{name}[{i}]"].text if f"{name}[{i}]" in spans else spans[name].text for i in range(count)
    ]
    return ["/".join([*ctx.expansions, t]) for t in texts]


def _weights(args: dict[str, Any], n: int, what: str = "weights") -> list[Node | float]:
    weights = args.get(what)
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise KindError(f"{len(weights)} {what} for {n} operands", "one per operand")
    return list(weights)


def _lower_ties(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    deltas = a["deltas"]
    return methods.ties(deltas, _weights(a, len(deltas)), a["density"], a["elect"], a["divide"], a["scope"])


def _dared(ctx: Lowering, a: dict[str, Any], s: dict[str, Span]) -> list[Node]:
    streams = _streams(ctx, s, "deltas", len(a["deltas"]))
    return [
        methods.dare(d, sub(1.0, a["density"]), a["seed"], stream, a["rescale"])
        for d, stream in zip(a["deltas"], streams, strict=True)
    ]


def _lower_dare_ties(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    dared = _dared(ctx, a, s)
    return methods.ties(dared, _weights(a, len(dared)), 1.0, a["elect"], a["divide"])


def _lower_dare_linear(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    dared = _dared(ctx, a, s)
    return methods.linear(dared, _weights(a, len(dared)), normalize=False)


def _lower_linear(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    models = a["models"]
    return methods.linear(models, _weights(a, len(models)), bool(_const(a["normalize"], "normalize")))


def _lower_multislerp(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    models = a["models"]
    normalize = bool(_const(a["normalize"], "normalize"))
    return methods.multislerp(models, _weights(a, len(models)), normalize, _const(a["eps"], "eps"))


def _const(node: Node | float, what: str) -> float:
    value = node if isinstance(node, float) else scalar_value(node)
    if value is None:
        raise KindError(f"`{what}` must be a number known before any data is read")
    return value


WHOLE = -1  # the layer length of a whole model (not a range): known only from its header


def layer_length(node: Node) -> tuple[int | None, Span | None]:
    """How many layers a value spans: a range's length, ``WHOLE`` for whole models, None for numbers;
    with where that was fixed.  Ranges of different lengths, or a range combined with a whole model,
    are an error (E211) at the second of them."""
    memo: dict[int, tuple[int | None, Span | None]] = {}
    for n in node.toposort():
        if n.op is Op.INPUT:
            view = n.arg.view
            memo[id(n)] = (view.length, view.span) if view is not None else (WHOLE, n.arg.span)
        elif n.op is Op.STACK:
            memo[id(n)] = (sum(length for _, length in n.arg), memo[id(n.args[0])][1])
        else:
            found: tuple[int | None, Span | None] = (None, None)
            for a in n.args:
                length, span = memo[id(a)]
                if length is None:
                    continue
                if found[0] is not None and length != found[0]:
                    raise _mismatch(found, (length, span))
                if found[0] is None:
                    found = (length, span)
            memo[id(n)] = found
    return memo[id(node)]


def _describe_length(length: int | None) -> str:
    return "a whole model" if length == WHOLE else f"{length} layer{'s' if length != 1 else ''}"


def _mismatch(first: tuple[int | None, Span | None], second: tuple[int | None, Span | None]) -> TvTypeError:
    where = ""
    if first[1] is not None:
        line, col = first[1].line_col()
        where = f" (`{first[1].text}`, at {line}:{col})"
    whole = WHOLE in (first[0], second[0])
    return TvTypeError(
        f"this combines {_describe_length(second[0])} with {_describe_length(first[0])}{where}",
        second[1],
        label=f"{_describe_length(second[0])} here",
        help="take the same range of every model: `layers(b, 8, 16)` beside `layers(a, 8, 16)`"
        if whole
        else "the layer ranges combined in one slice must have the same length",
        code="E212",
    )


def _viewed(node: Node, make: Callable[[LayerView | None], LayerView]) -> Node:
    """``node`` with every input seen through ``make(its view)``."""

    def rule(n: Node, args: tuple[Node, ...]) -> Node:
        if n.op is Op.INPUT:
            return Node(Op.INPUT, (), n.arg.viewed(make(n.arg.view)), n.kind)
        return (
            n if all(a is b for a, b in zip(args, n.args, strict=True)) else Node(n.op, args, n.arg, n.kind)
        )

    return rewrite(Graph((("x", node),)), rule).outputs[0][1]


def _lower_layers(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    x, lo, hi = a["x"], a["start"], a["stop"]
    if lo < 0 or hi <= lo:
        raise TvTypeError(
            f"`layers` needs 0 <= start < stop, not {lo}, {hi}",
            span,
            help="layers(a, 8, 16) is a's layers 8 to 15",
            code="E212",
        )
    length, _ = layer_length(x)
    if length != WHOLE:
        raise TvTypeError(
            "`layers` takes a range of whole models, not of a range",
            s["x"],
            label=f"this is already {_describe_length(length)}",
            help="take the range from the models themselves: `layers(a, 8, 16)`",
            code="E212",
        )
    view = LayerView(lo, hi, span=span)
    return Node(Op.STACK, (_viewed(x, lambda _: view),), ((0, hi - lo),), x.kind)


def _lower_stack(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    parts: list[Node] = a["slices"]
    kind = parts[0].kind
    segments: list[Node] = []
    frames: list[tuple[int, int]] = []
    offset = 0
    for i, part in enumerate(parts):
        at = s[f"slices[{i}]"]
        length, _ = layer_length(part)
        if length is None or length == WHOLE:
            raise TvTypeError(
                "`stack` takes layer ranges",
                at,
                label="this is a whole model" if length == WHOLE else "this is a number",
                help="give the range: `layers(a, 0, 24)`",
                code="E212",
            )
        if part.kind.is_model != kind.is_model:
            raise TvTypeError(
                "`stack` cannot stack models and task vectors together",
                at,
                label=f"this is a {part.kind}, the first slice a {kind}",
                code="E212",
            )
        first, last = i == 0, i == len(parts) - 1
        moved = _viewed(part, _shifter(offset, first, last))
        if moved.op is Op.STACK:  # a range or a stack: its slices become this stack's
            segments.extend(moved.args)
            frames.extend((offset + o, n) for o, n in moved.arg)
        else:
            segments.append(moved)
            frames.append((offset, length))
        offset += length
    return Node(Op.STACK, tuple(segments), tuple(frames), MODEL if kind.is_model else DELTA)


def _shifter(by: int, pre: bool, post: bool) -> Callable[[LayerView | None], LayerView]:
    def shift(view: LayerView | None) -> LayerView:
        assert view is not None  # layer_length found a range in every input
        return view.shifted(by, pre=pre, post=post)

    return shift


def _lower_scale(ctx: Lowering, a: dict[str, Any], s: dict[str, Span], span: Span) -> Node:
    """Every element times a number.  Of a task vector, plain scaling; of a model, a new checkpoint
    that counts as the model it scales (like slerp's result, not an affine combination): mergekit's
    passthrough ``scale``, e.g. zeroing ``o_proj`` in repeated layers."""
    x, factor = a["x"], a["s"]
    if x.kind.is_delta:
        return mul(factor, x)
    return Node(Op.MUL, (factor, x), None, x.kind)


def _p(name: str, kind: str, default: Any = REQUIRED, **kw: Any) -> ParamSpec:
    return ParamSpec(name, kind, default, **kw)


_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_ELECT = _p("elect", "string", "sum", choices=("sum", "count"))
_DIVIDE = _p("divide", "string", "weights", choices=("weights", "count", "none"))
_SCOPE = _p("scope", "string", "tensor", choices=("tensor", "model"))

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "load",
            (_p("path", "path"),),
            "a model: a .safetensors file or a (sharded) Hugging Face "
            "directory, relative to the program file",
            _load(MODEL),
            group="input",
        ),
        Builtin(
            "lora",
            (_p("path", "path"),),
            "a PEFT LoRA adapter directory as a task vector: scale·B@A on the layers it targets, formed "
            "chunk by chunk (never a dense copy), zero elsewhere",
            _lower_lora,
            group="input",
        ),
        Builtin(
            "delta",
            (_p("path", "path"),),
            "a stored task vector (fine-tuned minus base), in the same formats as load()",
            _load(DELTA),
            group="input",
        ),
        *(
            Builtin(
                op.name,
                tuple(_p(n, kind) for n, kind in op.parameters),
                op.summary,
                _elementwise(op),
                group="element-wise",
            )
            for op in ELEMENTWISE.values()
            if op.operator is None  # comparisons are operators
        ),
        Builtin(
            "sum",
            (_p("x", "tensor"),),
            "the sum of all elements (per tensor)",
            _apply(lambda x: reduce("sum", x)),
            group="reduction",
        ),
        Builtin(
            "mean",
            (_p("x", "tensor"),),
            "the mean of all elements",
            _apply(lambda x: div(reduce("sum", x), numel(x))),
            group="reduction",
        ),
        Builtin(
            "norm",
            (_p("x", "tensor"),),
            "the L2 norm of the whole tensor",
            _apply(lambda x: call("sqrt", reduce("sumsq", x))),
            group="reduction",
        ),
        Builtin(
            "dot",
            (_p("x", "tensor"), _p("y", "tensor")),
            "the dot product of two tensors, flattened",
            _apply(lambda x, y: reduce("dot", x, y)),
            group="reduction",
        ),
        Builtin(
            "count",
            (_p("x", "tensor"),),
            "the number of non-zero elements",
            _apply(lambda x: reduce("count", x)),
            group="reduction",
        ),
        Builtin(
            "numel",
            (_p("x", "tensor"),),
            "the number of elements (from the header; no pass)",
            _apply(lambda x: numel(x)),
            group="reduction",
        ),
        Builtin(
            "kth",
            (_p("x", "tensor"), _p("k", "number")),
            "the k-th largest element (exact radix selection over the chunks; +inf for k < 1)",
            _apply(lambda x, k: methods.kth(x, k)),
            group="reduction",
        ),
        Builtin(
            "quantile",
            (_p("x", "tensor"), _p("q", "number")),
            "the q-quantile (lower): the k-th smallest element with k = floor(q·(numel-1)) + 1",
            _apply(lambda x, q: methods.kth(x, sub(numel(x), call("floor", mul(q, sub(numel(x), 1.0)))))),
            group="reduction",
        ),
        Builtin(
            "rand",
            (_p("like", "tensor"), _p("seed", "int", 0)),
            "uniform [0, 1) per element, keyed by (seed, the operand's checkpoints, tensor name, index): "
            "the same bits for any chunking, thread count or device",
            lambda ctx, a, s, sp: rand(a["like"], a["seed"], _streams(ctx, s, "like")[0]),
            group="element-wise",
        ),
        Builtin(
            "matches",
            (_p("pattern", "string"),),
            "1 for tensors whose name matches the glob (or `re:` regular expression), else 0",
            lambda ctx, a, s, sp: context("matches", a["pattern"]),
            group="context",
        ),
        Builtin(
            "layer",
            (),
            "the tensor's layer index (from `layers.N.`, `h.N.`, `blocks.N.` …), -1 outside the layers",
            lambda ctx, a, s, sp: context("layer"),
            group="context",
        ),
        Builtin(
            "num_layers",
            (),
            "the number of layers of the output's template checkpoint",
            lambda ctx, a, s, sp: context("num_layers"),
            group="context",
        ),
        Builtin(
            "gradient",
            (_p("values", "numbers"),),
            "mergekit's gradient: the list interpolated along the layers (embeddings take the first "
            "value, the final norm and head the last)",
            lambda ctx, a, s, sp: context("gradient", tuple(_const(v, "gradient") for v in a["values"])),
            group="context",
        ),
        Builtin(
            "layers",
            (_p("x", "tensor"), _p("start", "int"), _p("stop", "int")),
            "layers start..stop-1 of a model (or of each model in a task vector), renumbered from 0; "
            "embeddings, final norm and head come along",
            _lower_layers,
            group="structure",
        ),
        Builtin(
            "stack",
            (_p("slices", "tensor", variadic=True),),
            "layer ranges one after another: a deeper model; embeddings from the first slice, final "
            "norm and head from the last; layer() and gradient() inside a slice count its own layers",
            _lower_stack,
            group="structure",
        ),
        Builtin(
            "scale",
            (_p("x", "tensor"), _p("s", "number")),
            "every element times s (a number, possibly per tensor); a scaled model counts as a model: "
            "mergekit's passthrough `scale`",
            _lower_scale,
            group="structure",
        ),
        Builtin(
            "magnitude_prune",
            (_p("d", "delta"), _p("density", "number"), _SCOPE),
            "keep the floor(density·numel) largest magnitudes of a task vector (per tensor, or over the model)",
            _apply(methods.magnitude_prune),
            group="method",
            paper=_TIES,
        ),
        Builtin(
            "breadcrumbs",
            (_p("d", "delta"), _p("density", "number"), _p("gamma", "number", 0.01)),
            "drop the largest gamma share (outliers) and the smallest magnitudes, keeping density",
            _apply(methods.breadcrumbs),
            group="method",
            paper="https://arxiv.org/abs/2312.06795",
        ),
        Builtin(
            "dare",
            (
                _p("d", "delta"),
                _p("p", "number"),
                _p("seed", "int", 0),
                _p("rescale", "string", "inverse", choices=("inverse", "l1", "none")),
            ),
            "drop elements with probability p (seeded), rescale by 1/(1-p), to the L1 norm, or not",
            lambda ctx, a, s, sp: methods.dare(
                a["d"], a["p"], a["seed"], _streams(ctx, s, "d")[0], a["rescale"]
            ),
            group="method",
            paper=_DARE,
        ),
        Builtin(
            "della",
            (
                _p("d", "delta"),
                _p("density", "number"),
                _p("epsilon", "number"),
                _p("seed", "int", 0),
                _p("rescale", "string", "l1", choices=("l1", "inverse", "none")),
            ),
            "DELLA MagPrune: keep each element with a probability that rises with its magnitude rank in its row",
            lambda ctx, a, s, sp: methods.della(
                a["d"],
                _const(a["density"], "density"),
                _const(a["epsilon"], "epsilon"),
                a["seed"],
                _streams(ctx, s, "d")[0],
                a["rescale"],
            ),
            group="method",
            paper="https://arxiv.org/abs/2406.11617",
        ),
        Builtin(
            "ties",
            (
                _p("deltas", "delta", variadic=True),
                _p("weights", "numbers", None),
                _p("density", "number", 1.0),
                _ELECT,
                _DIVIDE,
                _SCOPE,
            ),
            "TIES-merging: trim, elect signs, disjoint mean (a task vector)",
            _lower_ties,
            group="method",
            paper=_TIES,
        ),
        Builtin(
            "dare_ties",
            (
                _p("deltas", "delta", variadic=True),
                _p("weights", "numbers", None),
                _p("density", "number", 1.0),
                _p("seed", "int", 0),
                _p("rescale", "string", "l1", choices=("inverse", "l1", "none")),
                _ELECT,
                # mergekit's dare_ties does not normalise (default_normalize=False), unlike its ties
                _p("divide", "string", "none", choices=("weights", "count", "none")),
            ),
            "DARE (keep probability density, mergekit's L1 rescale) then TIES sign election, summed",
            _lower_dare_ties,
            group="method",
            paper=_DARE,
        ),
        Builtin(
            "dare_linear",
            (
                _p("deltas", "delta", variadic=True),
                _p("weights", "numbers", None),
                _p("density", "number", 1.0),
                _p("seed", "int", 0),
                _p("rescale", "string", "l1", choices=("inverse", "l1", "none")),
            ),
            "DARE then a weighted sum of the task vectors",
            _lower_dare_linear,
            group="method",
            paper=_DARE,
        ),
        Builtin(
            "linear",
            (
                _p("models", "tensor", variadic=True),
                _p("weights", "numbers", None),
                _p("normalize", "number", 1.0),
            ),
            "a weighted average of models (divided by the summed weights when normalize ≠ 0)",
            _lower_linear,
            group="method",
            paper="https://arxiv.org/abs/2203.05482",
        ),
        Builtin(
            "lerp",
            (_p("a", "tensor"), _p("b", "tensor"), _p("t", "number")),
            "a + t·(b - a)",
            _apply(methods.lerp),
            group="method",
        ),
        Builtin(
            "slerp",
            (_p("a", "tensor"), _p("b", "tensor"), _p("t", "number")),
            "spherical interpolation per tensor (linear when nearly colinear)",
            _apply(methods.slerp),
            group="method",
        ),
        Builtin(
            "nuslerp",
            (
                _p("a", "tensor"),
                _p("b", "tensor"),
                _p("t", "number", 0.5),
                _p("per", "string", "tensor", choices=("tensor", "row", "column")),
            ),
            "mergekit's nuslerp over the whole tensor (or per row or column); with a base write "
            "base + nuslerp(a - base, b - base, t)",
            _apply(methods.nuslerp),
            group="method",
        ),
        Builtin(
            "multislerp",
            (
                _p("models", "tensor", variadic=True),
                _p("weights", "numbers", None),
                _p("normalize", "number", 1.0),
                _p("eps", "number", 1e-8),
            ),
            "barycentric spherical interpolation of several tensors (mergekit's multislerp); with a base "
            "write base + multislerp(a - base, b - base, ...)",
            _lower_multislerp,
            group="method",
            paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        ),
        Builtin(
            "karcher",
            (_p("models", "tensor", variadic=True), _p("max_iter", "int", 10), _p("tol", "number", 1e-5)),
            "the Riemannian (Karcher) mean of the tensors' directions, scaled by their mean norm",
            lambda ctx, a, s, sp: methods.karcher(a["models"], a["max_iter"], _const(a["tol"], "tol")),
            group="method",
            paper="https://arxiv.org/abs/2603.04972",
        ),
        Builtin(
            "sce",
            (_p("deltas", "delta", variadic=True), _p("select_topk", "number", 1.0)),
            "SCE: keep the top-variance elements, weight task vectors by their mean square, erase minority signs",
            lambda ctx, a, s, sp: methods.sce(a["deltas"], a["select_topk"]),
            group="method",
            paper="https://arxiv.org/abs/2408.07990",
        ),
        Builtin(
            "ram",
            (_p("deltas", "delta", variadic=True), _p("epsilon", "number", 1e-5)),
            "Reinforced Agent Merging: keep entries one task vector changes, average those several change",
            lambda ctx, a, s, sp: methods.ram(a["deltas"], a["epsilon"]),
            group="method",
            paper="https://arxiv.org/abs/2601.13572",
        ),
        Builtin(
            "ramplus",
            (
                _p("deltas", "delta", variadic=True),
                _p("r", "number", 0.1),
                _p("alpha", "number", 0.2),
                _p("epsilon", "number", 1e-5),
            ),
            "RAM+: ram, with each task vector's unique entries scaled up by its shared/unique ratio",
            lambda ctx, a, s, sp: methods.ramplus(a["deltas"], a["r"], a["alpha"], a["epsilon"]),
            group="method",
            paper="https://arxiv.org/abs/2601.13572",
        ),
        Builtin(
            "arcee_fusion",
            (_p("base", "model"), _p("model", "model")),
            "take the model's value where its importance (|change| × the row's softmax KL divergence) "
            "reaches median + 1.5·IQR",
            _apply(methods.arcee_fusion),
            group="method",
        ),
        Builtin(
            "model_stock",
            (
                _p("base", "model"),
                _p("models", "model", variadic=True),
                _p("per", "string", "tensor", choices=("tensor", "row")),
            ),
            "Model Stock: move from the base toward the mean by the angle between task vectors "
            "(over the whole tensor, or per row)",
            lambda ctx, a, s, sp: methods.model_stock(a["base"], a["models"], a["per"]),
            group="method",
            paper="https://arxiv.org/abs/2403.19522",
        ),
        Builtin(
            "nearswap",
            (_p("base", "model"), _p("model", "model"), _p("t", "number")),
            "move each element toward model by clamp(t/|model - base|, 0, 1)",
            _apply(methods.nearswap),
            group="method",
        ),
    )
}
