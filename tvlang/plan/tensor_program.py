"""A tensor program: the instructions that compute one tensor's outputs, and its passes.

Reductions (sums, norms, dot products, k-th largest values) need the whole
tensor, so they are scheduled into data passes before the element-wise pass
that writes the outputs: pass *q* evaluates every reduction whose operands
depend only on scalars known after pass *q-1*.  A k-th largest value takes one
pass when its sampled bracket holds the answer; when it does not (and always on
the GPU), the executor repeats the pass for the radix selection's rounds
(:mod:`tvlang.backends.reductions`), so memory stays one chunk at a time.

The same program serves every float tensor of a task; what differs per tensor
(its name, element count, reduction results) is supplied when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tvlang.ir.node import Node, Op, toposort
from tvlang.ir.printer import format_weight
from tvlang.ops import COLUMN_FUNCTIONS, ROW_FUNCTIONS


@dataclass(frozen=True)
class Instr:
    """One instruction of a tensor program: its operation, operands and attribute."""

    # input, const, numel, wsum, add, sub, mul, div, neg, pow, call, reduce, rand; a tensor-valued
    # reduce is a column function (tvlang.ops.COLUMN_FUNCTIONS): per-column results, read per element
    op: str
    args: tuple[int, ...] = ()
    attr: Any = None  # input index | constant | weights | function name | (seed, stream)
    tensor: bool = True  # a chunk of values (else one number per tensor)
    need: int = 0  # data passes that must finish before this value is known


@dataclass(frozen=True)
class TensorProgram:
    """What one tensor task computes, as straight-line instructions over its chunks."""

    instrs: tuple[Instr, ...]
    outputs: tuple[int, ...]  # the instruction computing each output
    acc: str  # "F32" or "F64"

    @cached_property
    def _schedules(self) -> dict[tuple[tuple[int, ...], frozenset[int]], tuple[tuple[int, int], ...]]:
        return {}

    def schedule(self, targets: tuple[int, ...], known: frozenset[int]) -> tuple[tuple[int, int], ...]:
        """The chunk instructions that compute ``targets`` (given the scalars already ``known``), in
        order, each with a buffer slot; a slot is reused once its value is dead, so a chunk needs
        only as many buffers as values are live at once, not one per instruction."""
        key = (targets, known)
        cached = self._schedules.get(key)
        if cached is not None:
            return cached
        needed: set[int] = set()
        stack = list(targets)
        while stack:
            i = stack.pop()
            if i in needed or i in known or not self.instrs[i].tensor:
                continue
            needed.add(i)
            if self.instrs[i].op != "reduce":  # (a column reduction's chunk is read from its result)
                stack.extend(self.instrs[i].args)
        order = sorted(needed)
        last_use = {i: i for i in order}
        for i in order:
            for a in self.instrs[i].args:
                if a in needed:
                    last_use[a] = i
        for t in targets:
            last_use[t] = len(self.instrs)  # results stay live until the caller has them
        free: list[int] = []
        slots: dict[int, int] = {}
        out = []
        for i in order:
            slots[i] = free.pop() if free else len(slots)
            out.append((i, slots[i]))
            for a in set(self.instrs[i].args):  # after assigning i: an output never aliases its operands
                if a in needed and last_use[a] == i:
                    free.append(slots[a])
        result = tuple(out)
        self._schedules[key] = result
        return result

    @property
    def max_live(self) -> int:
        """Buffers one chunk of the element-wise pass needs at once."""
        return len({slot for _, slot in self.schedule(self.outputs, frozenset())}) or 1

    def position_free(self, i: int) -> bool:
        """Whether instruction ``i``'s value at an element depends only on the inputs there (and
        per-tensor numbers): no random mask, no function of rows, no column statistic read per
        element.  Such a value can be computed on scattered elements gathered into one chunk."""
        stack, seen = [i], set()
        while stack:
            j = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            ins = self.instrs[j]
            if not ins.tensor:
                continue
            if ins.op == "rand" or ins.op == "reduce" or (ins.op == "call" and ins.attr in ROW_FUNCTIONS):
                return False
            stack.extend(ins.args)
        return True

    @property
    def row_wise(self) -> bool:
        """Whether an instruction needs whole rows in each chunk (ranks, sums or maxima of rows)."""
        return any(
            (ins.op == "call" and ins.attr in ROW_FUNCTIONS)
            or (ins.op == "reduce" and ins.attr in COLUMN_FUNCTIONS)
            for ins in self.instrs
        )

    @property
    def passes(self) -> int:
        """Data passes: every reduction round, then the element-wise pass."""
        return max((self.instrs[i].need for i in self.outputs), default=0) + 1

    def reductions_in(self, q: int) -> list[int]:
        """The reductions (instructions) that run in data pass ``q`` (1-based)."""
        return [i for i, ins in enumerate(self.instrs) if ins.op == "reduce" and ins.need == q]

    def describe(self) -> list[str]:
        lines = []
        for q in range(1, self.passes + 1):
            if q < self.passes:
                work = self.reductions_in(q)
                what = ", ".join(f"{self.instrs[i].attr}(…)" for i in work)
                if any(self.instrs[i].attr == "kth" for i in work):
                    what += (
                        " (selections: a sampled bracket; the pass repeats for radix rounds where it misses)"
                    )
                lines.append(f"pass {q}: reduce {what}")
            else:
                lines.append(
                    f"pass {q}: element-wise, {sum(ins.tensor for ins in self.instrs)} ops [{self.acc.lower()}]"
                )
        for n, i in enumerate(self.outputs):
            lines.append(f"  out{n} = {self.render(i)}")
        return lines

    def render(self, i: int, depth: int = 0) -> str:
        ins = self.instrs[i]
        if depth > 6:
            return "…"
        args = [self.render(a, depth + 1) for a in ins.args]
        if ins.op == "input":
            return f"in{ins.attr}"
        if ins.op == "const":
            return format_weight(ins.attr)
        if ins.op == "wsum":
            return (
                "(" + " + ".join(f"{format_weight(w)}*{a}" for w, a in zip(ins.attr, args, strict=True)) + ")"
            )
        if ins.op in ("call", "reduce"):
            return f"{ins.attr}({', '.join(args)})"
        if ins.op == "rand":
            return f"rand(seed={ins.attr[0]})"
        if ins.op == "numel":
            return f"numel({args[0]})"
        if ins.op == "global":
            return f"model_kth#{ins.attr}"
        if ins.op == "neg":
            return f"-{args[0]}"
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}[ins.op]
        return f"({args[0]} {sym} {args[1]})"


def compile_program(
    roots: Sequence[Node], slots: Mapping[str, int], acc: str, globals_: Mapping[int, int] | None = None
) -> TensorProgram:
    """Instructions for ``roots`` (optimised IR), inputs mapped to the task's input indices;
    ``globals_`` maps model-wide reduction nodes (by id) to their index in the plan."""
    index: dict[int, int] = {}
    instrs: list[Instr] = []
    for node in toposort(list(roots)):
        args = tuple(index[id(a)] for a in node.args)
        need = 0 if node.op is Op.NUMEL else max((instrs[a].need for a in args), default=0)
        op, attr = node.op.value, node.arg
        if node.op is Op.INPUT:
            attr = slots[node.arg.key]
        elif node.op is Op.CONST:
            attr = node.arg[0]
        elif node.op is Op.REDUCE:
            need += 1
        elif node.op is Op.CALL and node.arg in COLUMN_FUNCTIONS:  # a pass, then a value per element
            op = "reduce"
            need += 1
        elif node.op is Op.GLOBAL:
            attr = (globals_ or {})[id(node)]  # known before the per-tensor work starts
            need = 0
        instrs.append(Instr(op, args, attr, node.kind.tensor, need))
        index[id(node)] = len(instrs) - 1
    return TensorProgram(tuple(instrs), tuple(index[id(r)] for r in roots), acc)
