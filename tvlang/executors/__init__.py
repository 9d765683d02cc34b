"""Where a plan's tasks run: one small interface, two implementations.

An :class:`Executor` takes the plan, its sources and its sinks and leaves every output
tensor written into the sinks (which the caller then commits or aborts); it decides
nothing about the computation.  ``local`` runs the chunks on this process's thread pool
(or streams them through the GPU); ``ray`` cuts the plan into units of whole output
shards and runs them as Ray tasks on a cluster (:mod:`tvlang.executors.ray`).  Both
write the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tvlang.errors import TvParamError
from tvlang.io.endpoints import Sink, Source
from tvlang.options import EXECUTORS
from tvlang.plan import Plan
from tvlang.runtime import NonFiniteReport, Progress, execute


class Executor(Protocol):
    def execute(
        self,
        plan: Plan,
        sources: Sequence[Source],
        sinks: Sequence[Sink],
        *,
        progress: Progress | None = None,
        nonfinite: str = "error",
    ) -> NonFiniteReport: ...


@dataclass(frozen=True)
class LocalExecutor:
    """This process: the CPU thread pool, or the GPU backend (``device`` as resolved by
    :func:`~tvlang.backends.device.resolve_device`: ``cpu``, ``cuda`` or ``interpret``)."""

    device: str = "cpu"

    def execute(
        self,
        plan: Plan,
        sources: Sequence[Source],
        sinks: Sequence[Sink],
        *,
        progress: Progress | None = None,
        nonfinite: str = "error",
    ) -> NonFiniteReport:
        if self.device == "cpu":
            return execute(plan, sources, sinks, progress=progress, nonfinite=nonfinite)
        # "interpret": the same kernels in Triton's interpreter, on CPU tensors (TRITON_INTERPRET=1)
        from tvlang.backends.gpu import execute_gpu

        return execute_gpu(
            plan,
            sources,
            sinks,
            progress=progress,
            nonfinite=nonfinite,
            device="cuda" if self.device == "cuda" else "cpu",
        )


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise TvParamError(
            f"unknown executor {name!r}",
            help="choose local (this machine, the default) or ray (a Ray cluster; docs/distributed.md)",
            code="E402",
        )
    return name


def executor_for(name: str, *, device: str = "cpu", address: str | None = None) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``) for a run on the resolved ``device``."""
    check_executor(name)
    if name == "local":
        return LocalExecutor(device)
    if device != "cpu":
        raise TvParamError(
            f"the ray executor runs CPU kernels; this run asks for device {device!r}",
            help="use --device cpu with --executor ray",
            code="E402",
        )
    from tvlang.executors.ray import RayExecutor

    return RayExecutor(address)


__all__ = ["Executor", "LocalExecutor", "check_executor", "executor_for"]
