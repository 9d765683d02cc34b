"""A fused element-wise pass as a backend-neutral kernel specification.

A :class:`KernelSpec` is what one generated kernel computes per element: a
straight-line list of statements in the accumulation dtype, from typed input
pointers to typed output pointers.  The C emitter (:mod:`tvlang.codegen.c`) and
the Triton emitter (:mod:`tvlang.codegen.triton`) both start from it, so both
backends compute the same thing as the eager CPU path
(:mod:`tvlang.backends.cpu`, :mod:`tvlang.backends.interpreter`) — operation for
operation, with the same roundings:

- every value is in the accumulation type ``T`` (float32, or float64), and a
  per-tensor number (a reduction result, ``numel``) is a float64 parameter
  rounded to ``T`` where a chunk operation uses it;
- a weighted sum starts from zero and takes ``acc = fma(T(w), x, acc)`` per
  tensor term in term order, and ``acc = acc + T(w·p)`` for a number ``p``; a
  term that is a difference from the anchor (``m - a``) is one subtraction in
  ``T``, formed once per element however many sums use it;
- an output is rounded once to its dtype (16-bit outputs of a float64
  accumulator go through float32, as torch's conversion does), kept in ``T``
  ("ACC") for the operands of k-th largest values and counts, or added up in
  float64 per 4096-element block, in eight interleaved lanes ("SUM",
  :func:`tvlang.backends.reductions.block_sums`), for sums, norms and dot
  products.

Nothing per tensor is in a spec (names, counts, random keys and reduction
results are arguments), so one compiled kernel serves every tensor of the same
dtypes and structure: :attr:`KernelSpec.key` is its cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from tvlang.dtypes import DTYPES
from tvlang.ops import ELEMENTWISE, REDUCTIONS
from tvlang.plan.plan import Plan, ProgramOutput, TensorTask, WeightedSum
from tvlang.plan.tensor_program import TensorProgram

ACC = "ACC"  # an output kept in the accumulation dtype (a reduction's operand)
SUM = "SUM"  # an output of float64 block sums (tvlang.backends.reductions.block_sums), one per block

BINARY = ("add", "sub", "mul", "div")  # (`**` takes numbers only: never a chunk operation)
TARGETS = ("c", "triton")  # the back-ends; each reads its own spelling in tvlang.ops and tvlang.dtypes


def computes(target: str, fn: str) -> bool:
    """Whether ``target``'s kernels compute the function ``fn`` (tvlang.ops): C kernels also compute
    the functions of whole rows (row by row, tvlang.codegen.c)."""
    op = ELEMENTWISE.get(fn)
    if op is None:
        return False
    return (op.c is not None or op.rows) if target == "c" else op.triton is not None


def takes(target: str, dtype: str) -> bool:
    """Whether ``target``'s kernels read inputs of ``dtype`` (tvlang.dtypes: its C or Triton type)."""
    d = DTYPES.get(dtype)
    return d is not None and getattr(d, target) is not None


def rounds_to(target: str, dtype: str) -> bool:
    """Whether ``target``'s kernels round outputs to ``dtype``: floats of 16 bits and more (a float8
    output is rounded by torch's conversion, eagerly)."""
    return takes(target, dtype) and DTYPES[dtype].is_float and DTYPES[dtype].itemsize >= 2


class Unsupported(Exception):
    """The pass holds something the target's kernels do not compute (column sums, float8 outputs; on
    Triton, functions of whole rows): run it eagerly."""


@dataclass(frozen=True)
class Stmt:
    """One statement: ``op`` over earlier statements ``args``.

    ops: ``load`` (attr: input position), ``param`` (attr: parameter position; a float64
    number; constants of the program are folded into weights or are such parameters), ``wsum``
    (attr: weights), ``neg``, the binary
    ``add sub mul div``, ``call`` (attr: function name), ``row`` (attr: the name of a function of
    whole rows; C kernels only, which then take the row length), ``rand`` (attr: key position;
    uniform in [0, 1) from the element's index), ``mul64`` (the product of two values in
    float64, for the dot products of reduction passes).
    """

    op: str
    args: tuple[int, ...] = ()
    attr: object = None


