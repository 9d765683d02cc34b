"""CPU kernels: chunked, in place on reused buffers, through torch.

Each worker thread owns a :class:`Scratch`; a kernel writes into it and into
the output chunk and never allocates on the per-chunk path.

The weighted sum's reference semantics (which a GPU backend must match):
``acc = 0; for (w, x) in terms: acc = fma(w, x, acc)`` in the accumulation
dtype (float32 for 16-bit inputs, float64 when any input or the output is
32-bit or wider), then one round-to-nearest-even conversion to the output
dtype.  Element-wise, so the bits do not depend on chunking or threads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvlang.plan.plan import Copy, Kernel, WeightedSum

ACC_DTYPES = {"F32": torch.float32, "F64": torch.float64}


class Scratch:
    """Per-thread reusable buffers, one per (role, dtype), grown to the largest chunk seen."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._buffers.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._buffers[(role, dtype)] = buf
        return buf[:n]


def run_kernel(
    kernel: Kernel, views: Mapping[int, torch.Tensor], out: torch.Tensor, scratch: Scratch
) -> None:
    """Compute one output chunk into ``out`` from the input chunks ``views`` (by input index)."""
    if isinstance(kernel, Copy):
        out.copy_(views[kernel.source])
        return
    assert isinstance(kernel, WeightedSum)
    acc = scratch.get("acc", ACC_DTYPES[kernel.acc], out.numel())
    acc.zero_()
    for weight, slot in kernel.terms:
        # Mixed-dtype add_ upcasts the input element by element inside the loop
        # (exact), so no converted copy of the input chunk is made.
        acc.add_(views[slot], alpha=weight)
    out.copy_(acc)  # the one rounding
