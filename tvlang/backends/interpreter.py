"""General tensor programs on the CPU: element-wise functions, reductions, random masks.

A :class:`ProgramState` runs one tensor's :class:`~tvlang.plan.tensor_program.TensorProgram`:
the runtime feeds it each chunk once per data pass; after the reduction passes
its per-tensor scalars are known and it computes the outputs chunk by chunk.
Every instruction writes into a per-thread scratch buffer, evaluated in the
accumulation dtype; per-tensor scalars are float64 numbers.

The random generator is counter based, so masks do not depend on chunking,
threads or device: ``u[i] = top bits of fmix64(key ^ (i · 0x9E3779B97F4A7C15))``
with ``key = fmix64(fmix64(seed ^ fnv1a(stream)) ^ fnv1a(tensor name))``, where
``stream`` names the checkpoints the operand reads and fmix64 is MurmurHash3's
64-bit finaliser.

Chunks are numpy arrays (files) or torch tensors (memory, GPU): the compiled kernels take both
and write numpy buffers; only the eager instructions import torch, and they see every chunk as a
tensor (:func:`tvlang.chunks.to_torch`, no copy).  Per-tensor numbers are Python floats, their
functions numpy's float64 ones (IEEE, NaN where the domain ends; ``sqrt`` correctly rounded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tvlang.backends.cpu import Scratch, acc_dtype
from tvlang.backends.reductions import BlockSum, ColumnSum, Count, KthLargest, SampledKth, sample_positions
from tvlang.chunks import Chunk, is_torch, to_torch
from tvlang.ops import ELEMENTWISE, work_buffer
from tvlang.plan.plan import Plan, TensorTask, row_length
from tvlang.plan.tensor_program import Instr, TensorProgram

if TYPE_CHECKING:
    import torch

    from tvlang.codegen.c import BracketCount, RadixHistogram


class Kernels(Protocol):
    """What a program's run asks of the compiled kernels (:class:`tvlang.backends.compiled.Kernels`,
    which builds on this module): each call returns None/False when no kernel does the work, and
    the program then runs it eagerly."""

    histogram: RadixHistogram | None  # for k-th largest values: the radix selection's rounds
    bracket: BracketCount | None  # and the sampled selection's pass

    def run_program(
        self,
        program: TensorProgram,
        targets: tuple[int, ...],
        views: Mapping[int, Chunk],
        outputs: Sequence[Chunk],
        scalars: Mapping[int, float],
        tensor: str,
        start: int,
        row: int = 1,
        codes: Mapping[int, str] | None = None,
    ) -> bool: ...

    def run_bracketed(
        self,
        program: TensorProgram,
        work: Sequence[int],
        views: Mapping[int, Chunk],
        scalars: Mapping[int, float],
        tensor: str,
        start: int,
        stop: int,
        selections: list[tuple[int, int, np.ndarray[Any, Any], np.ndarray[Any, Any]]],
        codes: Mapping[int, str] | None = None,
    ) -> bool: ...

    def run_reductions(
        self,
        program: TensorProgram,
        work: Sequence[int],
        views: Mapping[int, Chunk],
        scratch: Scratch,
        scalars: Mapping[int, float],
        tensor: str,
        start: int,
        stop: int,
        row: int = 1,
        codes: Mapping[int, str] | None = None,
    ) -> list[Chunk] | None: ...


_FMIX1 = 0xFF51AFD7ED558CCD - (1 << 64)  # the constants of MurmurHash3's 64-bit finaliser, as int64
_FMIX2 = 0xC4CEB9FE1A85EC53 - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MASK = (1 << 64) - 1


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def fmix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 33)
    x = x * _FMIX1
    x = x ^ _shr(x, 33)
    x = x * _FMIX2
    return x ^ _shr(x, 33)


def _hash_text(text: str) -> int:
    """FNV-1a, 64 bits, as int64."""
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h - (1 << 64) if h >= 1 << 63 else h


def _fmix64_int(x: int) -> int:
    """:func:`fmix64` on one unsigned 64-bit Python int."""
    x ^= x >> 33
    x = (x * _FMIX1) & _MASK
    x ^= x >> 33
    x = (x * _FMIX2) & _MASK
    return x ^ (x >> 33)


def random_key(seed: int, stream: str, tensor: str) -> int:
    """The per-(seed, operand, tensor) key of the counter-based generator (an int64), in Python
    integers: the same bits as :func:`fmix64` on int64 tensors."""
    k = _fmix64_int((seed & _MASK) ^ (_hash_text(stream) & _MASK))
    k = _fmix64_int(k ^ (_hash_text(tensor) & _MASK))
    return k - (1 << 64) if k >= 1 << 63 else k


def uniform(key: int, start: int, stop: int, out: torch.Tensor) -> None:
    """u[i] = top bits of fmix64(key ^ (i · golden)) for element indices i in [start, stop):
    24 bits in float32, 53 in float64, so u < 1 exactly and every chunking gives the same bits.
    Computed in place in two reused int64 buffers."""
    import torch

    n = stop - start
    x = torch.arange(start, stop, dtype=torch.int64, out=work_buffer("rng-x", torch.int64, n))
    t = work_buffer("rng-t", torch.int64, n)
    x.mul_(_GOLDEN).bitwise_xor_(key)
    for multiplier in (_FMIX1, _FMIX2, None):  # fmix64, in place
        torch.bitwise_right_shift(x, 33, out=t).bitwise_and_((1 << 31) - 1)
        x.bitwise_xor_(t)
        if multiplier is not None:
            x.mul_(multiplier)
    bits = 53 if out.dtype == torch.float64 else 24
    torch.bitwise_right_shift(x, 64 - bits, out=t).bitwise_and_((1 << bits) - 1)
    out.copy_(t).mul_(2.0**-bits)  # exact: integers below 2^bits, then a power of two


def _binary(op: str, a: Any, b: Any, out: torch.Tensor) -> torch.Tensor:
    import torch

    if isinstance(a, torch.Tensor):
        fn: Any = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow}[
            op
        ]
        result: torch.Tensor = fn(a, b, out=out)
        return result
    # a number on the left
    if op == "add":
        return torch.add(b, a, out=out)
    if op == "mul":
        return torch.mul(b, a, out=out)
    if op == "sub":
        return torch.sub(b, a, out=out).neg_()
    if op == "div":  # correctly rounded (reciprocal-then-multiply would round twice)
        return out.fill_(a).div_(b)
    return torch.pow(a, b, out=out)


def _scalar_binary(op: str, a: float, b: float) -> float:
    """IEEE float64 arithmetic on per-tensor numbers (±inf and NaN where it gives them, no exceptions):
    Python's floats for the common cases (the same bits, a tenth of numpy's cost), numpy's otherwise."""
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div" and b != 0.0:
        return a / b
    with np.errstate(all="ignore"):
        x, y = np.float64(a), np.float64(b)
        return float(x / y if op == "div" else x**y)


