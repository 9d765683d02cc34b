"""The IR: one small immutable node type, hash-consed.

Structurally equal nodes are the same object, so common subexpressions are
shared by construction (CSE for free) and passes can memoise on identity.

A tensor-valued node carries its :class:`Kind`: the sum of the weights of the
models it contains (its *mass*).  Mass 1 is a model, mass 0 a task vector
(delta); anything else is a partial combination that may only appear inside a
larger expression.

>>> a = Node(Op.CONST, (), (0.5, None), SCALAR)
>>> a is Node(Op.CONST, (), (0.5, None), SCALAR)
True
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tvlang.layermap import LayerView
from tvlang.source import Span


class Op(enum.Enum):
    CONST = "const"  # arg: (value, label or None)
    INPUT = "input"  # arg: InputRef
    ADD = "add"
    SUB = "sub"
    MUL = "mul"  # scalar * tensor, or scalar * scalar
    DIV = "div"  # tensor / scalar, or scalar / scalar
    NEG = "neg"
    POW = "pow"  # scalars only
    WSUM = "wsum"  # arg: weights (floats), one per arg: the linearised form
    CALL = "call"  # arg: element-wise function name (tvlang.ops.ELEMENTWISE); scalars broadcast
    REDUCE = "reduce"  # arg: sum, sumsq, dot, count or kth: a per-tensor scalar from passes over the data
    NUMEL = "numel"  # the element count of the operand tensor: a per-tensor scalar known from headers
    # arg: (seed, stream): uniform [0, 1) per element, keyed by (seed, stream, tensor name, index)
    RAND = "rand"
    # arg "kth", args (x, density): a model-wide scalar, the k-th largest x over every float tensor
    # that uses it, k = floor(density · their total element count)
    GLOBAL = "global"
    # arg: ("layer",) | ("num_layers",) | ("matches", pattern) | ("gradient", values): a per-tensor
    # number known from the tensor's name (tvlang.context), resolved when planning
    CTX = "ctx"
    # arg: ((offset, length), ...), one per operand: the operands' layers one after another (a
    # stacked model); a tensor takes the operand whose range holds its layer (embeddings the first,
    # other tensors outside the layers the last), resolved when planning (tvlang.passes.specialize)
    STACK = "stack"


@dataclass(frozen=True)
class Kind:
    """``scalar``, or a tensor whose model weights sum to ``mass``."""

    tensor: bool
    mass: float = 0.0

    @property
    def is_model(self) -> bool:
        return self.tensor and abs(self.mass - 1.0) <= MASS_TOLERANCE

    @property
    def is_delta(self) -> bool:
        return self.tensor and abs(self.mass) <= MASS_TOLERANCE

    def __str__(self) -> str:
        if not self.tensor:
            return "scalar"
        if self.is_model:
            return "model"
        if self.is_delta:
            return "delta"
        return f"{self.mass:g}×model"


# Weights are folded in float64; sums like 0.1 + 0.2 + 0.7 land within a few ulps of 1.
MASS_TOLERANCE = 1e-9

SCALAR = Kind(False)
MODEL = Kind(True, 1.0)
DELTA = Kind(True, 0.0)


class Origin(enum.Enum):
    """What an input is, which decides how it is opened (never read off its key)."""

    CHECKPOINT = "checkpoint"  # a safetensors file or Hugging Face directory (tvlang.io.checkpoint)
    ADAPTER = "adapter"  # a PEFT LoRA adapter directory (tvlang.io.lora): a sparse, low-rank task vector
    MEMORY = "memory"  # a state dict or module the caller bound; ``handle`` holds it


@dataclass(frozen=True)
class InputRef:
    """A checkpoint the program reads: identity is ``key``; the rest is for people.

    Make adapters and in-memory inputs with :meth:`adapter` and :meth:`memory`; the plain
    constructor is a checkpoint whose key is its absolute path."""

    key: str  # identity: the absolute path of a checkpoint; unique per adapter and in-memory mapping
    label: str  # binding name or path, for printing
    kind: Kind  # MODEL, or DELTA for a stored task vector
    span: Span | None = field(default=None, compare=False, hash=False)
    handle: Any = field(default=None, compare=False, hash=False, repr=False)  # the in-memory mapping
    view: LayerView | None = None  # a range of the checkpoint's layers, renumbered (tvlang.layermap)
    origin: Origin = Origin.CHECKPOINT
    path: str = field(default="", compare=False)  # where it lives on disk ("" in memory)

    def __post_init__(self) -> None:
        if self.origin is Origin.CHECKPOINT and not self.path:
            object.__setattr__(self, "path", self.base_key)

    @classmethod
    def adapter(cls, path: str, label: str, span: Span | None = None) -> InputRef:
        """A PEFT LoRA adapter directory at the absolute ``path`` (read as a task vector)."""
        return cls(f"adapter:{path}", label, DELTA, span, origin=Origin.ADAPTER, path=path)

    @classmethod
    def memory(cls, label: str, mapping: Any, kind: Kind, span: Span | None = None) -> InputRef:
        """A state dict (or module) the caller bound to ``label``: one input per object."""
        return cls(f"memory:{label}:{id(mapping)}", label, kind, span, mapping, origin=Origin.MEMORY)

    @property
    def base_key(self) -> str:
        """The checkpoint's own key (a view's ``key`` adds the view, so that each view is an input)."""
        return self.key.split(VIEW_MARK, 1)[0] if self.view is not None else self.key

    def viewed(self, view: LayerView) -> InputRef:
        """This checkpoint seen through ``view``."""
        return InputRef(
            f"{self.base_key}{VIEW_MARK}{view.text}",
            self.label,
            self.kind,
            self.span,
            self.handle,
            view,
            self.origin,
            self.path,
        )


VIEW_MARK = "#layers="


class Node:
    """An IR node: ``op`` applied to ``args`` with an op-specific payload ``arg``."""

    __slots__ = ("__weakref__", "arg", "args", "kind", "op")
    _cache: ClassVar[weakref.WeakValueDictionary[tuple[Any, ...], Node]] = weakref.WeakValueDictionary()

    op: Op
    args: tuple[Node, ...]
    arg: Any
    kind: Kind

    def __new__(cls, op: Op, args: tuple[Node, ...] = (), arg: Any = None, kind: Kind = SCALAR) -> Node:
        # ids are safe in the key: a live cached node keeps its args alive.
        key = (op, tuple(id(a) for a in args), arg, kind)
        node = cls._cache.get(key)
        if node is None:
            node = super().__new__(cls)
            object.__setattr__(node, "op", op)
            object.__setattr__(node, "args", args)
            object.__setattr__(node, "arg", arg)
            object.__setattr__(node, "kind", kind)
            cls._cache[key] = node
        return node

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("IR nodes are immutable")

    def __reduce__(self) -> Any:  # pragma: no cover - nodes are not meant to be pickled
        raise TypeError("IR nodes are not picklable")

    def __repr__(self) -> str:
        return f"Node({self.op.value}, {len(self.args)} args, {self.kind})"

    def toposort(self) -> list[Node]:
        """This node and everything below it, each once, operands before users."""
        return toposort([self])


def toposort(roots: list[Node], *, stop_at: Op | None = None) -> list[Node]:
    """Every node below ``roots``, each once, operands before users; nodes of op ``stop_at`` are
    listed but not descended into."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        args = () if node.op is stop_at else node.args
        if node.op is Op.WSUM and args and args[-1].kind.is_model:
            args = (args[-1], *args[:-1])  # an anchored sum's anchor first: listings start from the base
        stack.extend((a, False) for a in reversed(args) if id(a) not in seen)
    return order


