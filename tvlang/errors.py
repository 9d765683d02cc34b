"""Every error a user can cause is a :class:`TvError` with a stable code.

Codes group by pipeline stage, so a code says where things went wrong:

======  =====================================================
E1xx    syntax (the parser)
E2xx    names and kinds (the checker): unknown names, affine rule, arguments
E3xx    inputs: missing or malformed files, mismatched tensors
E4xx    parameters, options and bindings given by the caller
E5xx    outputs: existing paths, write failures
======  =====================================================

Errors subclass both :class:`TvError` and the builtin category they belong to
(``ValueError``, ``OSError``), so callers can catch either.  ``str(err)``
renders the Rust-style report with the source line and a caret.
"""

from __future__ import annotations

from tvlang.source import Span


class TvError(Exception):
    """Root of all user-facing tvlang errors."""

    code = "E000"

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        label: str = "",
        help: str | None = None,
        notes: tuple[str, ...] = (),
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.label = label
        self.help = help
        self.notes = notes
        if code is not None:
            self.code = code

    def render(self) -> str:
        parts = [f"error[{self.code}]: {self.message}"]
        if self.span is not None:
            parts.append(self.span.render(self.label))
        parts.extend(f"  = note: {note}" for note in self.notes)
        if self.help:
            parts.append(f"  = help: {self.help}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


class TvSyntaxError(TvError, ValueError):
    """The text is not tvlang."""

    code = "E100"


class TvNameError(TvError, ValueError):
    """A name that nothing binds."""

    code = "E200"


class TvTypeError(TvError, TypeError):
    """Kinds that do not combine: model + model, scalar + delta, bad arguments."""

    code = "E201"


class TvInputError(TvError, OSError):
    """An input file is missing, unreadable, malformed or inconsistent with the others."""

    code = "E300"


class TvParamError(TvError, ValueError):
    """A parameter override, option or binding from the caller is invalid."""

    code = "E400"


class TvOutputError(TvError, OSError):
    """An output cannot be written where asked."""

    code = "E500"
