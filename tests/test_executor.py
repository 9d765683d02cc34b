"""The executor (tvlang/executor.py) is the one loop over tasks, passes and chunks: back-ends plug in
through ``ChunkBackend`` and see its calls in its order.  (tests/triton_checks.py's
``one_loop_for_both_backends`` shows the GPU back-end, under Triton's interpreter, seeing the very
calls the CPU back-end sees.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import tvlang
import tvlang.executors
from tvlang import runtime
from tvlang.backends.cpu import Scratch
from tvlang.backends.reductions import KthLargest
from tvlang.executor import Execution, OperandPass, Pass, run_plan, task_chunks
from tvlang.io.endpoints import Sink, Source
from tvlang.plan import Plan

METHODS = ("begin", "reduce_chunk", "output_chunk", "operand_chunk", "end")
TIES = "base + ties(a - base, b - base, density=0.4)"
TIES_MODEL = 'base + ties(a - base, b - base, density=0.4, scope="model")'
MIXED = 'base + ties(a - base, b - base, density=0.4) + 0.5*magnitude_prune(b - a, 0.3, scope="model")'


def _states() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(50, 60, generator=g), "v": torch.randn(9000, generator=g), "one": torch.ones(1)}
    return {
        "base": {k: x.bfloat16() for k, x in base.items()},
        "a": {k: (x + 0.1 * torch.randn(x.shape, generator=g)).bfloat16() for k, x in base.items()},
        "b": {k: (x + 0.1 * torch.randn(x.shape, generator=g)).bfloat16() for k, x in base.items()},
    }


def _label(p: Pass | OperandPass) -> tuple[Any, ...]:
    return ("operand", p.operand, p.round_) if isinstance(p, OperandPass) else ("pass", p.q)


def _expected(plan: Plan) -> list[tuple[Any, ...]]:
    """The calls the executor makes with one worker: the model-wide rounds (every user tensor's
    chunks), then per tensor in plan order its reduction passes and its output pass."""
    calls: list[tuple[Any, ...]] = []
    for red in plan.model_reductions:
        for round_ in range(KthLargest(red.k, red.numel, "F64").rounds):
            for task_index, operand in red.users:
                task = plan.tasks[task_index]
                label = ("operand", operand, round_)
                calls.append(("begin", task.name, label))
                calls += [("operand_chunk", task.name, label, a, b) for a, b in task_chunks(plan, task)]
                calls.append(("end", task.name, label))
    for task in plan.tasks:
        for q in range(1, task.passes + 1):
            kind = "output_chunk" if q == task.passes else "reduce_chunk"
            calls.append(("begin", task.name, ("pass", q)))
            calls += [(kind, task.name, ("pass", q), a, b) for a, b in task_chunks(plan, task)]
            calls.append(("end", task.name, ("pass", q)))
    return calls


@pytest.mark.parametrize("expr", [TIES, TIES_MODEL])
def test_cpu_backend_sees_the_executors_passes_in_order(expr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []
    for name in METHODS:
        original = getattr(runtime.CpuBackend, name)

        def wrapper(self: Any, p: Any, *args: Any, _name: str = name, _original: Any = original) -> Any:
            seen.append((_name, p.task.name, _label(p), *args[:2]))
            return _original(self, p, *args)

        monkeypatch.setattr(runtime.CpuBackend, name, wrapper)
    s = _states()
    program = tvlang.compile(expr, bindings=s)
    options = tvlang.Options(chunk=500, threads=1)
    plan = program.plan(options=options)
    assert all(t.passes == (2 if expr == TIES else 1) for t in plan.tasks)
    assert bool(plan.model_reductions) == (expr == TIES_MODEL)
    got = program.run(options=options)
    assert seen == _expected(plan)
    assert all(torch.equal(got[k], v) for k, v in tvlang.evaluate(expr, bindings=s).items())


class Recording:
    """A back-end that runs the CPU back-end's kernels but takes whole tasks (not ``parallel``),
    declines the tensors in ``declined`` (the executor hands those to the fallback) and records
    every call with the thread that made it."""

    parallel = False

    def __init__(self, cpu: runtime.CpuBackend, declined: set[str], log: list[tuple[Any, ...]]) -> None:
        self.cpu = cpu
        self.kernels = cpu.kernels
        self.declined = declined
        self.log = log
        self.flushed = 0

    def _note(self, *what: Any) -> None:
        self.log.append(("own", threading.get_ident(), *what))

    def prepare(self, task: Any) -> bool:
        return task.name not in self.declined

    def begin(self, p: Pass | OperandPass) -> None:
        self._note("begin", p.task.name, _label(p))

    def reduce_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        self._note("chunk", p.task.name, _label(p), start)
        self.cpu.reduce_chunk(p, start, stop, scratch)

    def output_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        self._note("chunk", p.task.name, _label(p), start)
        self.cpu.output_chunk(p, start, stop, scratch)

    def operand_chunk(self, p: OperandPass, start: int, stop: int, scratch: Scratch) -> None:
        self._note("chunk", p.task.name, _label(p), start)
        self.cpu.operand_chunk(p, start, stop, scratch)

    def end(self, p: Pass | OperandPass) -> None:
        self._note("end", p.task.name, _label(p))

    def sample(self, p: Pass, positions: Any, scratch: Scratch) -> None:
        self.cpu.sample(p, positions, scratch)

    def selector(self, red: Any) -> KthLargest:
        return self.cpu.selector(red)

    def flush(self) -> None:
        self.flushed += 1


class Fallback(runtime.CpuBackend):
    """The CPU back-end, noting which tensors' chunks it was handed."""

    def __init__(self, run: runtime.Run, log: list[tuple[Any, ...]]) -> None:
        super().__init__(run)
        self.log = log

    def output_chunk(self, p: Pass, start: int, stop: int, scratch: Scratch) -> None:
        self.log.append(("fallback", p.task.name, start))
        super().output_chunk(p, start, stop, scratch)