@dataclass(frozen=True)
class KernelSpec:
    """What a generated kernel computes: its pointers' dtypes and its statements."""

    inputs: tuple[str, ...]  # dtype of each input pointer
    outputs: tuple[tuple[int, str], ...]  # (statement, dtype or ACC) per output pointer
    body: tuple[Stmt, ...]
    acc: str  # "F32" or "F64"
    params: int  # float64 per-tensor numbers
    keys: int  # int64 random keys

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:24]

    @property
    def weights(self) -> tuple[float, ...]:
        """The weighted sums' weights in statement order: kernels take them as arguments."""
        return tuple(float(w) for s in self.body if s.op == "wsum" for w in s.attr)  # type: ignore[attr-defined]

    @property
    def structure_key(self) -> str:
        """:attr:`key` without the weights: specs that differ only in their weights share a kernel."""
        body = tuple(Stmt(s.op, s.args, len(s.attr)) if s.op == "wsum" else s for s in self.body)  # type: ignore[arg-type]
        shape = (self.inputs, self.outputs, body, self.acc, self.params, self.keys)
        return hashlib.sha256(repr(shape).encode()).hexdigest()[:24]

    def is_param(self, i: int) -> bool:
        return self.body[i].op == "param"


@dataclass(frozen=True)
class KernelCall:
    """A spec and how to call it for one task: which input index feeds each input pointer, which
    program instruction each parameter is, which rand instruction each key belongs to."""

    spec: KernelSpec
    inputs: tuple[int, ...]  # plan input index per input pointer
    params: tuple[int, ...]  # program instruction per parameter
    keys: tuple[tuple[int, str], ...]  # (seed, stream) per random key


class _Builder:
    def __init__(self, input_dtypes: Mapping[int, str], acc: str, target: str) -> None:
        assert target in TARGETS, target
        self.input_dtypes = input_dtypes
        self.target = target
        self.acc = acc
        self.body: list[Stmt] = []
        self.memo: dict[Stmt, int] = {}
        self.inputs: list[int] = []
        self.params: list[int] = []
        self.keys: list[tuple[int, str]] = []

    def add(self, stmt: Stmt) -> int:
        if stmt in self.memo:
            return self.memo[stmt]
        self.body.append(stmt)
        self.memo[stmt] = len(self.body) - 1
        return self.memo[stmt]

    def load(self, index: int) -> int:
        dtype = self.input_dtypes[index]
        if not takes(self.target, dtype):
            raise Unsupported(f"input dtype {dtype}")
        if index not in self.inputs:
            self.inputs.append(index)
        return self.add(Stmt("load", (), self.inputs.index(index)))

    def param(self, instr: int) -> int:
        if instr not in self.params:
            self.params.append(instr)
        return self.add(Stmt("param", (), self.params.index(instr)))

    def program(self, program: TensorProgram, targets: Sequence[int]) -> dict[int, int]:
        """Statements for the program instructions ``targets`` (and what they need)."""
        done: dict[int, int] = {}

        def visit(i: int) -> int:
            if i in done:
                return done[i]
            ins = program.instrs[i]
            if not ins.tensor:
                done[i] = self.param(i)
                return done[i]
            args = tuple(visit(a) for a in ins.args)
            if ins.op == "input":
                s = self.load(ins.attr)
            elif ins.op == "wsum":
                s = self.add(Stmt("wsum", args, tuple(float(w) for w in ins.attr)))
            elif ins.op in ("neg", *BINARY):
                s = self.add(Stmt(ins.op, args))
            elif ins.op == "call" and computes(self.target, ins.attr):
                s = self.add(Stmt("row" if ELEMENTWISE[ins.attr].rows else "call", args, ins.attr))
            elif ins.op == "rand":
                key = (int(ins.attr[0]), str(ins.attr[1]))
                if key not in self.keys:
                    self.keys.append(key)
                s = self.add(Stmt("rand", (), self.keys.index(key)))
            else:
                raise Unsupported(
                    f"no {'C' if self.target == 'c' else 'Triton'} kernel computes `{ins.attr or ins.op}`"
                )
            done[i] = s
            return s

        return {t: visit(t) for t in targets}

    def spec(self, outputs: Sequence[tuple[int, str]]) -> KernelCall:
        calls = {str(s.attr) for s in self.body if s.op == "call"}
        if any(s.op == "row" for s in self.body) and not all(ELEMENTWISE[fn].exact for fn in calls):
            # (programs of whole rows always ran eagerly: they keep its bits, libm's ulp aside)
            raise Unsupported("a function of whole rows with a function libm rounds differently")
        for _, dtype in outputs:
            if dtype not in (ACC, SUM) and not rounds_to(self.target, dtype):
                raise Unsupported(f"output dtype {dtype}")
        spec = KernelSpec(
            tuple(self.input_dtypes[i] for i in self.inputs),
            tuple(outputs),
            tuple(self.body),
            self.acc,
            len(self.params),
            len(self.keys),
        )
        return KernelCall(spec, tuple(self.inputs), tuple(self.params), tuple(self.keys))


