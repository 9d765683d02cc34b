"""Kind rules: which operations combine scalars, models and task vectors.

Every tensor value is an affine combination of checkpoints; its *mass* is the
sum of the weights of the models in it.  Arithmetic just adds and scales
masses; the rule is enforced where a value is *used* (an output, a function
argument), so ``a + b - c`` (mass 1) is a model even though ``a + b`` alone is
not.

>>> binary_kind("-", MODEL, MODEL, None, None)
Kind(tensor=True, mass=0.0)
>>> binary_kind("*", SCALAR, MODEL, 0.5, None)
Kind(tensor=True, mass=0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

from tvlang.ir.node import DELTA, MODEL, SCALAR, Kind

__all__ = ["DELTA", "MODEL", "SCALAR", "KindError", "binary_kind", "unary_kind"]


@dataclass
class KindError(Exception):
    """A rule violation; the lowering attaches the source span and raises a TvTypeError."""

    message: str
    label: str = ""
    help: str | None = None


def _noun(kind: Kind) -> str:
    return f"`{kind}`"


def unary_kind(op: str, operand: Kind) -> Kind:
    if op == "+":
        return operand
    return Kind(operand.tensor, -operand.mass) if operand.tensor else SCALAR


def binary_kind(op: str, left: Kind, right: Kind, lval: float | None, rval: float | None) -> Kind:
    """The kind of ``left op right``; ``lval``/``rval`` are the values of constant scalar operands.

    Task vectors (mass 0) are also plain vectors: they multiply and divide
    element-wise and take number offsets, which is what masks and user-written
    merge methods need.  Anything holding a model (mass ≠ 0) is only ever scaled
    by a number known before any data is read, so its mass stays known.
    """
    if not left.tensor and not right.tensor:
        if op == "/" and rval == 0.0:
            raise KindError("division by zero", "this is zero")
        return SCALAR
    if op in ("+", "-"):
        if left.tensor != right.tensor:
            tensor = left if left.tensor else right
            if tensor.is_delta:
                return DELTA
            scalar_side = "left" if not left.tensor else "right"
            verb = "add" if op == "+" else "subtract"
            raise KindError(
                f"cannot {verb} a scalar and a {'model' if tensor.is_model else 'tensor'}",
                f"the {scalar_side} side is a number",
                help="scale tensors with `*` (e.g. `0.5*delta`); adding a number to every weight is not "
                "task arithmetic",
            )
        sign = 1.0 if op == "+" else -1.0
        return Kind(True, left.mass + sign * right.mass)
    if op == "*":
        if left.tensor and right.tensor:
            if left.is_delta and right.is_delta:
                return DELTA
            raise KindError(
                f"cannot multiply {_noun(left)} by {_noun(right)}",
                "both sides are tensors",
                help="only a number can scale a model; task vectors multiply element-wise",
            )
        s, t = (lval, right) if not left.tensor else (rval, left)
        if t.is_delta:
            return DELTA
        if s is None:
            raise KindError(
                f"a {t} can only be scaled by a number known before any data is read",
                "this scale depends on the tensor",
                help="scale the task vector instead, e.g. `base + t*(ft - base)`",
            )
        return Kind(True, t.mass * s)
    if op == "/":
        if right.tensor:
            if right.is_delta and (left.is_delta or not left.tensor):
                return DELTA
            raise KindError(
                f"cannot divide {_noun(left) + ' ' if left.tensor else ''}by {_noun(right)}",
                "the divisor is a tensor",
                help="divide by a number, e.g. `(a + b) / 2`; task vectors divide element-wise",
            )
        if rval == 0.0:
            raise KindError("division by zero", "this is zero")
        if left.is_delta:
            return DELTA
        if rval is None:
            raise KindError(
                f"a {left} can only be divided by a number known before any data is read",
                "this divisor depends on the tensor",
            )
        return Kind(True, left.mass / rval)
    if op == "**":
        raise KindError(
            f"cannot raise {_noun(left if left.tensor else right)} to a power",
            "`**` works on numbers only",
        )
    raise AssertionError(f"unknown operator {op}")