def _product64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` in float64 (on the CPU in reused buffers: no temporaries on the hot path)."""
    import torch

    if a.device.type != "cpu":
        return a.to(torch.float64) * b.to(torch.float64)
    n = a.numel()
    a64 = work_buffer("red-a", torch.float64, n).copy_(a)
    return a64.mul_(work_buffer("red-b", torch.float64, n).copy_(b))


def row_rank(x: torch.Tensor, row: int, out: torch.Tensor) -> None:
    """Each element's rank within its row, scaled to [0, 1] (ties broken by position; 0.5 for
    one-element rows).  The chunk holds whole rows (the planner aligns it)."""
    import torch

    if row <= 1:
        out.fill_(0.5)
        return
    rows = x.reshape(-1, row)
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(row, dtype=order.dtype).expand_as(order))
    out.view(-1, row).copy_(ranks).div_(row - 1)


def row_sum(x: torch.Tensor, row: int, out: torch.Tensor) -> None:
    """The float64 sum of each element's row, added in element order (a cumulative sum is
    sequential, as in :func:`tvlang.backends.reductions.block_sums`), rounded once to ``out``'s dtype
    and written at every element of the row.  The chunk holds whole rows."""
    import torch

    rows = x.reshape(-1, row)
    wide = work_buffer("row-sum", torch.float64, x.numel()).view(-1, row).copy_(rows)
    scan = torch.cumsum(wide, dim=1, out=work_buffer("row-scan", torch.float64, x.numel()).view(-1, row))
    out.view(-1, row).copy_(scan[:, -1:].expand(-1, row))


def row_max(x: torch.Tensor, row: int, out: torch.Tensor) -> None:
    """The largest element of each element's row (NaN when the row holds one), at every element."""
    import torch

    rows = x.reshape(-1, row)
    out.view(-1, row).copy_(torch.amax(rows, dim=1, keepdim=True).expand(-1, row))


ROW_KERNELS = {"rowrank": row_rank, "rowsum": row_sum, "rowmax": row_max}

# Per-tensor numbers' functions: numpy's float64 ufuncs (IEEE: NaN or ±inf where the domain ends,
# as the chunk functions give, never an exception); the others by the table's scalar function.
_SCALAR_UFUNCS: dict[str, Any] = {
    "abs": np.abs,
    "sign": np.sign,
    "sqrt": np.sqrt,
    "floor": np.floor,
    "ceil": np.ceil,
    "sin": np.sin,
    "acos": np.arccos,
    "cos": np.cos,
    "exp": np.exp,
    "log": np.log,
    "min": np.minimum,
    "max": np.maximum,
    "clamp": lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi),
}


def scalar_call(name: str, args: Sequence[float]) -> float:
    """Function ``name`` of per-tensor numbers, in float64."""
    fn = _SCALAR_UFUNCS.get(name)
    with np.errstate(all="ignore"):
        if fn is not None:
            return float(fn(*(np.float64(a) for a in args)))
        if name == "where":
            return args[1] if args[0] != 0 else args[2]
        return float(ELEMENTWISE[name].scalar(*args))


class ProgramState:
    """One tensor's run of a program: its per-tensor scalars and reduction accumulators."""

    def __init__(
        self,
        program: TensorProgram,
        tensor: str,
        numel: int,
        row: int = 1,
        model_values: Mapping[int, float] | None = None,
        kernels: Kernels | None = None,
        codes: Mapping[int, str] | None = None,
    ) -> None:
        """``codes``: the dtype code of each input's chunks (numpy chunks of float8 need it)."""
        self.program = program
        self.codes = codes or {}
        self.kernels = kernels  # compiled kernels for the reduction passes and other chunk work (else eager)
        self.tensor = tensor
        self.numel = numel
        self.model_values = model_values or {}  # model-wide scalars, computed before the per-tensor work
        self.row = row  # elements per row, for row-wise operations (chunks then hold whole rows)
        self.scalars: dict[int, float] = {}
        self.columns: dict[int, torch.Tensor] = {}  # column functions' results, one number per column
        self.reducers: dict[int, Any] = {}
        self.finished: set[int] = set()  # reductions whose passes are over
        self._settle(0)

    @property
    def acc_dtype(self) -> torch.dtype:
        """The accumulation dtype, as torch's (the eager instructions')."""
        return acc_dtype(self.program.acc)

    @classmethod
    def of_task(
        cls,
        plan: Plan,
        task: TensorTask,
        model_values: Mapping[int, float] | None = None,
        kernels: Kernels | None = None,
    ) -> ProgramState:
        """A fresh run of ``task``'s program in ``plan`` (its per-tensor numbers, its reductions'
        accumulators), with the row length and input dtypes the plan gives it."""
        assert task.program is not None
        return cls(
            task.program,
            task.name,
            task.numel,
            row_length(task.shape),
            model_values,
            kernels,
            plan.input_dtypes(task),
        )

    def _settle(self, done: int) -> None:
        """Compute every scalar known once ``done`` data passes have finished."""
        for i, ins in enumerate(self.program.instrs):
            if ins.tensor and ins.op == "reduce" and i not in self.columns and ins.need <= done:
                self.columns[i] = self.reducers.pop(i).result()
            if ins.tensor or i in self.scalars or ins.need > done:
                continue
            if ins.op == "reduce":
                self.scalars[i] = self.reducers.pop(i).result()
            elif ins.op == "global":
                if ins.attr in self.model_values:  # (absent while the model-wide pass itself runs)
                    self.scalars[i] = self.model_values[ins.attr]
            else:
                self.scalars[i] = self._scalar(ins)
        for i, ins in enumerate(self.program.instrs):  # reductions starting in the next pass
            if (
                ins.op == "reduce"
                and i not in self.reducers
                and i not in self.scalars
                and ins.need == done + 1
            ):
                if ins.attr == "kth":
                    self.reducers[i] = SampledKth(
                        self.scalars[ins.args[1]],
                        self.numel,
                        self.program.acc,
                        self.kernels.bracket if self.kernels is not None else None,
                        self.kernels.histogram if self.kernels is not None else None,
                    )
                elif ins.attr == "count":
                    self.reducers[i] = Count()
                elif ins.attr == "colsum":  # a tensor that is one row (a vector) is one column
                    self.reducers[i] = ColumnSum(1 if self.row == self.numel else self.row)
                else:
                    self.reducers[i] = BlockSum()

    def _scalar(self, ins: Instr) -> float:
        if ins.op == "const":
            return float(ins.attr)
        if ins.op == "numel":
            return float(self.numel)
        vals = [self.scalars[a] for a in ins.args]
        if ins.op == "neg":
            return -vals[0]
        if ins.op == "call":
            return scalar_call(ins.attr, vals)
        return _scalar_binary(ins.op, vals[0], vals[1])

    def running(self, q: int) -> list[int]:
        """The reductions of data pass ``q`` still to be fed: all of them the first time the pass
        runs; when it repeats, the selections that need another round."""
        return [i for i in self.program.reductions_in(q) if i in self.reducers and i not in self.finished]

    def _sampling(self, q: int) -> list[int]:
        """The selections of pass ``q`` that want a sample and can take one from scattered elements
        (an operand of no position: no random mask, no row or column function)."""
        return [
            i
            for i in self.running(q)
            if getattr(self.reducers[i], "wants_sample", False)
            and self.program.position_free(self.program.instrs[i].args[0])
        ]

    def sample_positions(self, q: int, chunk: int) -> np.ndarray[Any, Any] | None:
        """The elements to gather for the selections of pass ``q`` before it starts
        (:func:`tvlang.backends.reductions.sample_positions`), or None: nothing to sample, or a
        tensor of one chunk (that chunk is the sample)."""
        if self.numel <= chunk or not self._sampling(q):
            return None
        positions = sample_positions(self.numel)
        return None if 2 * positions.size > self.numel else positions

    def feed_sample(self, q: int, views: Mapping[int, Chunk], scratch: Scratch) -> None:
        """The gathered elements (``views``: each input's, at :meth:`sample_positions`) for the
        selections of pass ``q`` that sample."""
        work = self._sampling(q)
        n = next(iter(views.values())).shape[0] if views else 0
        if self.kernels is not None:
            outs = self.kernels.run_reductions(
                self.program, work, views, scratch, self.scalars, self.tensor, 0, n, self.row, self.codes
            )
            if outs is not None:
                for i, out in zip(work, outs, strict=True):
                    self.reducers[i].sample(out)
                return
        targets = tuple(self.program.instrs[i].args[0] for i in work)
        for i, value in zip(work, self._run(targets, views, 0, n, scratch), strict=True):
            self.reducers[i].sample(value)

    def feed(self, q: int, views: Mapping[int, Chunk], start: int, stop: int, scratch: Scratch) -> None:
        """Data pass ``q`` over one chunk: advance the reductions that run in it."""
        work = self.running(q)
        if self.kernels is not None:
            if self._counted_in_kernel(work, views, start, stop):
                return
            outs = self.kernels.run_reductions(
                self.program,
                work,
                views,
                scratch,
                self.scalars,
                self.tensor,
                start,
                stop,
                self.row,
                self.codes,
            )
            if outs is not None:
                for i, out in zip(work, outs, strict=True):
                    red = self.reducers[i]
                    if isinstance(red, SampledKth | KthLargest):
                        red.add(out, start, red.round)
                    elif isinstance(red, BlockSum):
                        red.add_sums(out, start)
                    else:
                        red.add(out, start)
                return
        targets = tuple(
            a for i in work for a in self.program.instrs[i].args[:2] if self.program.instrs[a].tensor
        )
        values = dict(zip(targets, self._run(targets, views, start, stop, scratch), strict=True))
        self.reduce(work, values, start)

    def _counted_in_kernel(self, work: list[int], views: Mapping[int, Chunk], start: int, stop: int) -> bool:
        """Whether the pass's compiled kernel counted this chunk against every selection's bracket
        as it computed the operands (the usual TIES pass: every reduction a sampled selection)."""
        assert self.kernels is not None
        selections = []
        for i in work:
            red = self.reducers[i]
            selection = red.bracketing() if isinstance(red, SampledKth) else None
            if selection is None:
                return False
            selections.append(selection)
        return bool(work) and self.kernels.run_bracketed(
            self.program, work, views, self.scalars, self.tensor, start, stop, selections, self.codes
        )

    def reduce(self, work: list[int], values: Mapping[int, torch.Tensor], start: int) -> None:
        """Advance the reductions ``work`` by one chunk of their operands ``values`` (by
        instruction), on whatever device the operands are."""
        for i in work:
            ins = self.program.instrs[i]
            operand = values[ins.args[0]]
            red = self.reducers[i]
            if ins.attr == "kth":
                red.add(operand, start, red.round)
            elif ins.attr == "colsum":
                red.add(operand, start)
            elif ins.attr in ("dot", "sumsq"):  # products in float64: exact for float32 operands
                other = operand if ins.attr == "sumsq" else values[ins.args[1]]
                red.add(_product64(operand, other), start)
            else:
                red.add(operand, start)

    def value(self, i: int, views: Mapping[int, Chunk], start: int, stop: int, scratch: Scratch) -> Any:
        """Instruction ``i`` on one chunk (for the model-wide passes)."""
        return self._run((i,), views, start, stop, scratch)[0]

    def end_pass(self, q: int) -> bool:
        """The end of one run of data pass ``q``: True when its reductions are all done (their
        results are then known), False when a selection needs the pass again."""
        for i in self.running(q):
            red = self.reducers[i]
            if isinstance(red, SampledKth | KthLargest):
                red.end_round()
                if not red.done:
                    continue
            self.finished.add(i)
        if self.running(q):
            return False
        self._settle(q)
        return True

    def outputs(self, views: Mapping[int, Chunk], start: int, stop: int, scratch: Scratch) -> list[Chunk]:
        """The program's outputs on one chunk, in the accumulation dtype (numpy when a kernel
        computed them)."""
        values = self._run(self.program.outputs, views, start, stop, scratch)
        return [self._as_chunk(v, stop - start, scratch) for v in values]

    def _as_chunk(self, value: Any, n: int, scratch: Scratch) -> Chunk:
        if is_torch(value) or isinstance(value, np.ndarray):
            return value
        out = scratch.array("const", self.program.acc, n)
        out.fill(value)
        return out

    def torch_views(self, views: Mapping[int, Chunk]) -> dict[int, torch.Tensor]:
        """The chunks as torch tensors (no copies), for the eager instructions."""
        return {i: to_torch(x, self.codes.get(i)) for i, x in views.items()}

    def _run(
        self,
        targets: tuple[int, ...],
        views: Mapping[int, Chunk],
        start: int,
        stop: int,
        scratch: Scratch,
    ) -> list[Any]:
        """Evaluate ``targets`` on one chunk, in instruction order, in reused slot buffers."""
        values: dict[int, Any] = self.scalars
        if self.kernels is not None and all(self.program.instrs[t].tensor for t in targets):
            n = stop - start
            outs = [scratch.array(("slot", k), self.program.acc, n) for k in range(len(targets))]
            if self.kernels.run_program(
                self.program, targets, views, outs, self.scalars, self.tensor, start, self.row, self.codes
            ):
                return list(outs)
        views = self.torch_views(views)
        chunk: dict[int, torch.Tensor] = {}
        for i, slot in self.program.schedule(targets, frozenset(self.scalars)):
            ins = self.program.instrs[i]
            out = scratch.get(("slot", slot), self.acc_dtype, stop - start)
            if ins.op == "reduce":  # a column function: each element's column, from its pass
                columns = self.columns[i]
                out.view(-1, columns.numel()).copy_(columns.expand(out.numel() // columns.numel(), -1))
            else:
                args = [chunk[a] if a in chunk else values[a] for a in ins.args]
                self._compute(ins, args, views, start, stop, out)
            chunk[i] = out
        return [chunk[t] if t in chunk else values[t] for t in targets]

    def _compute(
        self,
        ins: Instr,
        args: list[Any],
        views: Mapping[int, torch.Tensor],
        start: int,
        stop: int,
        out: torch.Tensor,
    ) -> None:
        import torch

        if ins.op == "input":
            out.copy_(views[ins.attr])  # exact widening
        elif ins.op == "wsum":
            out.zero_()
            for w, x in zip(ins.attr, args, strict=True):
                if isinstance(x, torch.Tensor):
                    out.add_(x, alpha=w)
                else:
                    out.add_(w * x)
        elif ins.op == "neg":
            torch.neg(args[0], out=out)
        elif ins.op == "call" and ins.attr in ROW_KERNELS:
            ROW_KERNELS[ins.attr](args[0], self.row, out)
        elif ins.op == "call":
            ELEMENTWISE[ins.attr].chunk(out, *args)
        elif ins.op == "rand":
            uniform(random_key(ins.attr[0], ins.attr[1], self.tensor), start, stop, out)
        else:
            _binary(ins.op, args[0], args[1], out)
