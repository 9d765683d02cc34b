"""A validated job: what to compute, from which checkpoints, where to write it and how.

Job files (:mod:`tvlang.config`) and mergekit configs (:mod:`tvlang.mergekit`) both become a
:class:`Job`; every command that takes a program runs one the same way, as a :class:`PreparedJob`.
Reading job files (YAML, mergekit configs) lives in :mod:`tvlang.config`, which a command given a
``.tv`` file or an expression never imports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tvlang.api import Program, compile_file, declare_params
from tvlang.driver import OutSpec
from tvlang.errors import TvError
from tvlang.lowering.lower import Binding, ParamValue
from tvlang.options import Options
from tvlang.source import Span
from tvlang.syntax.parser import parse

if TYPE_CHECKING:
    from tvlang.plan import Plan

#: The names of job files (else a program file): YAML or JSON.
JOB_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Job:
    """A validated job.  Paths are absolute; ``where`` maps dotted field paths to their place in
    the job file, so errors found only when running (a missing checkpoint) still point there."""

    program: str | None
    expression: str | None
    bindings: Mapping[str, Binding]
    params: Mapping[str, ParamValue]
    output: str | Mapping[str, str] | None
    options: Options
    device: str = "cpu"
    name: str = "<job>"
    base_dir: str = "."
    where: Mapping[str, Span] = field(default_factory=dict, compare=False, repr=False)
    translated: str | None = None  # the whole .tv program, when the job is a translated mergekit config
    mergekit_config: str | None = None  # the config's text when the job is a mergekit config (its model card)

    def compile(self) -> Program:
        """The program with the job's bindings.  An expression has no ``param`` lines, so each job
        parameter it does not declare is declared ahead of it: then ``--set`` and sweeps work as for
        a ``.tv`` file, a misspelt ``--set`` name is an error, and the values are recorded in the
        output's metadata.  ``load()`` paths in an expression are relative to the job."""
        if self.program is not None:
            return compile_file(self.program, bindings=self.bindings)
        assert self.expression is not None
        syntax = parse(self.expression, f"{self.name} (expression)", self.base_dir)
        program = declare_params(Program(syntax, self.bindings), self.params, self.name)
        program.mergekit_config = self.mergekit_config
        return program


@dataclass(frozen=True)
class PreparedJob:
    """A job with its overrides applied: what ``run``, ``check`` and ``plan`` all act on.  Errors
    about the job's own bindings and parameters point at the job file."""

    job: Job | None  # None: a program given directly (a .tv file, an expression)
    program: Program
    params: Mapping[str, ParamValue]
    bindings: Mapping[str, Any]
    options: Options
    output: OutSpec
    overridden: frozenset[str] = frozenset()

    def run(self, output: OutSpec = None) -> Any:
        """See :meth:`Program.run`; ``output`` (else the job's) says where."""
        with self._located():
            out = output if output is not None else self.output
            return self.program.run(out, self.params, self.bindings, self.options)

    def plan(self) -> Plan:
        with self._located():
            return self.program.plan(self.params, self.bindings, self.options)

    def explain(self, *, all_tensors: bool = False, stage: str | None = None) -> str:
        with self._located():
            return self.program.explain(
                self.params, self.bindings, self.options, all_tensors=all_tensors, stage=stage
            )

    @contextlib.contextmanager
    def _located(self) -> Iterator[None]:
        try:
            yield
        except TvError as e:
            if self.job is not None:
                _relocate(e, self.job, set(self.overridden))
            raise


def _relocate(err: TvError, job: Job, overridden: set[str]) -> None:
    """An error about a binding or parameter the job gave points at the job file, not at the
    command-line stand-in (``--bind NAME``, ``--set``) the lowering names."""
    if err.span is None:
        return
    origin = err.span.source.name
    translated = job.where.get(f"expression:{err.span.text}")  # a call a mergekit config wrote
    if translated is not None and err.span.source.text == job.expression:
        err.notes = (*err.notes, f"in the translated program: `{err.span.text}`")
        err.span = translated
        return
    if origin.startswith("--bind "):
        name, field_ = origin.removeprefix("--bind "), "bindings"
    elif origin == "--set":
        name, field_ = err.span.text, "params"
    else:
        return
    span = job.where.get(f"{field_}.{name}.path") or job.where.get(f"{field_}.{name}")
    if name not in overridden and span is not None:
        err.span = span


__all__ = ["JOB_SUFFIXES", "Job", "PreparedJob"]
