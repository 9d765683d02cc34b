"""The functions a program can call: one literal table.

Each entry declares its parameters (with the kind each must have) and how it
lowers to IR.  The checker reads the declarations, so misuse is a positioned
error like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tvlang.ir.node import DELTA, MODEL, InputRef, Node, Op
from tvlang.source import Span

if TYPE_CHECKING:
    from tvlang.lower import Lowering

REQUIRED: Any = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str  # "path" (a string), "scalar", "tensor"
    default: Any = REQUIRED


@dataclass(frozen=True)
class Builtin:
    name: str
    params: tuple[ParamSpec, ...]
    summary: str
    lower: Callable[[Lowering, dict[str, Any], dict[str, Span], Span], Node]


def _load(kind_name: str) -> Callable[[Lowering, dict[str, Any], dict[str, Span], Span], Node]:
    kind = MODEL if kind_name == "model" else DELTA

    def lower(ctx: Lowering, args: dict[str, Any], spans: dict[str, Span], span: Span) -> Node:
        path = ctx.resolve_checkpoint(args["path"], spans["path"])
        return Node(Op.INPUT, (), InputRef(path, args["path"], kind, span), kind)

    return lower


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "load",
            (ParamSpec("path", "path"),),
            "a model: a .safetensors file or a (sharded) Hugging Face directory, relative to the .tv file",
            _load("model"),
        ),
        Builtin(
            "delta",
            (ParamSpec("path", "path"),),
            "a stored task vector (fine-tuned minus base), in the same formats as load()",
            _load("delta"),
        ),
    )
}
