"""Per-tensor reductions over chunks, with results that do not depend on chunking.

Sums are taken over fixed blocks of ``BLOCK`` elements in float64, each block
in element order (the compiled kernels add the same way), and the block sums are
added in block order at the end, exactly (``math.fsum``: the correctly rounded sum of the block
sums), so chunk size, thread count, kernel mode and device never change the bits.  Block sums and
histograms live in numpy arrays: the compiled path fills them without torch; the eager path's
torch operands are converted where they meet them.  The k-th largest value is an exact radix selection: each
round histograms the next 16 bits of an order-preserving integer key, among
the elements whose higher bits matched the rounds before.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tvlang.chunks import Chunk, is_torch, storage, to_torch
from tvlang.ops import work_buffer
from tvlang.plan.plan import BLOCK

if TYPE_CHECKING:
    import torch

DIGIT = 1 << 16


def block_sums(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 sum of each ``BLOCK``-element block of ``values`` (the last may be shorter), each
    added in element order, as the compiled kernels do: a cumulative sum is sequential, and its last
    column is the sum (measured: identical bits to a plain loop; ``Tensor.sum`` reassociates)."""
    import torch

    v = values if values.dtype == torch.float64 else values.to(torch.float64)
    n = v.numel()
    full = n // BLOCK * BLOCK
    blocks = -(-n // BLOCK)
    result = out if out is not None else torch.empty(blocks, dtype=torch.float64, device=v.device)
    if full:
        on_cpu = v.device.type == "cpu"  # (a reused buffer: no temporaries on the hot path)
        scan_buf = work_buffer("block-scan", torch.float64, full).view(-1, BLOCK) if on_cpu else None
        scan = torch.cumsum(v[:full].view(-1, BLOCK), dim=1, out=scan_buf)
        result[: full // BLOCK].copy_(scan[:, -1])
    if full < n:
        result[blocks - 1] = torch.cumsum(v[full:], dim=0)[-1]
    return result


class BlockSum:
    """Σ of values (or of products of two operands) in float64, chunk-order independent: the
    block sums (in element order within each block), then their exact sum, rounded once
    (:func:`math.fsum` over the blocks in block order, on every path)."""

    def __init__(self) -> None:
        self._blocks: dict[int, Any] = {}  # chunk start → its block sums (numpy, or a device tensor)

    def add(self, values: torch.Tensor, start: int) -> None:
        self._blocks[start] = storage(block_sums(values))

    def add_sums(self, sums: Chunk, start: int) -> None:
        """The :func:`block_sums` of the chunk at ``start`` (a compiled kernel computed them)."""
        self._blocks[start] = storage(sums).copy()

    def result(self) -> float:
        blocks = (self._blocks[s].tolist() for s in sorted(self._blocks))
        return math.fsum(itertools.chain.from_iterable(blocks))


class ColumnSum:
    """Σ of each column of the tensor seen as ``(rows, columns)``, in float64, each column's values
    added in row order: the chunks come in order and hold whole rows, so any chunking gives the same
    bits.  Memory: one row of float64 sums, and a chunk-sized scan buffer."""

    def __init__(self, columns: int) -> None:
        import torch

        self.columns = columns
        self.total = torch.zeros(columns, dtype=torch.float64)
        self.next = 0

    def add(self, values: torch.Tensor, start: int) -> None:
        import torch

        values = to_torch(values)
        assert start == self.next, "column sums take the chunks in order"
        self.next = start + values.numel()
        rows = values.numel() // self.columns
        wide = work_buffer("col-sum", torch.float64, (rows + 1) * self.columns).view(rows + 1, self.columns)
        wide[0].copy_(self.total)
        wide[1:].copy_(values.reshape(rows, self.columns))
        scan = work_buffer("col-scan", torch.float64, (rows + 1) * self.columns).view(rows + 1, self.columns)
        torch.cumsum(wide, dim=0, out=scan)  # sequential down each column, from the running sums
        self.total.copy_(scan[rows])

    def result(self) -> torch.Tensor:
        return self.total


class Count:
    """The number of non-zero values."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, values: Chunk, start: int) -> None:
        if is_torch(values):
            self.total += int(values.count_nonzero())
        else:
            self.total += int(np.count_nonzero(values))

    def result(self) -> float:
        return float(self.total)


def order_keys(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer keys (int64 holding the unsigned bit pattern) that sort like the floats, computed in
    place in ``out``: negative floats get every bit flipped, the others just the sign bit."""
    import torch

    n = values.numel()
    keys = work_buffer("keys", torch.int64, n) if out is None else out
    flip = work_buffer("keys-flip", torch.int64, n)
    negative = work_buffer("keys-neg", torch.bool, n)
    if values.dtype == torch.float64:
        keys.copy_(values.view(torch.int64))
        torch.lt(keys, 0, out=negative)
        sign, rest = -(1 << 63), (1 << 63) - 1
    else:
        keys.copy_(values.to(torch.float32).view(torch.int32)).bitwise_and_(0xFFFFFFFF)
        torch.ge(keys, 0x80000000, out=negative)
        sign, rest = 0x80000000, 0x7FFFFFFF
    keys.bitwise_xor_(sign)
    return keys.bitwise_xor_(flip.copy_(negative).mul_(rest))


def key_to_float(key: int, bits: int) -> float:
    """The float (``bits`` wide: 32 or 64) whose order key is ``key``."""
    sign = 1 << (bits - 1)
    pattern = key ^ sign if key >= sign else key ^ ((1 << bits) - 1)
    if bits == 64:
        return float(struct.unpack("<d", pattern.to_bytes(8, "little"))[0])
    return float(struct.unpack("<f", pattern.to_bytes(4, "little"))[0])


def _is_f64(dtype: object) -> bool:
    """A float64 accumulation: the code ``F64`` or ``torch.float64``."""
    return str(dtype).removeprefix("torch.") in ("F64", "float64")


class KthLargest:
    """The k-th largest value, selected exactly over ``rounds`` passes of 16 bits each."""

    def __init__(
        self,
        k: float,
        numel: int,
        dtype: object,
        histogram: Callable[[Chunk, int, int, np.ndarray[Any, Any]], None] | None = None,
    ) -> None:
        """``dtype``: the values' (``F64``/``F32``, or the torch dtype); ``histogram(values, round,
        prefix, hist)``: a compiled :meth:`add` (same counts)."""
        self.histogram = histogram
        self.bits = 64 if _is_f64(dtype) else 32
        self.rounds = self.bits // 16
        k_int = math.floor(k) if math.isfinite(k) else (0 if k < 0 else numel + 1)
        self.fixed: float | None = None
        if k_int < 1:
            self.fixed = math.inf
        elif k_int > numel:
            self.fixed = -math.inf
        self.remaining = k_int
        self.prefix = 0  # the digits found so far
        self.round = 0
        self.hist = np.zeros(DIGIT + 1, dtype=np.int64)  # the last bin: not under the prefix

    def add(self, values: Chunk, start: int, round_: int) -> None:
        if self.fixed is not None:
            return
        assert round_ == self.round, "rounds run in order"
        wide = "float64" if self.bits == 64 else "float32"
        if self.histogram is not None:
            if not is_torch(values) and values.dtype == wide and values.flags.c_contiguous:
                self.histogram(values, round_, self.prefix, self.hist)
                return
            if (
                is_torch(values)
                and str(values.dtype) == "torch." + wide
                and values.is_contiguous()
                and values.device.type == "cpu"
            ):
                self.histogram(values, round_, self.prefix, self.hist)
                return
        import torch

        values = to_torch(values)
        n = values.numel()
        keys = order_keys(values)
        shift = self.bits - 16 * (round_ + 1)
        digits = work_buffer("digits", torch.int64, n)
        torch.bitwise_right_shift(keys, shift, out=digits).bitwise_and_(0xFFFF)
        if round_:  # elements whose higher digits differ from the prefix found so far count nowhere
            higher = torch.bitwise_right_shift(keys, shift + 16, out=keys).bitwise_and_(
                (1 << (16 * round_)) - 1
            )
            other = torch.ne(higher, self.prefix, out=work_buffer("digits-other", torch.bool, n))
            digits.masked_fill_(other, DIGIT)
        torch.from_numpy(self.hist).index_add_(0, digits, work_buffer("ones", torch.int64, n).fill_(1))

    def end_round(self) -> None:
        if self.fixed is not None:
            return
        above = np.cumsum(self.hist[:DIGIT][::-1])[::-1]  # count with digit >= d
        # the largest digit d whose count of elements with digit >= d reaches the remaining k
        d = int(np.nonzero(above >= self.remaining)[0].max())
        greater = int(above[d + 1]) if d + 1 < DIGIT else 0
        self.remaining -= greater
        self.prefix = (self.prefix << 16) | d
        self.round += 1
        self.hist[:] = 0

    def result(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return key_to_float(self.prefix, self.bits)