def test_a_backend_plugs_in_through_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-parallel back-end gets whole tasks (every pass: begin, its chunks in order, end; in one
    thread) even with several workers, after the model-wide rounds, which it runs too; the tasks it
    declines run on the fallback; the bits are the CPU back-end's."""
    log: list[tuple[Any, ...]] = []
    backends: list[Recording] = []

    def execute(
        plan: Plan, sources: Sequence[Source], sinks: Sequence[Sink], *, progress: Any = None, nonfinite: str
    ) -> runtime.NonFiniteReport:
        ex = Execution(plan, progress)
        run = runtime.Run(plan, sources, sinks, nonfinite, runtime.NonFiniteReport(plan), ex.model_values)
        backends.append(Recording(runtime.CpuBackend(run), {"w", "one"}, log))
        run_plan(ex, backends[-1], Fallback(run, log), workers=2)
        return run.report

    s = _states()
    expected = tvlang.evaluate(MIXED, bindings=s, chunk=500)
    monkeypatch.setattr(tvlang.executors, "execute", execute)
    got = tvlang.evaluate(MIXED, bindings=s, chunk=500, threads=2)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert backends[0].flushed > 1  # after each model-wide round and at the end

    own = [e for e in log if e[0] == "own"]
    passes = [e for e in own if e[4][0] == "pass"]
    assert {e[3] for e in passes} == {"v"} and {e[1] for e in log if e[0] == "fallback"} == {"w", "one"}
    assert {e[3] for e in own if e[4][0] == "operand"} == {"w", "v", "one"}
    assert len({e[1] for e in passes}) == 1  # a whole task, in one worker
    steps = [(e[2], e[4], *e[5:]) for e in passes]
    want: list[tuple[Any, ...]] = []
    plan = tvlang.compile(MIXED, bindings=s).plan(options=tvlang.Options(chunk=500))
    task = next(t for t in plan.tasks if t.name == "v")
    v_chunks = [a for a, _ in task_chunks(plan, task)]
    for q in range(1, task.passes + 1):
        want += [("begin", ("pass", q)), *(("chunk", ("pass", q), a) for a in v_chunks), ("end", ("pass", q))]
    assert steps == want
    assert len(v_chunks) == 3
    rounds = [i for i, e in enumerate(log) if e[0] == "own" and e[4][0] == "operand"]
    assert rounds == list(range(len(rounds)))  # the model-wide rounds come first


def test_a_block_two_shared_chunks_share_goes_with_the_second_to_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With several workers, a one-pass task's chunks are done in any order.  A release drops the
    2 MiB blocks of its range, and the ones it shares with the chunks before and after it only when
    those are done too: dropped under a chunk still reading it, a block was mapped again for good.
    The worker that finishes the last chunk ends the pass, which releases the whole tensor."""
    events: list[tuple[Any, ...]] = []
    lock = threading.Lock()
    ending = threading.local()
    run_chunk, release, end = runtime.run_chunk, runtime.release, runtime.CpuBackend.end

    def slow_first(run: Any, task: Any, start: int, stop: int, *args: Any, **kw: Any) -> None:
        if task.name == "v" and start == 0:
            time.sleep(0.2)  # the other worker does the chunks after it meanwhile
        run_chunk(run, task, start, stop, *args, **kw)
        with lock:
            events.append(("done", task.name, start, stop))

    def recorded(sources: Any, reads: Any, name: str, start: int, stop: int, **flags: Any) -> None:
        with lock:
            kind = "end" if getattr(ending, "on", False) else "release"
            events.append((kind, name, start, stop, flags.get("before", True), flags.get("after")))
        release(sources, reads, name, start, stop, **flags)

    def ended(self: runtime.CpuBackend, p: Any) -> None:
        ending.on = True
        try:
            end(self, p)
        finally:
            ending.on = False

    s = _states()
    expr = "base + 0.5*(a - base)"
    expected = tvlang.evaluate(expr, bindings=s, chunk=500, threads=1)
    monkeypatch.setattr(runtime, "run_chunk", slow_first)
    monkeypatch.setattr(runtime, "release", recorded)
    monkeypatch.setattr(runtime.CpuBackend, "end", ended)
    got = tvlang.evaluate(expr, bindings=s, chunk=500, threads=2)
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    v = [e for e in events if e[1] == "v"]
    ends = [i for i, e in enumerate(v) if e[0] == "end"]
    assert len(ends) == 1 and ends[0] > max(i for i, e in enumerate(v) if e[0] == "done")
    releases = {e[2]: e for e in v if e[0] == "release"}
    assert sorted(releases) == list(range(0, 9000, 500))  # each chunk released once, when done
    for i, e in enumerate(v):
        if e[0] == "release":
            _, _, start, stop, before, after = e
            done = {d[2] for d in v[:i] if d[0] == "done"}
            assert before == (start == 0 or start - 500 in done)  # the block before: if done too
            assert after == (stop == 9000 or stop in done)
    for b in range(500, 9000, 500):  # each shared block goes with exactly one of its two chunks
        assert releases[b - 500][5] != releases[b][4]
    assert releases[0][4:] == (True, True)  # chunk 0, done last, takes both its blocks
