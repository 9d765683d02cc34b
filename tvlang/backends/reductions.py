"""Per-tensor reductions over chunks, with results that do not depend on chunking.

Sums are taken over fixed blocks of ``BLOCK`` elements in float64, each block in ``LANES``
interleaved lanes added in one fixed order (the compiled kernels add the same way), and the block
sums are added in block order at the end, exactly (``math.fsum``: the correctly rounded sum of the
block sums), so chunk size, thread count and kernel mode never change the bits.  Block sums and
histograms live in numpy arrays: the compiled path fills them without torch; the eager path's
torch operands are converted where they meet them.

The k-th largest value is selected exactly, on order-preserving integer keys of the floats
(so NaN, ±inf and ±0 sort as everywhere else).  :class:`KthLargest` is the radix selection: each
round histograms the next 16 bits of the key among the elements whose higher bits matched the
rounds before (2 passes for float32, 4 for float64); the model-wide selections and the GPU use it.
A tensor's selection on the CPU is :class:`SampledKth`: a sample of the keys brackets the answer,
one pass counts the keys above the bracket and keeps the few inside it, and the answer is selected
among those kept; where the bracket misses (the sample misled) the radix passes follow.  Either way
the answer is the same key.
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tvlang.chunks import Chunk, is_torch, storage, to_torch
from tvlang.chunks import numel as chunk_numel
from tvlang.codegen.c import STASH_SLACK
from tvlang.ops import work_buffer
from tvlang.plan.plan import BLOCK, LANES

if TYPE_CHECKING:
    import torch

DIGIT = 1 << 16


def block_sums(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 sum of each ``BLOCK``-element block of ``values`` (the last may be shorter), in
    the order the compiled kernels add: element j of a block in lane ``j % LANES``, each lane in
    element order, the lanes then pairwise (:data:`tvlang.plan.plan.LANES`).  A cumulative sum is
    sequential, so its last row holds the lanes (measured: identical bits to a plain loop;
    ``Tensor.sum`` reassociates)."""
    import torch

    v = values if values.dtype == torch.float64 else values.to(torch.float64)
    n = v.numel()
    full = n // BLOCK * BLOCK
    blocks = -(-n // BLOCK)
    result = out if out is not None else torch.empty(blocks, dtype=torch.float64, device=v.device)
    if full:
        on_cpu = v.device.type == "cpu"  # (a reused buffer: no temporaries on the hot path)
        shape = (-1, BLOCK // LANES, LANES)
        scan_buf = work_buffer("block-scan", torch.float64, full).view(shape) if on_cpu else None
        scan = torch.cumsum(v[:full].view(shape), dim=1, out=scan_buf)
        result[: full // BLOCK].copy_(pairwise_lanes(scan[:, -1, :]))
    if full < n:
        tail = v[full:]
        if tail.numel() % LANES:  # (+0.0 changes no lane: a lane's sum, begun at +0.0, is never -0.0)
            tail = torch.cat([tail, tail.new_zeros(LANES - tail.numel() % LANES)])
        result[blocks - 1] = pairwise_lanes(torch.cumsum(tail.view(-1, LANES), dim=0)[-1:, :])[0]
    return result


def pairwise_lanes(lanes: torch.Tensor) -> torch.Tensor:
    """Each row of ``lanes`` (``(rows, LANES)``) summed pairwise: ((l0 + l1) + (l2 + l3)) + …"""
    while lanes.shape[1] > 1:
        lanes = lanes[:, 0::2] + lanes[:, 1::2]
    return lanes[:, 0]


class BlockSum:
    """Σ of values (or of products of two operands) in float64, chunk-order independent: the
    block sums (:func:`block_sums`' order within each block), then their exact sum, rounded once
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


def _target(k: float, numel: int) -> tuple[int, float | None]:
    """The rank asked for as an integer, and the answer when no selection is needed (+inf for
    k < 1, -inf past the last element)."""
    k_int = math.floor(k) if math.isfinite(k) else (0 if k < 0 else numel + 1)
    if k_int < 1:
        return k_int, math.inf
    if k_int > numel:
        return k_int, -math.inf
    return k_int, None


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
        k_int, self.fixed = _target(k, numel)
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

    @property
    def done(self) -> bool:
        """Whether the selection is over (every round run, or nothing to select)."""
        return self.fixed is not None or self.round >= self.rounds

    def result(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return key_to_float(self.prefix, self.bits)


# The sampled selection.  A bracket of ±MARGIN standard deviations of the sample's rank around the
# target holds the answer unless the sample misleads; a tensor samples enough keys that the
# bracket is expected to keep about STASH_KEYS keys (the width shrinks as 1/sqrt(sample)), and at
# least SAMPLE_MIN (all of a smaller tensor).
SAMPLE_MIN = 1 << 14
STASH_KEYS = 1 << 20
MARGIN = 6.0


def sample_size(numel: int) -> int:
    """The keys to sample from a tensor of ``numel`` elements: the bracket then holds about
    ``MARGIN · numel / sqrt(sample)`` ≤ :data:`STASH_KEYS` keys."""
    return min(numel, max(SAMPLE_MIN, math.ceil((MARGIN * numel / STASH_KEYS) ** 2)))


SAMPLE_RUN = 4  # sampled elements side by side (a few neighbours cost what one does to read)


@functools.lru_cache(maxsize=256)
def sample_positions(numel: int) -> np.ndarray[Any, Any]:
    """The elements a tensor's selections sample, ascending: runs of :data:`SAMPLE_RUN` elements,
    one at a jittered place in each of ``sample_size / SAMPLE_RUN`` equal strata of the tensor.
    Spread over every row (weights' rows differ in scale, so a few contiguous ranges mislead) and,
    by the jitter (a Weyl sequence: no generator, the same places every run), over the columns.
    Each run starts at a multiple of :data:`SAMPLE_RUN`, so a source can gather a run as one item
    (``Source.gather``'s ``run``); a tensor no larger than its sample is sampled whole."""
    size = sample_size(numel)
    if size >= numel:
        return np.arange(numel, dtype=np.int64)
    runs = max(1, size // SAMPLE_RUN)
    stride = (numel - SAMPLE_RUN) / runs
    jitter = (np.arange(runs, dtype=np.float64) * 0.6180339887498949) % 1.0
    starts = ((np.arange(runs) + jitter) * stride).astype(np.int64)
    starts = np.unique(starts - starts % SAMPLE_RUN)  # (strata narrower than two runs may meet)
    positions = (starts[:, None] + np.arange(SAMPLE_RUN, dtype=np.int64)).ravel()
    positions.flags.writeable = False
    return positions


def key_array(values: Chunk) -> np.ndarray[Any, Any]:
    """The order keys of a float32/float64 chunk as unsigned integers of the same width (numpy)."""
    v = storage(values)
    bits: np.ndarray[Any, Any] = v.view(np.uint64 if v.dtype == np.float64 else np.uint32).ravel()
    sign = bits.dtype.type(1 << (8 * v.itemsize - 1))
    return np.where(bits & sign, ~bits, bits ^ sign)


REPEATS_PROBE = 1024  # keys looked at to tell whether a selection's keys repeat a lot


def order_at(keys: np.ndarray[Any, Any], picks: list[int]) -> None:
    """Reorder ``keys`` in place so that each of the ascending positions ``picks`` holds the key of
    that rank, as a sort would.

    numpy's vectorised selection (``partition``) falls back to a scalar comparison sort when the
    keys repeat a lot, as the magnitudes of bf16 differences do (about 1 % of the keys in a TIES
    bracket are distinct): 3.4 ms for 0.5 M such keys, where sorting them takes 0.6; on keys that
    do not repeat it is ten times faster than the sort.  A stride of the keys decides which runs.
    One position at a time: a selection of two at once takes a general path, 20 times slower."""
    if not picks:
        return
    probe = keys[:: max(1, keys.size // REPEATS_PROBE)]
    if 2 * np.unique(probe).size < probe.size:
        keys.sort()
        return
    placed = keys.size
    for pick in sorted(set(picks), reverse=True):  # each below the one placed before it
        keys[:placed].partition(pick)
        placed = pick


def _take(values: Chunk, positions: np.ndarray[Any, Any]) -> Chunk:
    if is_torch(values):
        import torch

        return values[torch.from_numpy(positions.copy()).to(values.device)]  # (positions: read-only)
    return np.take(values, positions)


class SampledKth:
    """The k-th largest value of one tensor, usually in one pass: :meth:`sample` (or the first
    chunk, when nothing was sampled) brackets it between two sampled keys; each chunk then counts
    its keys above the bracket and keeps those inside; at the end of the pass the answer is the
    right one of the kept keys.  When the bracket missed or kept more than it has room for, the
    radix selection (:class:`KthLargest`) takes over for its rounds: :attr:`done` says whether
    another pass is needed.  ``bracket``: the compiled count (:class:`tvlang.codegen.c.BracketCount`,
    same counts as the numpy one)."""

    def __init__(
        self,
        k: float,
        numel: int,
        dtype: object,
        bracket: Callable[[Chunk, int, int, np.ndarray[Any, Any], np.ndarray[Any, Any]], None] | None = None,
        histogram: Callable[[Chunk, int, int, np.ndarray[Any, Any]], None] | None = None,
    ) -> None:
        self.k, self.numel, self.dtype = k, numel, dtype
        self.bracket, self.histogram = bracket, histogram
        self.bits = 64 if _is_f64(dtype) else 32
        self.target, self.fixed = _target(k, numel)
        self.samples: list[np.ndarray[Any, Any]] = []
        self.lo: int | None = None  # the bracket [lo, hi] of keys, once fixed
        self.hi = 0
        self.stash: np.ndarray[Any, Any] | None = None
        self.counts = np.zeros(4, dtype=np.int64)  # above hi, equal to hi, strictly inside, equal to lo
        self.radix: KthLargest | None = None  # the fallback
        self.round = 0  # passes done

    @property
    def wants_sample(self) -> bool:
        return self.fixed is None and self.lo is None and self.radix is None

    def bracketing(self) -> tuple[int, int, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """``(lo, hi, stash, counts)`` for a compiled count of the next chunk, once a sample has fixed
        the bracket (None: nothing sampled yet, or the selection is not counting a bracket)."""
        if self.fixed is not None or self.radix is not None:
            return None
        if self.lo is None:
            if not self.samples:
                return None
            self._fix_bracket()
        assert self.lo is not None and self.stash is not None
        return self.lo, self.hi, self.stash, self.counts

    def sample(self, values: Chunk) -> None:
        """Keys of a sampled range of the tensor (before the pass)."""
        self.samples.append(key_array(values))

    def _fix_bracket(self) -> None:
        keys = np.concatenate(self.samples) if self.samples else np.zeros(0, np.uint64)
        self.samples = []
        m, n = keys.size, self.numel
        top = (1 << self.bits) - 1
        if m == 0:
            self.lo, self.hi = 0, top
            self.stash = np.empty(STASH_SLACK, dtype=np.uint64 if self.bits == 64 else np.uint32)
            return
        p = self.target / n
        rank = p * m  # the answer's expected rank among the sampled keys, from the top
        spread = MARGIN * math.sqrt(m * p * (1 - p)) + 2
        upper, lower = math.floor(rank - spread), math.ceil(rank + spread)  # ranks from the top (1 = largest)
        picks = sorted(m - r for r in (upper, lower) if 1 <= r <= m)
        ordered = keys  # (concatenated: ours to reorder in place)
        order_at(ordered, picks)
        self.hi = int(ordered[m - upper]) if upper >= 1 else top
        self.lo = int(ordered[m - lower]) if lower <= m else 0
        # Room for the keys strictly inside: the sample's share of them, MARGIN deviations more
        # (the keys equal to lo or hi, often many where values repeat, are only counted).
        share = int(np.count_nonzero((keys > self.lo) & (keys < self.hi))) / m
        cap = min(n, int(n * (share + MARGIN * math.sqrt(share * (1 - share) / m))) + 4096) + STASH_SLACK
        self.stash = np.empty(cap, dtype=np.uint64 if self.bits == 64 else np.uint32)

    def add(self, values: Chunk, start: int, round_: int) -> None:
        assert round_ == self.round, "rounds run in order"
        if self.fixed is not None:
            return
        if self.radix is not None:
            self.radix.add(values, start, self.radix.round)
            return
        if self.lo is None:
            if not self.samples:  # nothing sampled: the tensor is one chunk (else its first chunk)
                self.samples.append(key_array(_take(values, sample_positions(chunk_numel(values)))))
            self._fix_bracket()
        assert self.lo is not None and self.stash is not None
        wide = "float64" if self.bits == 64 else "float32"
        contiguous = (
            values.is_contiguous() and values.device.type == "cpu"
            if is_torch(values)
            else values.flags.c_contiguous
        )
        if self.bracket is not None and str(values.dtype).removeprefix("torch.") == wide and contiguous:
            self.bracket(values, self.lo, self.hi, self.stash, self.counts)
            return
        keys = key_array(values)
        inside = keys[(keys > self.lo) & (keys < self.hi)]
        kept = int(self.counts[2])
        if kept + inside.size <= self.stash.size:
            self.stash[kept : kept + inside.size] = inside
        self.counts += (
            int(np.count_nonzero(keys > self.hi)),
            int(np.count_nonzero(keys == self.hi)),
            inside.size,
            int(np.count_nonzero(keys == self.lo)),
        )

    def end_round(self) -> None:
        self.round += 1
        if self.fixed is not None:
            return
        if self.radix is not None:
            self.radix.end_round()
            return
        assert self.lo is not None and self.stash is not None
        above, at_hi, inside, at_lo = (int(c) for c in self.counts)
        if self.lo == self.hi:
            at_lo = 0  # (the same keys as at_hi)
        k = self.target - above  # the rank still to find, among the keys up to hi
        if 0 < k <= at_hi:
            self.fixed = key_to_float(self.hi, self.bits)
        elif 0 < k - at_hi <= inside <= self.stash.size - STASH_SLACK:  # (else some were not kept)
            nth = inside - (k - at_hi)  # the ascending position of the (k - at_hi)-th largest kept
            kept = self.stash[:inside]
            order_at(kept, [nth])
            self.fixed = key_to_float(int(kept[nth]), self.bits)
        elif 0 < k - at_hi - inside <= at_lo:
            self.fixed = key_to_float(self.lo, self.bits)
        else:  # the sample misled (or the bracket held more than its room): radix rounds follow
            self.radix = KthLargest(self.k, self.numel, self.dtype, self.histogram)
        self.stash = None

    @property
    def done(self) -> bool:
        return self.fixed is not None or (self.radix is not None and self.radix.done)

    def result(self) -> float:
        if self.fixed is not None:
            return self.fixed
        assert self.radix is not None
        return self.radix.result()