def const(value: float, label: str | None = None) -> Node:
    return Node(Op.CONST, (), (float(value), label), SCALAR)


def scalar_value(node: Node) -> float | None:
    """The value of a scalar node built from constants, or None if it has none yet (memoised: nodes
    are immutable, and a deep shared DAG such as an unrolled iteration would otherwise be walked once
    per path)."""
    if node.kind.tensor:
        return None
    if node.op is Op.CONST:
        return float(node.arg[0])
    if node in _VALUES:
        return _VALUES[node]
    value = _scalar_value(node)
    _VALUES[node] = value
    return value


_VALUES: weakref.WeakKeyDictionary[Node, float | None] = weakref.WeakKeyDictionary()


def _scalar_value(node: Node) -> float | None:
    if node.op is Op.CALL:
        from tvlang.ops import ELEMENTWISE

        fn = ELEMENTWISE[node.arg].scalar
    elif node.op in _SCALAR_OPS:
        fn = _SCALAR_OPS[node.op]
    else:
        return None  # a per-tensor scalar: known only when planning or running
    vals = [scalar_value(a) for a in node.args]
    if any(v is None for v in vals):
        return None
    try:
        return float(fn(*vals))
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):  # TypeError: a complex result
        return None


def _div(a: float, b: float) -> float:
    return a / b


_SCALAR_OPS: dict[Op, Any] = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: _div,
    Op.NEG: lambda a: -a,
    Op.POW: lambda a, b: float(a**b),
}


@dataclass(frozen=True)
class Graph:
    """A whole program in IR: named outputs over shared nodes."""

    outputs: tuple[tuple[str, Node], ...]
    # The source text of each output's expression, stored in the output file's metadata.
    expressions: tuple[str, ...] = field(default=(), compare=False)

    def nodes(self) -> list[Node]:
        return toposort([n for _, n in self.outputs])

    def inputs(self) -> list[InputRef]:
        """The checkpoints this graph reads, in first-use order."""
        return [n.arg for n in self.nodes() if n.op is Op.INPUT]