def task_spec(task: TensorTask, input_dtypes: Mapping[int, str], target: str = "triton") -> KernelCall:
    """The fused kernel that writes every float output of ``task`` from one read of its inputs
    (``input_dtypes``: the dtype of this tensor in each input) on ``target``'s kernels (``c`` or
    ``triton``).  Its outputs follow the order of the task's WeightedSum and ProgramOutput writes."""
    writes = [w for w in task.writes if isinstance(w.kernel, WeightedSum | ProgramOutput)]
    accs = {w.kernel.acc for w in writes if isinstance(w.kernel, WeightedSum)}
    if task.program is not None:
        accs.add(task.program.acc)
        _rows(task.program, target)
    if len(accs) != 1:
        raise Unsupported("outputs with different accumulation dtypes")
    b = _Builder(input_dtypes, accs.pop(), target)
    program_stmts = b.program(task.program, task.program.outputs) if task.program is not None else {}
    outputs = []
    for w in writes:
        if isinstance(w.kernel, WeightedSum):
            args = tuple(
                b.load(slot) if minus is None else b.add(Stmt("sub", (b.load(slot), b.load(minus))))
                for _, slot, minus in w.kernel.terms
            )
            s = b.add(Stmt("wsum", args, tuple(float(c) for c, _, _ in w.kernel.terms)))
        else:
            assert task.program is not None and isinstance(w.kernel, ProgramOutput)
            s = program_stmts[task.program.outputs[w.kernel.index]]
        outputs.append((s, w.dtype))
    return b.spec(outputs)


def program_spec(
    program: TensorProgram, targets: Sequence[int], input_dtypes: Mapping[int, str], target: str = "triton"
) -> KernelCall:
    """A kernel computing the program instructions ``targets`` into accumulation-dtype buffers
    (the operands of a reduction pass)."""
    _rows(program, target)
    b = _Builder(input_dtypes, program.acc, target)
    stmts = b.program(program, targets)
    return b.spec([(stmts[t], ACC) for t in targets])


def reduction_spec(
    program: TensorProgram,
    work: Sequence[int],
    input_dtypes: Mapping[int, str],
    target: str = "triton",
) -> KernelCall:
    """A kernel for one reduction pass (``work``: its reductions), one output each:
    the operand in the accumulation dtype for k-th largest values and counts, and the float64
    block sums of the operand (``sum``) or of the products (``dot``, ``sumsq``) otherwise, so that
    no operand of a sum is ever stored."""
    _rows(program, target)
    b = _Builder(input_dtypes, program.acc, target)
    operands = [
        a for i in work for a in program.instrs[i].args[: REDUCTIONS[program.instrs[i].attr].operands]
    ]
    if not all(program.instrs[a].tensor for a in operands):
        raise Unsupported("a reduction of a number")
    stmts = b.program(program, operands)
    outputs = []
    for i in work:
        ins = program.instrs[i]
        fed = REDUCTIONS[ins.attr].kernel
        if fed == "operand":
            outputs.append((stmts[ins.args[0]], ACC))
        elif fed == "products":
            a = stmts[ins.args[0]]
            other = stmts[ins.args[1]] if REDUCTIONS[ins.attr].operands == 2 else a
            outputs.append((b.add(Stmt("mul64", (a, other))), SUM))
        elif fed == "sum":
            outputs.append((stmts[ins.args[0]], SUM))
        else:
            raise Unsupported(f"reduction {ins.attr}")
    return b.spec(outputs)


def _rows(program: TensorProgram, target: str) -> None:
    """Triton kernels compute no function of whole rows or columns: such programs run eagerly there."""
    if program.row_wise and target != "c":
        raise Unsupported("row ranks need whole rows")


def eager_tasks(plan: Plan, target: str) -> dict[str, str]:
    """The tensors of ``plan`` whose work no generated kernel of ``target`` (``"c"``, ``"triton"``)
    computes, each with why: the runtime runs them on the eager path (the GPU backend: on the CPU
    path).  Specs are built, not compiled; tasks of one structure are asked once."""
    found: dict[str, str] = {}
    seen: dict[tuple[object, ...], str | None] = {}
    for task in plan.tasks:
        if not any(isinstance(w.kernel, WeightedSum | ProgramOutput) for w in task.writes):
            continue  # copies only
        dtypes = plan.input_dtypes(task)
        key = (tuple(dtypes.items()), tuple((w.dtype, w.kernel) for w in task.writes), id(task.program))
        if key not in seen:
            seen[key] = _why_eager(task, dtypes, target)
        why = seen[key]
        if why is not None:
            found[task.name] = why
    return found


def _why_eager(task: TensorTask, dtypes: Mapping[int, str], target: str) -> str | None:
    try:
        task_spec(task, dtypes, target)
        if target == "c" and task.program is not None:
            for q in range(1, task.passes):
                reduction_spec(task.program, task.program.reductions_in(q), dtypes, target)
    except Unsupported as e:
        return str(e)
    return None
