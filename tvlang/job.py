"""A validated job: what to compute, from which checkpoints, where to write it and how.

Job files (:mod:`tvlang.config`) and mergekit configs (:mod:`tvlang.mergekit`) both become a
:class:`Job`; every command that takes a program runs one the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tvlang.api import Program, compile_file, declare_params
from tvlang.lower import Binding, ParamValue
from tvlang.options import Options
from tvlang.source import Span
from tvlang.syntax.parser import parse


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


__all__ = ["Job"]
