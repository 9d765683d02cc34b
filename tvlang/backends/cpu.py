"""CPU kernels: chunked, in place on reused buffers, through torch.

Each worker thread owns a :class:`Scratch`; a kernel writes into it and into
the output chunk and never allocates on the per-chunk path.

The weighted sum's reference semantics (which a GPU backend must match):
``acc = 0; for (w, x) in terms: acc = fma(w, x, acc)`` in the accumulation
dtype (float32 for 16-bit inputs, float64 when any input or the output is
32-bit or wider), a term ``x`` being an input or its difference ``m - a`` from
the anchor (one subtraction in that dtype), then one round-to-nearest-even
conversion to the output dtype.  Element-wise, so the bits do not depend on
chunking or threads.

Non-finite values (see docs/safety.md): :func:`all_finite` is the cheap test every
rounded output chunk gets, one min/max reduction into reused 0-dim tensors; only
when it fails does :func:`census` look at the chunk's inputs and accumulator to
say why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tvlang.chunks import numpy_dtype
from tvlang.dtypes import torch_dtype
from tvlang.plan.plan import Copy, Kernel, WeightedSum

if TYPE_CHECKING:
    import torch


def acc_dtype(code: str) -> torch.dtype:
    """The torch dtype of an accumulation code (``F32``, ``F64``)."""
    return torch_dtype(code)


class Scratch:
    """Per-thread reusable buffers, one per (role, dtype), grown to the largest chunk seen: numpy
    arrays of a storage dtype (:meth:`array`, the compiled path's) or torch tensors (:meth:`get`,
    the eager path's; torch is imported only then)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, Any], Any] = {}

    def get(self, role: object, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._buffers.get((role, dtype))
        if buf is None or buf.numel() < n:
            import torch

            buf = torch.empty(n, dtype=dtype)
            self._buffers[(role, dtype)] = buf
        result: torch.Tensor = buf[:n]
        return result

    def array(self, role: object, code: str, n: int) -> np.ndarray[Any, Any]:
        """A numpy buffer of ``code``'s storage dtype (:func:`tvlang.chunks.numpy_dtype`)."""
        dtype = numpy_dtype(code)
        buf = self._buffers.get((role, dtype))
        if buf is None or buf.size < n:
            buf = np.empty(n, dtype=dtype)
            self._buffers[(role, dtype)] = buf
        result: np.ndarray[Any, Any] = buf[:n]
        return result

    def bounds(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reused 0-dim tensors for a (min, max) reduction's results."""
        lo = self._buffers.get(("min", dtype))
        hi = self._buffers.get(("max", dtype))
        if lo is None or hi is None:
            import torch

            lo = self._buffers[("min", dtype)] = torch.empty((), dtype=dtype)
            hi = self._buffers[("max", dtype)] = torch.empty((), dtype=dtype)
        return lo, hi


def run_kernel(
    kernel: Kernel,
    views: Mapping[int, torch.Tensor],
    out: torch.Tensor,
    scratch: Scratch,
    widened: dict[tuple[int, int | None, torch.dtype], torch.Tensor] | None = None,
) -> None:
    """Compute one output chunk into ``out`` from the input chunks ``views`` (by input index).

    ``widened`` caches each term of the chunk in the accumulation dtype (an input, or its
    difference from the anchor), so that the outputs of one chunk (a sweep writes many) widen
    every input and form every difference once, not once per output."""
    if isinstance(kernel, Copy):
        out.copy_(views[kernel.source])
        return
    assert isinstance(kernel, WeightedSum)
    acc = scratch.get("acc", acc_dtype(kernel.acc), out.numel())
    acc.zero_()
    cache = {} if widened is None else widened
    for weight, slot, minus in kernel.terms:
        acc.add_(_term(slot, minus, views, acc, scratch, cache), alpha=weight)
    out.copy_(acc)  # the one rounding


def _term(
    slot: int,
    minus: int | None,
    views: Mapping[int, torch.Tensor],
    acc: torch.Tensor,
    scratch: Scratch,
    cache: dict[tuple[int, int | None, torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """Input ``slot`` (less input ``minus``) in the accumulation dtype, from the cache or into a
    reused buffer: a mixed-dtype add_ would allocate a converted copy of the chunk on every call
    (measured: +60–110 MiB peak RSS).  Widening is exact, and so is the difference of two 16-bit
    values in float32 (two 32-bit ones in float64) unless their magnitudes are 2¹⁵ (2²⁹) apart."""
    import torch

    key = (slot, minus, acc.dtype)
    if key in cache:
        return cache[key]
    x = views[slot]
    if minus is None:
        if x.dtype == acc.dtype:
            return x
        cache[key] = scratch.get(("widened", slot), acc.dtype, acc.numel()).copy_(x)
    else:
        anchor = _term(minus, None, views, acc, scratch, cache)
        buf = scratch.get(("difference", slot, minus), acc.dtype, acc.numel())
        if x.dtype == acc.dtype:
            torch.sub(x, anchor, out=buf)
        else:
            buf.copy_(x).sub_(anchor)
        cache[key] = buf
    return cache[key]


# Dtypes with a CPU min/max reduction and isinf; float8 values are widened first (rare, not fast).
_REDUCIBLE = frozenset({"torch.bfloat16", "torch.float16", "torch.float32", "torch.float64"})


def accumulator(kernel: WeightedSum, scratch: Scratch, n: int) -> torch.Tensor:
    """The accumulator :func:`run_kernel` last used for ``kernel`` (it holds that chunk's exact sums)."""
    return scratch.get("acc", acc_dtype(kernel.acc), n)


def all_finite(x: torch.Tensor, scratch: Scratch) -> bool:
    """True when no element of the float chunk ``x`` is NaN or ±inf.

    One pass: ``aminmax`` into two reused 0-dim tensors (NaN propagates to both
    results, and an infinity is the min or the max), about a tenth of a 5-input
    kernel's time; ``isfinite(x).all()`` allocates and costs as much as the kernel.
    """
    import torch

    if x.numel() == 0:
        return True
    if str(x.dtype) not in _REDUCIBLE:
        wide = scratch.get("widen", torch.float32, x.numel())
        wide.copy_(x)
        x = wide
    lo, hi = scratch.bounds(x.dtype)
    torch.aminmax(x, out=(lo, hi))
    return -math.inf < lo.item() and hi.item() < math.inf


def output_finite(kernel: Kernel, out: torch.Tensor, scratch: Scratch) -> bool:
    """The hot-path check after :func:`run_kernel`: is this output chunk free of NaN and ±inf?

    Copies (integer and bool tensors) are always finite.  A float8 e4m3fn output has no
    infinity (conversion saturates), so for float8 outputs the accumulator is checked too.
    """
    if not isinstance(kernel, WeightedSum):
        return True
    if not all_finite(out, scratch):
        return False
    if str(out.dtype) in _REDUCIBLE:
        return True
    return all_finite(accumulator(kernel, scratch, out.numel()), scratch)


@dataclass
class Census:
    """Why a chunk's output is not finite (the slow path; allocates freely)."""

    inputs: dict[int, tuple[int, int]] = field(default_factory=dict)  # input index → (NaN, ±inf) counts
    rounding: int = 0  # finite accumulator, non-finite output: overflow when rounding to the output dtype
    accumulation: int = 0  # finite inputs, non-finite accumulator: overflow while summing

    def __bool__(self) -> bool:
        return bool(self.rounding or self.accumulation or any(a or b for a, b in self.inputs.values()))


def _widened(x: torch.Tensor) -> torch.Tensor:
    return x if str(x.dtype) in _REDUCIBLE else x.float()


def census(
    kernel: WeightedSum, views: Mapping[int, torch.Tensor], out: torch.Tensor, scratch: Scratch
) -> Census:
    """Attribute the non-finite elements of ``out``, just computed by :func:`run_kernel` from
    ``views``: NaN and ±inf counts per input, and overflow in accumulating or in rounding."""
    import torch

    result = Census()
    acc = accumulator(kernel, scratch, out.numel())
    inputs_bad = torch.zeros(out.numel(), dtype=torch.bool)
    for slot in kernel.inputs:
        v = _widened(views[slot])
        nan, inf = torch.isnan(v), torch.isinf(v)
        result.inputs[slot] = (int(nan.sum()), int(inf.sum()))
        inputs_bad |= nan | inf
    out_bad = ~torch.isfinite(_widened(out))
    acc_finite = torch.isfinite(acc)
    result.rounding = int((out_bad & acc_finite).sum())
    result.accumulation = int((~acc_finite & ~inputs_bad).sum())
    return result
